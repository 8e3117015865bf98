"""Tests of omx.datasets: the synthetic toy, the packaged her2st sample and the her2st loader."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import zipfile
from functools import partial

import numpy as np
import pytest
import spatialdata as sd
import xarray as xr
from scipy import sparse
from skimage.color import rgb2hed
from sklearn.linear_model import RidgeCV
from spatialdata.transformations import Identity, Scale

import omx
from omx.datasets import _her2st
from omx.datasets._her2st import _SAMPLE_DIR, _find_her2st_dir


def _level0(sdata, key) -> np.ndarray:
    """Full-resolution image as a (y, x, 3) numpy array."""
    img = sdata.images[key]
    img = img if isinstance(img, xr.DataArray) else sd.get_pyramid_levels(img, n=0)
    return np.moveaxis(img.values, 0, -1)


@pytest.fixture(scope="module")
def toy():
    return omx.datasets.toy_sdata(seed=0)


# ----------------------------------------------------------------------------------------------------------- toy
def test_toy_layout(toy):
    assert set(toy.images) == {"S1_he", "S2_he"} and set(toy.shapes) == {"S1_spots", "S2_spots"}
    assert toy.attrs["omx"] == {"units": {"S1": "um", "S2": "um"}}
    table = toy.tables["table"]
    assert table.shape == (400, 50)
    assert sparse.isspmatrix_csr(table.X) and table.X.dtype == np.int32 and table.X.sum() > 0
    assert table.uns["spatialdata_attrs"]["region"] == ["S1_spots", "S2_spots"]
    assert list(table.obs["patient"].cat.categories) == ["P1", "P2"]
    assert table.obsm["toy_latent"].shape == (400, 3)
    for s in ("S1", "S2"):
        t = sd.transformations.get_transformation(toy.images[f"{s}_he"], to_coordinate_system=s)
        assert isinstance(t, Scale) and t.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == 1.0
        shapes = toy.shapes[f"{s}_spots"]
        assert isinstance(sd.transformations.get_transformation(shapes, to_coordinate_system=s), Identity)
        assert (shapes["radius"] == 27.5).all()
        img = _level0(toy, f"{s}_he")
        assert img.dtype == np.uint8 and max(img.shape[:2]) < 2500
        # every spot lies on the image, with a margin
        xy = table.obsm["spatial"][(table.obs["section"] == s).to_numpy()]
        assert xy.min() > 55 and (xy[:, 0] < img.shape[1] - 55).all() and (xy[:, 1] < img.shape[0] - 55).all()
        # hex grid, ~100 um pitch
        d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        np.testing.assert_allclose(d.min(axis=1), 100.0, rtol=1e-6)


def test_toy_looks_like_he(toy):
    img = _level0(toy, "S1_he").reshape(-1, 3).astype(int)
    white = (img > 220).all(axis=1)
    purple = (img[:, 0] < 140) & (img[:, 1] < 110) & (img[:, 2] > img[:, 1])  # hematoxylin nuclei
    pink = (img[:, 0] > 180) & (img[:, 1] < 190) & (img[:, 0] > img[:, 1] + 30)  # eosin stroma
    assert 0.03 < white.mean() < 0.5
    assert 0.03 < purple.mean() < 0.5
    assert pink.mean() > 0.2


def test_toy_deterministic(toy):
    again = omx.datasets.toy_sdata(seed=0)
    other = omx.datasets.toy_sdata(seed=1)
    np.testing.assert_array_equal(_level0(again, "S2_he"), _level0(toy, "S2_he"))
    assert (again.tables["table"].X != toy.tables["table"].X).nnz == 0
    np.testing.assert_array_equal(again.tables["table"].obsm["toy_latent"], toy.tables["table"].obsm["toy_latent"])
    assert (other.tables["table"].X != toy.tables["table"].X).nnz > 0


def test_toy_options():
    small = omx.datasets.toy_sdata(n_spots=30, n_genes=7, n_sections=3, seed=2, grid="square", mpp=2.0)
    assert set(small.images) == {"S1_he", "S2_he", "S3_he"}
    assert small.tables["table"].shape == (90, 7)
    t = sd.transformations.get_transformation(small.images["S3_he"], to_coordinate_system="S3")
    assert t.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == 2.0
    with pytest.raises(ValueError, match="grid"):
        omx.datasets.toy_sdata(grid="triangle")


def _patch_features(sdata, section: str, size_um: float = 55.0) -> np.ndarray:
    """Colour and HED statistics of a square patch around each spot, cut from the numpy image."""
    table = sdata.tables["table"]
    img = _level0(sdata, f"{section}_he").astype(np.float32) / 255
    mpp = sd.transformations.get_transformation(sdata.images[f"{section}_he"], to_coordinate_system=section)
    mpp = mpp.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0]
    half = int(round(size_um / mpp / 2))
    feats = []
    for x, y in table.obsm["spatial"][(table.obs["section"] == section).to_numpy()] / mpp:
        cx, cy = int(round(x)), int(round(y))
        patch = img[cy - half : cy + half + 1, cx - half : cx + half + 1].reshape(-1, 3)
        hed = rgb2hed(patch)
        feats.append(np.r_[patch.mean(0), patch.std(0), hed.mean(0), hed.std(0), (hed[:, 0] > 0.05).mean()])
    return np.asarray(feats)


def _log_norm(sdata, section: str) -> np.ndarray:
    table = sdata.tables["table"]
    x = table.X[(table.obs["section"] == section).to_numpy()].toarray().astype(float)
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def test_toy_expression_follows_image(toy):
    """Ridge on simple colour / HED features of a 55 um patch predicts a held-out section's expression."""
    x_train, x_test = _patch_features(toy, "S1"), _patch_features(toy, "S2")
    mu, sd_ = x_train.mean(0), x_train.std(0) + 1e-9
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit((x_train - mu) / sd_, _log_norm(toy, "S1"))
    pred, truth = model.predict((x_test - mu) / sd_), _log_norm(toy, "S2")
    r = [np.corrcoef(pred[:, g], truth[:, g])[0, 1] for g in range(truth.shape[1])]
    assert np.mean(r) > 0.3
    # and the latent fields are what the image shows: nuclear density and eosin are recoverable
    latent = toy.tables["table"].obsm["toy_latent"]
    s1, s2 = ((toy.tables["table"].obs["section"] == s).to_numpy() for s in ("S1", "S2"))
    for k in (0, 2):
        fit = RidgeCV().fit((x_train - mu) / sd_, latent[s1, k])
        assert np.corrcoef(fit.predict((x_test - mu) / sd_), latent[s2, k])[0, 1] > 0.7


def test_toy_round_trip(tmp_path):
    small = omx.datasets.toy_sdata(n_spots=20, n_genes=5, seed=3)
    small.write(tmp_path / "toy.zarr")
    back = sd.read_zarr(tmp_path / "toy.zarr")
    np.testing.assert_array_equal(_level0(back, "S1_he"), _level0(small, "S1_he"))
    np.testing.assert_array_equal(back.tables["table"].obsm["toy_latent"], small.tables["table"].obsm["toy_latent"])
    assert back.attrs["omx"] == small.attrs["omx"]


# ------------------------------------------------------------------------------------------------ packaged sample
def test_sample_loads():
    sdata = omx.datasets.her2st_sample()
    assert set(sdata.images) == {"C2_he", "C3_he", "C4_he"}
    table = sdata.tables["table"]
    assert table.shape == (551, 785)
    assert list(table.var_names) == omx.datasets.her2st_genes()
    for s in ("C2", "C3", "C4"):
        t = sd.transformations.get_transformation(sdata.images[f"{s}_he"], to_coordinate_system=s)
        assert t.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == pytest.approx(2.0, rel=0.02)
        assert (sdata.shapes[f"{s}_spots"]["radius"] == 50.0).all()
    assert table.obs["cluster"].notna().sum() > 500
    np.testing.assert_allclose(table.obsm["stereoscope_major"].sum(axis=1), 1.0, atol=1e-4)
    assert omx.datasets.her2st_sample("C3").tables["table"].n_obs == 180


def test_sample_small_and_documented():
    files = [p for p in _SAMPLE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 1024 * 1024
    readme = (_SAMPLE_DIR / "README.md").read_text()
    assert "CC BY 4.0" in readme and "Andersson" in readme


def test_sample_matches_full_study(her2st_dir):
    """The packaged counts are the study's counts, restricted to the panel (when the study is here)."""
    root = her2st_dir
    import pandas as pd

    full = pd.read_csv(root / "data" / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)
    table = omx.datasets.her2st_sample("C2").tables["table"]
    ids = [n.split("_", 1)[1] for n in table.obs_names]
    np.testing.assert_array_equal(table.X.toarray(), full.loc[ids, list(table.var_names)].to_numpy())


# ---------------------------------------------------------------------------------------------------- her2st
def test_her2st_genes():
    genes = omx.datasets.her2st_genes()
    assert len(genes) == 785 == len(set(genes)) and {"GNAS", "FASN", "KRT8"} <= set(genes)
    assert omx.datasets.her2st_genes(_SAMPLE_DIR) == genes


def test_her2st_path_from_env(monkeypatch):
    monkeypatch.setenv("OMX_HER2ST_DIR", str(_SAMPLE_DIR))
    sdata = omx.datasets.her2st(sections="C4", genes=["KRT8", "GNAS"])
    assert list(sdata.images) == ["C4_he"]
    assert list(sdata.tables["table"].var_names) == ["KRT8", "GNAS"]


def test_her2st_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv("OMX_DATA_DIR", str(tmp_path / "omx_data"))  # nothing downloaded there either
    with pytest.raises(FileNotFoundError, match="almaan/her2st"):
        omx.datasets.her2st(tmp_path)
    monkeypatch.setenv("OMX_HER2ST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="OMX_HER2ST_DIR"):
        omx.datasets.her2st()
    monkeypatch.delenv("OMX_HER2ST_DIR")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_her2st, "_REPO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Nat Commun 12, 6012 \(2021\)"):
        omx.datasets.her2st()
    assert len(omx.datasets.her2st_genes()) == 785  # the packaged copy


def test_her2st_real(monkeypatch):
    root = _find_her2st_dir()
    if root is None:
        pytest.skip("her2st data not found (../shared/data/her2st or $OMX_HER2ST_DIR).")
    monkeypatch.chdir(root.parent)  # found by walking up from the working directory
    sdata = omx.datasets.her2st(sections=["C2"], genes=omx.datasets.her2st_genes())
    table = sdata.tables["table"]
    assert table.shape == (187, 785)
    t = sd.transformations.get_transformation(sdata.images["C2_he"], to_coordinate_system="C2")
    assert t.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == pytest.approx(0.69, rel=0.05)


@pytest.fixture
def served_archive(tmp_path):
    """A zip of the packaged sample laid out as GitHub's archive (one top folder), served over local HTTP.

    For the whole-archive option of `download_her2st` (`url=`).
    """
    root = tmp_path / "served"
    root.mkdir()
    archive = root / "master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in _SAMPLE_DIR.rglob("*"):
            if file.is_file() and file.name != "genes_785.txt":  # the panel is not part of the study
                zf.write(file, f"her2st-master/{file.relative_to(_SAMPLE_DIR)}")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/master.zip", hashlib.sha256(archive.read_bytes()).hexdigest()
    server.shutdown()
    server.server_close()


def test_download_her2st(tmp_path, served_archive):
    url, sha256 = served_archive
    assert omx.datasets.download_her2st(_SAMPLE_DIR, url=url) == _SAMPLE_DIR  # already there: no download

    root = omx.datasets.download_her2st(tmp_path / "dl", url=url, known_hash=f"sha256:{sha256}")
    assert root == tmp_path / "dl" / "her2st-master"
    assert sorted(p.name for p in (root / "data" / "ST-cnts").iterdir()) == ["C2.tsv.gz", "C3.tsv.gz", "C4.tsv.gz"]
    assert (root / "genes_785.txt").read_text() == (_SAMPLE_DIR / "genes_785.txt").read_text()  # panel added
    assert not (tmp_path / "dl" / "her2st.zip").exists()  # archive deleted once unzipped
    n_spots = omx.datasets.her2st_sample("C2").tables["table"].n_obs
    assert omx.datasets.her2st(root, "C2").tables["table"].n_obs == n_spots
    assert omx.datasets.download_her2st(tmp_path / "dl", url=url) == root  # second call: found, not fetched

    with pytest.raises(ValueError, match="hash"):  # a corrupted or changed archive is refused and deleted
        omx.datasets.download_her2st(tmp_path / "bad", url=url, known_hash="sha256:" + "0" * 64)
    assert not any((tmp_path / "bad").iterdir())


def test_download_her2st_offline(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match="git clone"):
        omx.datasets.download_her2st(tmp_path / "dl", url=f"http://127.0.0.1:{port}/master.zip", timeout=5)
    assert not any((tmp_path / "dl").iterdir())
