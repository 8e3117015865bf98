"""Tests of omx.io.read_st and read_hest on synthetic folders, the packaged sample and (when present) her2st."""

from __future__ import annotations

import gzip
import logging

import anndata
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
import xarray as xr
from PIL import Image
from scipy import sparse
from spatialdata.transformations import Identity, Scale

import omx
from omx.datasets._her2st import _SAMPLE_DIR
from omx.io import read_st

# Microns per pixel that the her2st README gives: full-resolution B and C images, and A1's downscaled copy.
README_MPP = {"B4": 0.69, "C2": 0.69, "C3": 0.69, "C4": 0.69, "A1": 0.92 * 6954 / 2000}


def _level0(img):
    """Full-resolution level of a single- or multiscale image."""
    return img if isinstance(img, xr.DataArray) else sd.get_pyramid_levels(img, n=0)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def her2st_all(her2st_dir):
    return read_st(her2st_dir)


def _write_study(
    root,
    section="X1",
    *,
    image: np.ndarray | None = None,
    image_name="img.png",
    pitch_px=20.0,
    app_image=False,
):
    """A tiny study in the her2st layout: a 4 x 3 spot grid, one spot only in the counts, one only in the spotfile."""
    xs, ys = np.meshgrid(np.arange(2, 6), np.arange(3, 6))
    xs, ys = xs.ravel(), ys.ravel()
    spots = pd.DataFrame(
        {
            "x": xs,
            "y": ys,
            "new_x": xs.astype(float),
            "new_y": ys.astype(float),
            "pixel_x": 10 + (xs - 2) * pitch_px,
            "pixel_y": 12 + (ys - 3) * pitch_px,
            "selected": 1,
        }
    )
    ids = [f"{x}x{y}" for x, y in zip(xs, ys, strict=True)]
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.poisson(3, size=(len(ids), 4)), index=ids, columns=["G1", "G2", "G3", f"{section}_only"])
    counts.loc["99x99"] = 1  # not in the spotfile
    (root / "data" / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (root / "data" / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "data" / "ST-cnts" / f"{section}.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    extra = pd.DataFrame([[50, 50, 50.0, 50.0, 500.0, 500.0, 1]], columns=spots.columns)  # not in the counts
    pd.concat([spots, extra]).to_csv(root / "data" / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
    if image is None:
        image = np.full((120, 110, 3), 200, dtype=np.uint8)
    if app_image:
        folder = root / "app" / "www" / "imgs"
        image_name = f"{section}_HE_image_dark.png"
    else:
        folder = root / "data" / "ST-imgs" / section[0] / section
    folder.mkdir(parents=True, exist_ok=True)
    if image_name.endswith(".tif"):
        import tifffile

        tifffile.imwrite(folder / image_name, image)
    else:
        Image.fromarray(image).save(folder / image_name)
    return counts.iloc[:-1], spots


# ------------------------------------------------------------------------------------------- synthetic folders
def test_read_st_synthetic_layout(tmp_path, caplog):
    counts, spots = _write_study(tmp_path)
    with caplog.at_level(logging.INFO, logger="omx"):
        sdata = read_st(tmp_path)
    assert "dropped 1 only in the counts and 1 only in the spotfile" in caplog.text
    assert "um per pixel estimated" in caplog.text
    assert set(sdata.images) == {"X1_he"} and set(sdata.shapes) == {"X1_spots"} and set(sdata.tables) == {"table"}
    table = sdata.tables["table"]
    assert table.n_obs == len(spots) == 12
    assert list(table.obs_names[:2]) == ["X1_2x3", "X1_3x3"]
    # 20 px per 200 um step -> 10 um per px; centres in microns
    t = sd.transformations.get_transformation(sdata.images["X1_he"], to_coordinate_system="X1")
    assert isinstance(t, Scale)
    np.testing.assert_allclose(t.scale[-2:], [10.0, 10.0])
    np.testing.assert_allclose(table.obsm["spatial"], spots[["pixel_x", "pixel_y"]].to_numpy() * 10.0)
    assert sparse.isspmatrix_csr(table.X) and table.X.dtype == np.int32
    np.testing.assert_array_equal(table.X.toarray(), counts.to_numpy())
    assert "pathologist_label" not in table.obs and "stereoscope_major" not in table.obsm
    assert sdata.attrs["omx"] == {"units": {"X1": "um"}}


def test_read_st_gene_union_and_subset(tmp_path):
    _write_study(tmp_path, "X1")
    _write_study(tmp_path, "Y1")
    sdata = read_st(tmp_path, ["Y1", "X1"])
    table = sdata.tables["table"]
    assert list(table.obs["section"].cat.categories) == ["Y1", "X1"]
    assert list(table.var_names) == ["G1", "G2", "G3", "Y1_only", "X1_only"]
    x1 = table[table.obs["section"] == "X1"]
    assert x1.X[:, table.var_names.get_loc("Y1_only")].nnz == 0  # absent gene -> 0

    with pytest.warns(omx.OmxWarning, match=r"1 of 3 requested genes were measured in no section.*NOPE"):
        sub = read_st(tmp_path, "X1", genes=["G3", "NOPE", "G1"])
    assert list(sub.tables["table"].var_names) == ["G3", "G1"]


@pytest.mark.parametrize(
    ("image", "name"),
    [
        (np.full((120, 110, 4), 200, dtype=np.uint8), "rgba.png"),
        (np.full((120, 110), 200, dtype=np.uint8), "grey.png"),
        (np.full((120, 110, 3), 200 * 257, dtype=np.uint16), "deep.tif"),
        (np.full((3, 120, 110), 200, dtype=np.uint8), "planar.tif"),
    ],
)
def test_read_st_converts_images(tmp_path, image, name):
    _write_study(tmp_path, image=image, image_name=name)
    level0 = _level0(read_st(tmp_path).images["X1_he"])
    assert level0.dims == ("c", "y", "x") and level0.dtype == np.uint8
    assert list(level0.coords["c"].values) == ["r", "g", "b"]
    assert level0.shape == (3, 120, 110)
    assert int(level0.values.min()) == int(level0.values.max()) == 200


def test_read_st_rejects_unconvertible_image(tmp_path):
    _write_study(tmp_path, image=np.full((120, 110, 3), -5.0, dtype=np.float32), image_name="bad.tif")
    with pytest.raises(ValueError, match="cannot convert"):
        read_st(tmp_path)


def test_read_st_overrides(tmp_path):
    _write_study(tmp_path)
    with pytest.warns(omx.OmxWarning, match="using mpp=5.000 um per pixel; the spot grid suggests 10.000") as record:
        sdata = read_st(tmp_path, mpp={"X1": 5.0}, spot_radius=27.5)
    assert record[0].filename == __file__  # the warning names the caller's line, not omx's
    t = sd.transformations.get_transformation(sdata.images["X1_he"], to_coordinate_system="X1")
    np.testing.assert_allclose(t.scale[-2:], [5.0, 5.0])
    assert (sdata.shapes["X1_spots"]["radius"] == 27.5).all()


def _two_counts_files(root):
    src = root / "data" / "ST-cnts" / "X1.tsv.gz"
    (root / "data" / "ST-cnts" / "X1.tsv").write_bytes(gzip.decompress(src.read_bytes()))


def _jittered_grid(root):
    path = root / "data" / "ST-spotfiles" / "X1_selection.tsv"
    spots = pd.read_csv(path, sep="\t")
    spots["pixel_x"] = np.clip(spots["pixel_x"] + np.random.default_rng(0).normal(0, 15, len(spots)), 0, 100)
    spots.to_csv(path, sep="\t", index=False)


def _duplicated_gene(root):
    path = root / "data" / "ST-cnts" / "X1.tsv.gz"
    counts = pd.read_csv(path, sep="\t", index_col=0)
    counts.columns = ["G1", "G1", "G3", "X1_only"]
    with gzip.open(path, "wt") as fh:
        counts.to_csv(fh, sep="\t")


def _odd_cluster_names(root):
    (root / "res" / "ST-cluster").mkdir(parents=True)
    (root / "res" / "ST-cluster" / "motivation.csv").write_text("a,b,c\nX,1,tumour\n")


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (_two_counts_files, {}, r"X1: 2 counts files found"),
        (_jittered_grid, {}, r"X1: the spot grid fits poorly"),
        (_duplicated_gene, {}, r"X1: 1 duplicated gene names \(e.g. \['G1'\]\); summing them"),
        (_odd_cluster_names, {}, r"unexpected header \['a', 'b', 'c'\]; cluster names are not added"),
        (None, {"image": np.full((30, 30, 3), 200, dtype=np.uint8)}, r"X1: 11 spot centres lie outside the 30 x 30"),
    ],
)
def test_read_st_warns_about_what_to_check(tmp_path, change, kwargs, message):
    _write_study(tmp_path, **kwargs)
    if change is not None:
        change(tmp_path)
    with pytest.warns(omx.OmxWarning, match=message):
        read_st(tmp_path)


def test_read_st_downscaled_app_image(tmp_path):
    _write_study(tmp_path, app_image=True, pitch_px=40.0)
    with pytest.raises(ValueError, match="pixel_scale"):
        read_st(tmp_path)
    sdata = read_st(tmp_path, pixel_scale=0.5)  # spotfile pixels are twice the image's
    t = sd.transformations.get_transformation(sdata.images["X1_he"], to_coordinate_system="X1")
    np.testing.assert_allclose(t.scale[-2:], [10.0, 10.0])


def test_read_st_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ST-cnts"):
        read_st(tmp_path / "nowhere")
    _write_study(tmp_path)
    with pytest.raises(KeyError, match="Available sections"):
        read_st(tmp_path, ["X1", "Z9"])
    with pytest.raises(ValueError, match="positive"):
        read_st(tmp_path, mpp=-1.0)
    (tmp_path / "data" / "ST-imgs" / "X" / "X1" / "img.png").unlink()
    with pytest.raises(FileNotFoundError, match="no H&E image"):
        read_st(tmp_path)


# -------------------------------------------------------------------------------------------- packaged sample
def test_read_st_sample_round_trip(tmp_path):
    sdata = read_st(_SAMPLE_DIR, "C2")
    path = tmp_path / "sample.zarr"
    sdata.write(path)
    back = sd.read_zarr(path)
    assert set(back.images) == {"C2_he"} and set(back.shapes) == {"C2_spots"}
    assert back.attrs["omx"] == {"units": {"C2": "um"}}
    t0, t1 = (
        sd.transformations.get_transformation(s.images["C2_he"], to_coordinate_system="C2").to_affine_matrix(
            input_axes=("x", "y"), output_axes=("x", "y")
        )
        for s in (sdata, back)
    )
    np.testing.assert_allclose(t0, t1)
    assert t1[0, 0] == pytest.approx(2.0, rel=0.01)
    a, b = sdata.tables["table"], back.tables["table"]
    assert sparse.issparse(b.X) and b.X.dtype == np.int32
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.obsm["stereoscope_minor"], b.obsm["stereoscope_minor"])
    np.testing.assert_array_equal(_level0(back.images["C2_he"]).values, _level0(sdata.images["C2_he"]).values)
    assert b.uns["spatialdata_attrs"]["region"] == ["C2_spots"]


# ---------------------------------------------------------------------------------------------- real her2st data
def test_her2st_layout(her2st_all):
    sdata = her2st_all
    sections = ["A1", "B4", "C2", "C3", "C4"]
    assert set(sdata.images) == {f"{s}_he" for s in sections}
    assert set(sdata.shapes) == {f"{s}_spots" for s in sections}
    assert set(sdata.tables) == {"table"}
    assert sdata.attrs["omx"]["units"] == dict.fromkeys(sections, "um")
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == [f"{s}_spots" for s in sections]
    assert attrs["region_key"] == "region" and attrs["instance_key"] == "spot_id"
    assert sparse.isspmatrix_csr(table.X) and table.X.dtype == np.int32
    assert table.n_vars > 15000 and table.var_names.is_unique
    n_spots = {"A1": 346, "B4": 283, "C2": 187, "C3": 180, "C4": 184}
    assert table.obs["section"].value_counts().to_dict() == n_spots
    assert dict(zip(table.obs["section"], table.obs["patient"], strict=True)) == {s: s[0] for s in sections}

    for s in sections:
        img = sdata.images[f"{s}_he"]
        level0 = _level0(img)
        assert level0.dtype == np.uint8 and level0.dims == ("c", "y", "x")
        assert min(sd.get_pyramid_levels(img, n=len(img.children) - 1).shape[1:]) < 1000
        t = sd.transformations.get_transformation(img, get_all=True)
        assert list(t) == [s] and isinstance(t[s], Scale)
        mpp = t[s].scale[-1]
        assert mpp == pytest.approx(README_MPP[s], rel=0.05)

        shapes = sdata.shapes[f"{s}_spots"]
        assert isinstance(sd.transformations.get_transformation(shapes, to_coordinate_system=s), Identity)
        assert (shapes["radius"] == 50.0).all()
        rows = table.obs["section"] == s
        np.testing.assert_array_equal(table.obs.loc[rows, "spot_id"], shapes.index)
        assert (table.obs.loc[rows, "region"] == f"{s}_spots").all()
        np.testing.assert_allclose(table.obsm["spatial"][rows.to_numpy()], shapes.geometry.get_coordinates().to_numpy())
        # every spot centre lies on the image (in microns: pixels x mpp)
        h, w = level0.shape[1:]
        xy = table.obsm["spatial"][rows.to_numpy()]
        assert xy.min() >= 0 and (xy[:, 0] < w * mpp).all() and (xy[:, 1] < h * mpp).all()

    # spot pitch: spots one array step apart are 200 um apart on every section (the mpp estimate in action)
    for s in sections:
        rows = (table.obs["section"] == s).to_numpy()
        xy = table.obsm["spatial"][rows]
        pos = {(x, y): i for i, (x, y) in enumerate(table.obs.loc[rows, ["array_x", "array_y"]].itertuples(False))}
        steps = [np.linalg.norm(xy[pos[(x + 1, y)]] - xy[i]) for (x, y), i in pos.items() if (x + 1, y) in pos]
        assert np.median(steps) == pytest.approx(200, rel=0.05)


def test_her2st_table_matches_shapes(her2st_all):
    table = sd.match_table_to_element(her2st_all, element_name="C3_spots", table_name="table")
    assert table.n_obs == 180 and (table.obs["section"] == "C3").all()


def test_her2st_labels_clusters_proportions(her2st_all):
    table = her2st_all.tables["table"]
    obs = table.obs
    a1 = obs["section"] == "A1"
    assert obs.loc[a1, "pathologist_label"].notna().all()
    assert obs.loc[~a1, "pathologist_label"].isna().all()
    assert {"invasive cancer", "immune infiltrate"} <= set(obs["pathologist_label"].dropna())
    for s, n in {"A1": 345, "B4": 222, "C2": 185, "C3": 179, "C4": 184}.items():
        assert obs.loc[obs["section"] == s, "cluster"].notna().sum() == n
    assert obs["cluster_annotation"].notna().sum() > 1000
    for key, n_types in (("stereoscope_major", 8), ("stereoscope_minor", 22)):
        props = table.obsm[key]
        assert isinstance(props, pd.DataFrame) and props.shape == (table.n_obs, n_types)
        assert (props.index == table.obs_names).all()
        np.testing.assert_allclose(props.dropna().sum(axis=1), 1.0, atol=1e-4)
        assert props.dropna().shape[0] == table.n_obs
    assert "NK cells" in table.obsm["stereoscope_minor"].columns  # trailing space stripped


def test_her2st_counts_match_files(her2st_dir, her2st_all):
    table = her2st_all.tables["table"]
    raw = pd.read_csv(her2st_dir / "data" / "ST-cnts" / "C4.tsv.gz", sep="\t", index_col=0)
    sub = table[table.obs["section"] == "C4"]
    ids = [n.split("_", 1)[1] for n in sub.obs_names]
    genes = ["ERBB2", "GNAS", raw.columns[0]]
    np.testing.assert_array_equal(sub[:, genes].X.toarray(), raw.loc[ids, genes].to_numpy())


# ------------------------------------------------------------------------------------------------------ HEST-1k
@pytest.fixture(scope="module")
def c2_sample():
    return omx.datasets.her2st_sample("C2")


def test_read_hest_layout(tmp_path, c2_sample, hest_folder, caplog):
    written = hest_folder(tmp_path, c2_sample, "C2", ids=("S1", "S2"))
    with caplog.at_level(logging.INFO, logger="omx"):
        sdata = omx.io.read_hest(tmp_path)
    assert set(sdata.images) == {"S1_he", "S2_he"} and set(sdata.shapes) == {"S1_spots", "S2_spots"}
    assert sdata.attrs["omx"] == {"units": {"S1": "um", "S2": "um"}}
    assert "um per pixel (pixel_size_um_estimated of" in caplog.text
    table = sdata.tables["table"]
    assert table.X.dtype == np.int32 and sparse.issparse(table.X)
    assert list(table.var_names) == written["genes"]
    assert table.obs["patient"].tolist() == ["P_S1"] * 187 + ["P_S2"] * 187
    assert table.obs_names[0] == "S1_" + f"{table.obs['array_x'].iloc[0]}x{table.obs['array_y'].iloc[0]}"
    assert set(table.obs["in_tissue"].astype(int)) == {1}
    c2 = c2_sample.tables["table"]
    for s in ("S1", "S2"):
        rows = (table.obs["section"] == s).to_numpy()
        assert (table.X[rows] != c2.X).nnz == 0
        np.testing.assert_allclose(table.obsm["spatial"][rows], written["centres_um"], atol=1e-6)
        spots = sdata.shapes[f"{s}_spots"]
        np.testing.assert_allclose(np.c_[spots.geometry.x, spots.geometry.y], c2.obsm["spatial"], atol=1e-6)
        assert np.all(spots["radius"] == 50.0)
        img = sdata.images[f"{s}_he"]
        assert len(img) == 3  # the TIFF's own levels
        level0 = sd.get_pyramid_levels(img, n=0)
        assert not isinstance(level0.data, np.ndarray)  # lazy
        np.testing.assert_array_equal(level0.values.transpose(1, 2, 0), written["image"])
        np.testing.assert_array_equal(
            sd.get_pyramid_levels(img, n=2).values.transpose(1, 2, 0), written["image"][::4, ::4]
        )
        affine = sd.transformations.get_transformation(img, to_coordinate_system=s).to_affine_matrix(
            input_axes=("x", "y"), output_axes=("x", "y")
        )
        assert affine[0, 0] == pytest.approx(written["mpp"]) and affine[1, 1] == pytest.approx(written["mpp"])
    # the spots land on the same tissue: the pixels under the centres equal the sample's
    px = np.round(written["centres_um"] / written["mpp"]).astype(int)
    ours = sd.get_pyramid_levels(sdata.images["S2_he"], n=0).values[:, px[:, 1], px[:, 0]]
    theirs = sd.get_pyramid_levels(c2_sample.images["C2_he"], n=0).values[:, px[:, 1], px[:, 0]]
    np.testing.assert_array_equal(ours, theirs)


def test_read_hest_round_trip_and_fit_predict(tmp_path, c2_sample, hest_folder):
    hest_folder(tmp_path / "hest", c2_sample, "C2", ids=("S1", "S2"), n_levels=1)
    sdata = omx.io.read_hest(tmp_path / "hest", ["S2", "S1"])
    assert list(sdata.tables["table"].obs["section"].cat.categories) == ["S2", "S1"]
    assert len(sdata.images["S1_he"]) == 2  # one level in the file: spatialdata halves it
    sdata.write(tmp_path / "hest.zarr")
    back = sd.read_zarr(tmp_path / "hest.zarr")
    np.testing.assert_array_equal(
        sd.get_pyramid_levels(back.images["S1_he"], n=0).values, sd.get_pyramid_levels(sdata.images["S1_he"], n=0)
    )
    omx.tl.fit_predict(back, train="S1", predict="S2", model="ridge", show_progress_bar=False)
    table = back.tables["table"]
    assert np.isfinite(table.layers["omx_pred"][(table.obs["section"] == "S2").to_numpy()]).all()


def test_read_hest_gene_intersection(tmp_path, c2_sample, hest_folder, caplog):
    genes = list(c2_sample.tables["table"].var_names)
    hest_folder(tmp_path, c2_sample, "C2", ids=("S1", "S2"), genes={"S1": genes[:500], "S2": genes[100:]})
    with caplog.at_level(logging.INFO, logger="omx"):
        sdata = omx.io.read_hest(tmp_path)
    assert list(sdata.tables["table"].var_names) == genes[100:500]
    assert "Keeping the 400 genes that all 2 samples measured; 385 measured in only some" in caplog.text
    X = sdata.tables["table"].X
    ref = c2_sample.tables["table"].X
    assert (X[:187] != ref[:, 100:500]).nnz == 0 and (X[187:] != ref[:, 100:500]).nnz == 0
    with pytest.warns(omx.OmxWarning, match="1 of 3 requested genes are not measured in every sample"):
        sub = omx.io.read_hest(tmp_path, genes=[genes[300], genes[0], genes[200]])
    assert list(sub.tables["table"].var_names) == [genes[300], genes[200]]


def test_read_hest_pixel_size_sources(tmp_path, c2_sample, hest_folder, caplog):
    written = hest_folder(tmp_path, c2_sample, "C2", ids=("S1",))
    paths = written["paths"]
    csv = pd.read_csv(paths["csv"])
    csv["pixel_size_um_estimated"] = 1.5
    csv.to_csv(paths["csv"], index=False)

    def mpp_of(sdata):
        return sd.transformations.get_transformation(sdata.images["S1_he"], to_coordinate_system="S1").scale[0]

    assert mpp_of(omx.io.read_hest(tmp_path)) == pytest.approx(written["mpp"])  # the json wins
    paths["S1"]["json"].unlink()
    with caplog.at_level(logging.INFO, logger="omx"):
        sdata = omx.io.read_hest(tmp_path)
    assert mpp_of(sdata) == pytest.approx(1.5) and "pixel_size_um_estimated of HEST_v1_1_0.csv" in caplog.text
    assert sdata.shapes["S1_spots"]["radius"].iloc[0] == 50.0  # spot_diameter from the csv
    assert mpp_of(omx.io.read_hest(tmp_path, mpp={"S1": 0.25})) == pytest.approx(0.25)
    csv = csv.drop(columns=["pixel_size_um_estimated"])
    csv["pixel_size_um_embedded"] = 0.75
    csv.to_csv(paths["csv"], index=False)
    assert mpp_of(omx.io.read_hest(tmp_path)) == pytest.approx(0.75)
    paths["csv"].unlink()
    with pytest.raises(ValueError, match=r"S1: no pixel size.*metadata/S1\.json.*`mpp=`"):
        omx.io.read_hest(tmp_path)


def test_read_hest_errors(tmp_path, c2_sample, hest_folder):
    with pytest.raises(FileNotFoundError, match="does not look like a HEST-1k folder"):
        omx.io.read_hest(tmp_path)
    written = hest_folder(tmp_path, c2_sample, "C2", ids=("S1", "S2"))
    with pytest.raises(KeyError, match=r"\['S3'\].*Available samples: \['S1', 'S2'\]"):
        omx.io.read_hest(tmp_path, ["S1", "S3"])
    with pytest.raises(ValueError, match="listed twice"):
        omx.io.read_hest(tmp_path, ["S1", "S1"])
    with pytest.raises(ValueError, match="`mpp` for S1 must be a positive number"):
        omx.io.read_hest(tmp_path, "S1", mpp=-1)
    written["paths"]["S2"]["wsi"].unlink()
    with pytest.raises(FileNotFoundError, match=r"S2: no whole-slide image .*wsis/S2\.tif"):
        omx.io.read_hest(tmp_path)
    a = anndata.read_h5ad(written["paths"]["S1"]["h5ad"])
    a.X = a.X * 0.5
    a.write_h5ad(written["paths"]["S1"]["h5ad"])
    with pytest.raises(ValueError, match=r"S1 \(.*S1\.h5ad\): the counts are not integers"):
        omx.io.read_hest(tmp_path, "S1")
