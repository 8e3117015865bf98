"""Nucleus segmentation on synthetic H&E images with known nuclei."""

import numpy as np
import pytest
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

import omx


def f1_centroids(true_xy, pred_xy, tol):
    """F1 of one-to-one matches within ``tol`` pixels (greedy by distance)."""
    tree = cKDTree(pred_xy)
    pairs = sorted(
        (
            (d, i, j)
            for i, js in enumerate(tree.query_ball_point(true_xy, tol))
            for j in js
            for d in [np.hypot(*(true_xy[i] - pred_xy[j]))]
        )
    )
    used_t, used_p = set(), set()
    for _, i, j in pairs:
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
    tp = len(used_t)
    return 2 * tp / (len(true_xy) + len(pred_xy))


@pytest.mark.parametrize("chunk_px", [2048, 128])
def test_segment_nuclei_counts_and_f1(chunk_px, synthetic_sdata):
    sdata, centres = synthetic_sdata()
    omx.pp.segment_nuclei(sdata, chunk_px=chunk_px, overlap_px=32, show_progress_bar=False)
    shapes = sdata.shapes["he_nuclei_shapes"]
    pred = np.c_[shapes.geometry.x, shapes.geometry.y]  # pixels (the image's own transformation)
    assert abs(len(pred) - len(centres)) <= 0.1 * len(centres)
    assert f1_centroids(centres, pred, tol=4) >= 0.8
    cells = sdata.tables["omx_cells"]
    assert cells.n_obs == len(pred)
    for col in ("area_um2", "eccentricity", "solidity", "hematoxylin", "eosin", "spot_index", "spot_id"):
        assert col in cells.obs
    assert cells.obs["area_um2"].between(10, 80).mean() > 0.9  # ellipses of ~3.5 x 2.8 um radii: ~30 um^2
    assert "he_nuclei" in sdata.labels
    labels = np.asarray(sdata.labels["he_nuclei"].data)
    assert set(np.unique(labels)) - {0} == set(shapes.index)
    n = sdata.tables["table"].obs["omx_n_nuclei"].to_numpy()
    assert n.sum() == (cells.obs["spot_index"] >= 0).sum()
    assert n.sum() > 0


def test_segment_nuclei_chunking_agrees(synthetic_sdata):
    """Chunk borders neither lose nor duplicate nuclei: small chunks find what one chunk finds."""
    a, _ = synthetic_sdata(seed=1)
    b, _ = synthetic_sdata(seed=1)
    omx.pp.segment_nuclei(a, chunk_px=4096, show_progress_bar=False)
    omx.pp.segment_nuclei(b, chunk_px=96, overlap_px=32, show_progress_bar=False)
    pa = np.c_[a.shapes["he_nuclei_shapes"].geometry.x, a.shapes["he_nuclei_shapes"].geometry.y]
    pb = np.c_[b.shapes["he_nuclei_shapes"].geometry.x, b.shapes["he_nuclei_shapes"].geometry.y]
    assert abs(len(pa) - len(pb)) <= 2
    assert f1_centroids(pa, pb, tol=2) >= 0.97


def test_segment_nuclei_no_spots_and_overwrite(synthetic_sdata):
    sdata, _ = synthetic_sdata(spots=False)
    omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    assert (sdata.tables["omx_cells"].obs["spot_index"] == -1).all()
    with pytest.raises(KeyError, match="overwrite"):
        omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    omx.pp.segment_nuclei(sdata, overwrite=True, show_progress_bar=False)


def test_segment_nuclei_blank_image_errors():
    rgb = np.full((3, 200, 200), 230, np.uint8)
    rgb[0] = 245  # pink-ish, no nuclei
    img = Image2DModel.parse(rgb, dims=("c", "y", "x"))
    sdata = SpatialData(images={"he": img})
    with pytest.raises(ValueError, match="No nuclei"):
        omx.pp.segment_nuclei(sdata, mpp=0.5, threshold=0.05, show_progress_bar=False)


def test_segment_nuclei_round_trip(tmp_path, synthetic_sdata):
    """`sdata.write` copies the labels out of their temporary store: they read back once it is gone."""
    import shutil

    sdata, _ = synthetic_sdata()
    omx.pp.segment_nuclei(sdata, labels_store=tmp_path / "tmp_labels.zarr", show_progress_bar=False)
    labels = sdata.labels["he_nuclei"].values
    sdata.write(tmp_path / "s.zarr")
    shutil.rmtree(tmp_path / "tmp_labels.zarr")
    from spatialdata import read_zarr

    back = read_zarr(tmp_path / "s.zarr")
    assert back.tables["omx_cells"].n_obs == sdata.tables["omx_cells"].n_obs
    np.testing.assert_array_equal(back.labels["he_nuclei"].values, labels)


def test_segment_nuclei_labels_on_disk(tmp_path, monkeypatch, synthetic_sdata):
    """The labels are written chunk by chunk to a temporary zarr array and read back lazily from it."""
    import dask.array as da
    import zarr

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    sdata, _ = synthetic_sdata()
    omx.pp.segment_nuclei(sdata, chunk_px=128, overlap_px=32, show_progress_bar=False)
    data = sdata.labels["he_nuclei"].data
    assert isinstance(data, da.Array) and data.dtype == np.int32
    (store,) = tmp_path.glob("omx_nuclei_*/labels.zarr")
    on_disk = zarr.open_array(str(store), mode="r")
    assert any(isinstance(v, zarr.Array) for v in dict(data.dask).values())  # from_zarr, not an in-memory copy
    labels = np.asarray(data)
    np.testing.assert_array_equal(labels, on_disk[:])
    shapes = sdata.shapes["he_nuclei_shapes"]
    at_centroid = labels[np.round(shapes.geometry.y).astype(int), np.round(shapes.geometry.x).astype(int)]
    np.testing.assert_array_equal(at_centroid, shapes.index.to_numpy())
    assert set(sdata.tables["omx_cells"].obs["cell_id"]) == set(np.unique(labels)) - {0}


def test_segment_nuclei_labels_store(tmp_path, synthetic_sdata):
    import zarr

    sdata, _ = synthetic_sdata()
    omx.pp.segment_nuclei(sdata, labels_store=tmp_path / "labels.zarr", show_progress_bar=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "labels.zarr"))[:], sdata.labels["he_nuclei"].values)
    with pytest.raises(FileExistsError, match="labels_store"):
        omx.pp.segment_nuclei(sdata, labels_store=tmp_path / "labels.zarr", key_added="again", show_progress_bar=False)
