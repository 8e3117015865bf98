"""Tests of the public-data registry and `fetch`, all without network (a local HTTP server stands in for one)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import logging
import re
import shutil
import tarfile
import threading
import warnings
from functools import partial
from pathlib import Path

import pooch
import pytest
import requests

import omx
from omx.datasets import _registry
from omx.datasets._registry import DATASETS, Dataset, RemoteFile
from omx.datasets._visium import VISIUM_DATASETS, _untar_spatial

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """An empty $OMX_DATA_DIR."""
    home = tmp_path / "omx_data"
    monkeypatch.setenv("OMX_DATA_DIR", str(home))
    return home


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError(f"network used: {args} {kwargs}")

    monkeypatch.setattr(pooch, "retrieve", fail)
    monkeypatch.setattr(requests, "head", fail)


@pytest.fixture
def offline(monkeypatch):
    """Downloads fail as they do without network."""

    def refuse(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setattr(pooch, "retrieve", refuse)
    monkeypatch.setattr(requests, "head", refuse)


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over a folder: yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _register(monkeypatch, files: dict[str, tuple[bytes, str]], *, name="tiny", size_known=True) -> Dataset:
    """A temporary registry entry: ``files`` maps a relative path to (content, URL)."""
    dataset = Dataset(
        name=name,
        description="a tiny generated test data set",
        licence="CC0",
        citation="nobody",
        homepage="http://127.0.0.1",
        hash_source="computed by the test",
        files=tuple(
            RemoteFile(p, url, _sha(data), len(data) if size_known else None, "test")
            for p, (data, url) in files.items()
        ),
    )
    monkeypatch.setitem(DATASETS, name, dataset)
    return dataset


# ----------------------------------------------------------------------------------------------------- registry
def test_every_dataset_documented():
    assert {"her2st", "visium_breast_ffpe", "visium_breast_block_a"} <= set(DATASETS)
    for d in DATASETS.values():
        assert d.licence and d.citation and d.description and d.hash_source, d.name
        assert d.homepage.startswith("https://"), d.name
        assert d.files, d.name
    assert DATASETS["her2st"].licence == "CC BY 4.0" and "Nat Commun 12, 6012 (2021)" in DATASETS["her2st"].citation
    for name in VISIUM_DATASETS:
        assert DATASETS[name].licence == "CC BY 4.0" and "10x Genomics" in DATASETS[name].citation
        expected = {"filtered_feature_bc_matrix.h5", "spatial.tar.gz", "image.tif"}
        assert {f.path for f in DATASETS[name].files} == expected
    # the loaders' docstrings carry licence, citation and the original 10x address
    for func, sample in ((omx.datasets.visium_breast_ffpe, "Visium_FFPE_Human_Breast_Cancer"),
                         (omx.datasets.visium_breast_block_a, "V1_Breast_Cancer_Block_A_Section_1")):  # fmt: skip
        assert "CC BY 4.0" in func.__doc__ and "10x Genomics" in func.__doc__
        assert "https://cf.10xgenomics.com/samples/spatial-exp/" in func.__doc__ and sample in func.__doc__
    doc = omx.datasets.download_her2st.__doc__
    assert "CC BY 4.0" in doc and "Andersson" in doc


def test_every_file_pinned():
    for d in DATASETS.values():
        paths = [f.path for f in d.files]
        assert len(paths) == len(set(paths)), d.name
        for f in d.files:
            assert _HEX64.match(f.sha256), (d.name, f.path)
            assert f.url.startswith("https://"), (d.name, f.path)
            assert f.size_source, (d.name, f.path)
            assert f.size is None or (isinstance(f.size, int) and f.size > 0), (d.name, f.path)
            if f.size is None:  # no trustworthy size: said so, and fetch asks the server
                assert f.size_source.startswith("unknown"), (d.name, f.path)
            assert not Path(f.path).is_absolute() and ".." not in Path(f.path).parts, (d.name, f.path)
    for f in DATASETS["her2st"].files:  # pinned to a commit, and the file's path is the repository's
        assert re.fullmatch(rf"https://github\.com/almaan/her2st/raw/[0-9a-f]{{40}}/{re.escape(f.path)}", f.url)
        assert f.size is not None
    for name in VISIUM_DATASETS:
        for f in DATASETS[name].files:
            assert f.url.startswith("https://exampledata.scverse.org/squidpy/10x_genomics/")


def test_registry_table(data_home):
    df = omx.datasets.registry()
    assert list(df.columns) == ["dataset", "file", "size", "sha256", "url", "licence", "citation", "local"]
    assert len(df) == sum(len(d.files) for d in DATASETS.values())
    assert df["licence"].astype(bool).all() and df["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    her2st = omx.datasets.registry("her2st")
    assert set(her2st["dataset"]) == {"her2st"} and her2st["size"].notna().all()
    assert her2st["local"].iloc[0] == str(data_home / "her2st" / her2st["file"].iloc[0])
    with pytest.raises(KeyError, match="visium_breast_ffpe"):
        omx.datasets.registry("nope")


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OMX_DATA_DIR", str(tmp_path / "x"))
    assert omx.datasets.data_dir() == tmp_path / "x"
    monkeypatch.delenv("OMX_DATA_DIR")
    assert omx.datasets.data_dir() == Path(pooch.os_cache("omx"))


def test_her2st_hashes_match_shared_copy(her2st_dir):
    """Every pinned her2st file is byte for byte the copy in ../shared/data/her2st (when that is here)."""
    for f in DATASETS["her2st"].files:
        local = her2st_dir / f.path
        if not local.is_file():
            pytest.skip(f"{her2st_dir} is not the full shared copy ({f.path} missing).")
        data = local.read_bytes()
        assert _sha(data) == f.sha256, f.path
        assert len(data) == f.size, f.path


def test_format_size():
    assert _registry.format_size(12) == "12 B"
    assert _registry.format_size(1_234_567) == "1.2 MB"
    assert _registry.format_size(2.5e9) == "2.5 GB"
    assert _registry.format_size(None) == "size unknown"


# -------------------------------------------------------------------------------------------------------- fetch
def test_fetch_uses_placed_files(monkeypatch, data_home, no_network):
    _register(monkeypatch, {"a.txt": (b"hello", "https://example.org/a.txt"), "sub/b.bin": (b"\0\1", "https://x/b")})
    for rel, data in (("a.txt", b"hello"), ("sub/b.bin", b"\0\1")):
        (data_home / "tiny" / rel).parent.mkdir(parents=True, exist_ok=True)
        (data_home / "tiny" / rel).write_bytes(data)
    paths = omx.datasets.fetch("tiny")
    assert paths == {"a.txt": data_home / "tiny" / "a.txt", "sub/b.bin": data_home / "tiny" / "sub" / "b.bin"}
    assert omx.datasets.fetch("tiny", "a.txt") == {"a.txt": data_home / "tiny" / "a.txt"}
    with pytest.raises(KeyError, match="a.txt"):
        omx.datasets.fetch("tiny", ["c.txt"])
    with pytest.raises(KeyError, match="her2st"):
        omx.datasets.fetch("nope")


def test_fetch_offline_says_what_to_place_where(monkeypatch, data_home, offline, caplog):
    _register(monkeypatch, {"a.txt": (b"hello", "https://example.org/a.txt"), "sub/b.bin": (b"\0\1", "https://x/b")})
    (data_home / "tiny").mkdir(parents=True)
    (data_home / "tiny" / "a.txt").write_bytes(b"hello")  # one is there already
    with caplog.at_level(logging.INFO, logger="omx"), pytest.raises(ConnectionError) as err:
        omx.datasets.fetch("tiny")
    msg = str(err.value)
    assert "https://x/b" in msg and str(data_home / "tiny" / "sub" / "b.bin") in msg and "OMX_DATA_DIR" in msg
    assert "example.org/a.txt" not in msg  # present with its checksum: not asked for
    assert "Downloading 1 file (2 B) of tiny to" in caplog.text and "sub/b.bin" in caplog.text


def test_fetch_wrong_hash(monkeypatch, data_home, offline, caplog):
    _register(monkeypatch, {"a.txt": (b"hello", "https://example.org/a.txt")})
    placed = data_home / "tiny" / "a.txt"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"hellO")
    with caplog.at_level(logging.WARNING, logger="omx"), pytest.raises(ConnectionError) as err:
        omx.datasets.fetch("tiny")
    assert f"{placed} has sha256 {_sha(b'hellO')}" in caplog.text and "tiny/a.txt" in caplog.text
    assert "another checksum" in str(err.value) and str(placed) in str(err.value)


def test_fetch_downloads_over_http(monkeypatch, tmp_path, data_home, server, caplog):
    """A real pooch download from a local server, checked against its hash; then found without the server."""
    root, base = server
    data = b"omx test payload\n" * 3
    (root / "payload.txt").write_bytes(data)
    _register(monkeypatch, {"dir/payload.txt": (data, f"{base}/payload.txt")}, size_known=False)
    with caplog.at_level(logging.INFO, logger="omx"):
        paths = omx.datasets.fetch("tiny", progressbar=False)
    target = data_home / "tiny" / "dir" / "payload.txt"
    assert paths == {"dir/payload.txt": target} and target.read_bytes() == data
    assert f"Downloading 1 file ({len(data)} B) of tiny to {data_home / 'tiny'}" in caplog.text  # size from HEAD

    (root / "payload.txt").unlink()  # present now: no request at all
    assert omx.datasets.fetch("tiny") == paths

    target.write_bytes(b"corrupted")  # a wrong local file is replaced by the right one
    (root / "payload.txt").write_bytes(data)
    omx.datasets.fetch("tiny", progressbar=False)
    assert target.read_bytes() == data

    (root / "payload.txt").write_bytes(b"the server's file changed")  # a changed remote file is refused
    with pytest.raises(ValueError, match="does not match its pinned sha256"):
        omx.datasets.fetch("tiny", path=tmp_path / "elsewhere", progressbar=False)
    assert not (tmp_path / "elsewhere" / "dir" / "payload.txt").exists()

    (root / "payload.txt").unlink()  # HTTP 404 reads as a connection problem with placement hints
    with pytest.raises(ConnectionError, match=re.escape(str(tmp_path / "other" / "dir" / "payload.txt"))):
        omx.datasets.fetch("tiny", path=tmp_path / "other", progressbar=False)


# ------------------------------------------------------------------------------------------------------- her2st
def test_download_her2st_sections_from_placed_files(monkeypatch, data_home, her2st_dir, no_network):
    """Files already in $OMX_DATA_DIR/her2st are used; `her2st()` then finds the study there."""
    dest = data_home / "her2st"
    for f in DATASETS["her2st"].files:
        if "C2" in f.path or f.path.endswith("motivation.csv"):
            (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(her2st_dir / f.path, dest / f.path)
    assert omx.datasets.download_her2st(sections="C2") == dest
    assert (dest / "genes_785.txt").is_file()
    monkeypatch.delenv("OMX_HER2ST_DIR", raising=False)
    monkeypatch.chdir(data_home)
    from omx.datasets import _her2st

    monkeypatch.setattr(_her2st, "_REPO_ROOT", data_home)  # not ../shared/data/her2st: the downloaded copy
    assert _her2st._find_her2st_dir() == dest
    sdata = omx.datasets.her2st(sections="C2", genes=["GNAS"])
    assert sdata.tables["table"].n_obs == 187


def test_download_her2st_over_http(monkeypatch, tmp_path, data_home, her2st_dir, server, caplog):
    """Per-file download of one section from a local copy of the repository, with the pinned hashes."""
    root, base = server
    her2st = DATASETS["her2st"]
    monkeypatch.setitem(
        DATASETS,
        "her2st",
        dataclasses.replace(her2st, files=tuple(dataclasses.replace(f, url=f"{base}/{f.path}") for f in her2st.files)),
    )
    shutil.copytree(her2st_dir / "data", root / "data")
    shutil.copytree(her2st_dir / "res", root / "res")
    with caplog.at_level(logging.INFO, logger="omx"):
        folder = omx.datasets.download_her2st(tmp_path / "dl", sections=["C4"], progressbar=False)
    assert folder == tmp_path / "dl"
    assert "Downloading 5 files (4.7 MB) of her2st" in caplog.text
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == [
        "data/ST-cnts/C4.tsv.gz",
        "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
        "data/ST-spotfiles/C4_selection.tsv",
        "genes_785.txt",
        "res/ST-cluster/lbl/C4-cluster-annotation.tsv.gz",
        "res/ST-cluster/motivation.csv",
    ]
    assert omx.datasets.her2st(folder, "C4", genes=["GNAS"]).tables["table"].n_obs == 184

    with pytest.warns(omx.OmxWarning, match="A1 has no image"):
        omx.datasets.download_her2st(tmp_path / "dl", sections="A1", progressbar=False)
    with pytest.raises(ValueError, match="H1"):
        omx.datasets.download_her2st(tmp_path / "dl", sections=["H1"])
    with pytest.raises(ValueError, match="url"):
        omx.datasets.download_her2st(tmp_path / "dl", sections=["C4"], url=f"{base}/master.zip")


def test_download_her2st_offline(data_home, offline):
    with pytest.raises(ConnectionError) as err:
        omx.datasets.download_her2st(sections="B4")
    msg = str(err.value)
    assert "https://github.com/almaan/her2st/raw/" in msg and "BT10737_D2_HE.jpg" in msg
    assert str(data_home / "her2st" / "data" / "ST-cnts" / "B4.tsv.gz") in msg


# ------------------------------------------------------------------------------------------------------- Visium
def _spatial_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_untar_spatial_refuses_escapes(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(_spatial_tar({"spatial/ok.json": b"{}", "../evil.txt": b"x"}))
    with pytest.raises(ValueError, match="evil"):
        _untar_spatial(bad, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "spatial").exists()


def test_download_visium_layout(monkeypatch, data_home, no_network):
    """The files in place are laid out as a Space Ranger folder (spatial/ unpacked), without any download."""
    scalefactors = json.dumps({"tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.03}).encode()
    files = {
        "filtered_feature_bc_matrix.h5": b"not really hdf5",
        "spatial.tar.gz": _spatial_tar(
            {"spatial/scalefactors_json.json": scalefactors, "spatial/tissue_positions_list.csv": b"a,1,0,0,1,1\n"}
        ),
        "image.tif": b"II*\0",
    }
    _register(monkeypatch, {k: (v, f"https://x/{k}") for k, v in files.items()}, name="visium_breast_ffpe")
    folder = data_home / "visium_breast_ffpe"
    folder.mkdir(parents=True)
    for k, v in files.items():
        (folder / k).write_bytes(v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert omx.datasets.download_visium("visium_breast_ffpe") == folder
    assert (folder / "spatial" / "scalefactors_json.json").read_bytes() == scalefactors
    (folder / "image.tif").unlink()  # without the full-resolution image, it is not asked for
    assert omx.datasets.download_visium("visium_breast_ffpe", fullres_image=False) == folder
    with pytest.raises(KeyError, match="visium_breast_block_a"):
        omx.datasets.download_visium("her2st")
