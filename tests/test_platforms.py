"""10x Visium, Visium HD and Xenium objects as spatialdata-io makes them go through omx with no extra arguments.

The folders are written in 10x's own layout from the packaged sample (`omx.datasets.write_sample_visium`, ...) and
read with spatialdata-io itself, so a change of either side's layout shows here.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy import sparse

import omx
from omx.pp._spots import image_mpp

sio = pytest.importorskip("spatialdata_io")

SAMPLE_MPP = 2.0  # the packaged sample's images: about 2 um per pixel


@pytest.fixture(scope="module")
def sample():
    return omx.datasets.her2st_sample()


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    root = tmp_path_factory.mktemp("visium")
    objs = []
    for s in ("C2", "C3", "C4"):
        folder = omx.datasets.write_sample_visium(root, s)
        objs.append(sio.visium(folder, fullres_image_file=f"{s}_full_image.tif"))
    return sd.concatenate(objs, concatenate_tables=True)


@pytest.fixture(scope="module")
def visium_hd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hd")
    for s in ("C2", "C3"):
        omx.datasets.write_sample_visium_hd(root, s, crop_um=400)
    return root


@pytest.fixture(scope="module")
def visium_hd_folder(visium_hd_root):
    return visium_hd_root / "C2"


def _read_hd(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sio.visium_hd(folder, load_segmentations_only=False, **kw)


# ------------------------------------------------------------------------------------------------------ Visium
def test_visium_folder_holds_the_sample(visium, sample):
    table = visium.tables["table"]
    assert set(table.obs["region"]) == {"C2", "C3", "C4"} and "section" not in table.obs
    ref = sample.tables["table"]
    for s in ("C2", "C3", "C4"):
        ours = table[table.obs["region"] == s]
        theirs = ref[ref.obs["section"] == s]
        np.testing.assert_array_equal(sparse.csr_matrix(ours.X).toarray(), theirs.X.toarray())


def test_visium_spots_resolve_without_arguments(visium, sample, caplog):
    with caplog.at_level(logging.INFO, logger="omx"):
        spots = omx.pp.resolve_spots(visium, shapes_key="C3")
    assert spots.image_key == "C3_full_image"  # finer than hires and lowres
    assert spots.mpp == pytest.approx(SAMPLE_MPP, rel=0.01)
    assert spots.diameter_um == pytest.approx(55.0, rel=0.01)
    assert "Visium's 55 um spots" in caplog.text and "C3_hires_image" in caplog.text
    # the spots sit where the sample's are, to the pixel that Space Ranger rounds to
    ref = omx.pp.resolve_spots(sample, shapes_key="C3_spots")
    np.testing.assert_allclose(spots.centers, ref.centers, atol=0.75)
    assert (spots.table_rows >= 0).all()


def test_visium_scale_survives_concatenate_without_attrs(visium):
    """spatialdata.concatenate drops attrs by default: the spots' coordinate systems still mark Visium."""
    assert "spatialdata_io_reader" not in visium.attrs
    assert image_mpp(visium, visium.images["C2_full_image"]) == pytest.approx(SAMPLE_MPP, rel=0.01)
    # the hires image's pixels are coarser by the scale factor
    hires = image_mpp(visium, visium.images["C2_hires_image"])
    assert hires == pytest.approx(SAMPLE_MPP * 2193 / 2000, rel=0.01)


def test_visium_fit_predict_and_cross_validate(visium):
    omx.tl.fit_predict(visium, train=["C2", "C3"], predict=["C4"], model="ridge", show_progress_bar=False)
    table = visium.tables["table"]
    pred = table.layers["omx_pred"]
    c4 = (table.obs["region"] == "C4").to_numpy()
    predicted = np.isfinite(pred[c4]).all(axis=0)  # genes without counts in training are left NaN
    assert predicted.sum() >= 780 and np.isnan(pred[~c4]).all()
    scores = omx.get.scores(visium, "omx_pred")
    assert scores["pearson"].mean() > 0.1  # image features carry signal on real tissue (~0.2 measured)
    cv = omx.tl.cross_validate(visium, model="ridge", key_added=None, show_progress_bar=False)
    assert sorted(cv["fold"]) == ["C2", "C3", "C4"]


def test_visium_deconvolve(visium, sample):
    ref = sample.tables["table"]
    visium.tables["table"].obsm["stereoscope_major"] = pd.DataFrame(
        np.asarray(ref.obsm["stereoscope_major"]),
        index=visium.tables["table"].obs_names,
        columns=ref.obsm["stereoscope_major"].columns,
    )
    signatures = omx.tl.signatures_from_proportions(visium, sections=["C2", "C3"])
    omx.tl.deconvolve(visium, signatures, sections=["C4"], n_cells_key=None, max_rounds=10, show_progress_bar=False)
    props = visium.tables["table"].obsm["omx_proportions"]
    c4 = (visium.tables["table"].obs["region"] == "C4").to_numpy()
    np.testing.assert_allclose(props.to_numpy()[c4].sum(axis=1), 1.0, atol=1e-5)


def test_visium_nuclei_on_the_full_resolution_image(tmp_path):
    folder = omx.datasets.write_sample_visium(tmp_path, "C4")
    sdata = sio.visium(folder, fullres_image_file="C4_full_image.tif")
    omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    assert "C4_full_image_nuclei" in sdata.labels  # not the hires or lowres copy
    assert "omx_n_nuclei" in sdata.tables["table"].obs


def test_equal_images_are_a_real_choice(visium):
    """Two images of the same pixel size: the error lists both and the argument to pass."""
    sub = sd.SpatialData(
        images={"a": visium.images["C2_full_image"], "b": visium.images["C2_full_image"]},
        shapes={"C2": visium.shapes["C2"]},
    )
    with pytest.raises(KeyError, match=r"\['a', 'b'\].*image_key="):
        omx.pp.resolve_spots(sub, mpp=2.0)


def test_unknown_scale_names_the_fix(visium):
    """Circles in pixels of a platform omx cannot tell: the error says to pass mpp=, not an argument tl lacks."""
    from spatialdata.transformations import Identity, set_transformation

    shapes = visium.shapes["C2"].copy()
    set_transformation(shapes, {"px": Identity()}, set_all=True)
    image = sd.deepcopy(visium.images["C2_full_image"])
    set_transformation(image, {"px": Identity()}, set_all=True)
    sub = sd.SpatialData(images={"img": image}, shapes={"spots": shapes})
    with pytest.raises(ValueError, match=r"Pass `mpp=`") as err:
        omx.pp.resolve_spots(sub)
    assert "spot_diameter_um" not in str(err.value)
    assert omx.pp.resolve_spots(sub, mpp=2.0).mpp == 2.0


# --------------------------------------------------------------------------------------------------- Visium HD
@pytest.mark.parametrize("size", [2, 8, 16])
def test_visium_hd_bins_resolve(visium_hd_folder, size):
    sdata = _read_hd(visium_hd_folder, bin_size=size)
    spots = omx.pp.resolve_spots(sdata)  # one bin size: nothing to choose
    assert spots.shapes_key == f"C2_square_{size:03d}um"
    assert spots.image_key == "C2_full_image"
    assert spots.mpp == pytest.approx(SAMPLE_MPP, rel=0.01)
    assert spots.diameter_um == pytest.approx(size * 2 / np.sqrt(np.pi), rel=0.01)  # a square's equal-area circle


def test_visium_hd_bins_sum_to_spots(visium_hd_folder, sample):
    sdata = _read_hd(visium_hd_folder)
    totals = {k: float(t.X.sum()) for k, t in sdata.tables.items()}
    assert len(set(totals.values())) == 1  # 8 and 16 um bins are sums of 2 um bins
    assert totals["square_002um"] <= float(sample.tables["table"].X.sum())


def test_visium_hd_defaults_to_8um_bins(visium_hd_folder, visium, caplog, tmp_path):
    sdata = _read_hd(visium_hd_folder)
    with caplog.at_level(logging.INFO, logger="omx"):
        spots = omx.pp.resolve_spots(sdata)
    assert spots.table_key == "square_008um" and "table_key=" in caplog.text
    model = omx.models.Ridge(show_progress_bar=False)
    omx.tl.fit_predict(
        visium, train=["C2", "C3"], predict=["C4"], model=model, key_added="for_hd", show_progress_bar=False
    )
    path = tmp_path / "ridge"
    model.save(path)
    omx.tl.predict_expression(sdata, omx.models.Model.load(path), show_progress_bar=False)
    pred = sdata.tables["square_008um"].layers["omx_pred"]
    assert pred.shape == sdata.tables["square_008um"].shape and np.isfinite(pred).all(axis=0).sum() >= 780
    assert "omx_pred" not in sdata.tables["square_016um"].layers


def test_visium_hd_too_few_counts_says_what_to_do(visium_hd_root):
    """Bins with too few UMIs: the error names the remedies instead of fitting on nothing (2 um bins hold ~5)."""
    sdata = sd.concatenate([_read_hd(visium_hd_root / s, bin_size=2) for s in ("C2", "C3")], concatenate_tables=True)
    with pytest.raises(ValueError, match=r"min_counts=.*square_008um"):
        omx.tl.fit_predict(
            sdata, train=["C2_square_002um"], predict=["C3_square_002um"], model="ridge", show_progress_bar=False
        )


# ----------------------------------------------------------------------------------------------------- Xenium
@pytest.fixture(scope="module")
def xenium():
    return omx.datasets.sample_xenium("C4")


def test_xenium_cells_on_the_he(xenium, sample):
    spots = omx.pp.resolve_spots(xenium)
    assert spots.image_key == "he_image"  # not the fluorescence morphology image
    assert spots.shapes_key == "cell_boundaries" and spots.table_key == "table"
    assert spots.mpp == pytest.approx(SAMPLE_MPP, rel=0.01)  # Xenium's shapes are in microns
    assert spots.diameter_um == pytest.approx(12.0, rel=0.02)
    # rows follow cell ids, though the table annotates the labels
    table = xenium.tables["table"]
    np.testing.assert_array_equal(table.obs_names[spots.table_rows], spots.index)
    # through the alignment's rotation, every cell lands inside a measured spot of the sample's H&E
    ref = omx.pp.resolve_spots(sample, shapes_key="C4_spots")
    d = np.sqrt(((spots.centers[:, None] - ref.centers[None]) ** 2).sum(-1)).min(axis=1) * spots.mpp
    assert d.max() <= 50.0 + 4.5  # spot radius + the cells' jitter


def test_xenium_prediction_and_nuclei(xenium, visium, tmp_path):
    genes = [g for g in xenium.tables["table"].var_names if g in visium.tables["table"].var_names]
    assert len(genes) == xenium.tables["table"].n_vars
    model = omx.models.Ridge(show_progress_bar=False)
    omx.tl.fit_predict(
        visium,
        train=["C2", "C3"],
        predict=["C4"],
        model=model,
        genes=genes,
        key_added="xenium_panel",
        show_progress_bar=False,
    )
    omx.tl.predict_expression(xenium, model, show_progress_bar=False)
    pred = xenium.tables["table"].layers["omx_pred"]
    assert pred.shape == (xenium.tables["table"].n_obs, len(genes)) and np.isfinite(pred).all()
    omx.pp.segment_nuclei(xenium, show_progress_bar=False)
    assert "he_image_nuclei" in xenium.labels and "morphology_focus_nuclei" not in xenium.labels
    assert "omx_n_nuclei" in xenium.tables["table"].obs


def test_reader_attrs_survive_write(xenium, tmp_path):
    small = sd.SpatialData(
        images={"he_image": xenium.images["he_image"]},
        shapes={"cell_boundaries": xenium.shapes["cell_boundaries"]},
        attrs=dict(xenium.attrs),
    )
    small.write(tmp_path / "x.zarr")
    back = sd.read_zarr(tmp_path / "x.zarr")
    assert back.attrs.get("spatialdata_io_reader") == "xenium"
    assert image_mpp(back, back.images["he_image"]) == pytest.approx(SAMPLE_MPP, rel=0.01)


def test_visium_hd_nuclei_and_deconvolution(visium_hd_folder, sample):
    sdata = _read_hd(visium_hd_folder)
    omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    assert "C2_full_image_nuclei" in sdata.labels
    assert "omx_n_nuclei" in sdata.tables["square_008um"].obs  # the default bins, not the 2 or 16 um ones
    assert "omx_n_nuclei" not in sdata.tables["square_016um"].obs
    signatures = omx.tl.signatures_from_proportions(sample, sections=["C3"])
    omx.tl.deconvolve(sdata, signatures, max_rounds=10, show_progress_bar=False)
    props = sdata.tables["square_008um"].obsm["omx_proportions"].to_numpy()
    done = np.isfinite(props).all(axis=1)
    assert done.mean() > 0.9 and np.allclose(props[done].sum(axis=1), 1.0, atol=1e-5)


def test_xenium_samples_concatenated(sample):
    """Two Xenium runs joined by spatialdata.concatenate (suffixed names, attrs dropped) train and predict."""
    with omx.settings.override(verbosity="warning"):
        x = sd.concatenate({s: omx.datasets.sample_xenium(s) for s in ("C2", "C3")}, concatenate_tables=True)
    assert not x.attrs
    spots = omx.pp.resolve_spots(x, shapes_key="cell_boundaries-C3")
    assert spots.image_key == "he_image-C3" and spots.mpp == pytest.approx(SAMPLE_MPP, rel=0.01)
    assert (spots.table_rows >= 0).all()
    omx.tl.fit_predict(
        x,
        train=["cell_labels-C2"],
        predict=["cell_labels-C3"],
        model="ridge",
        min_counts=1,
        show_progress_bar=False,
    )
    table = x.tables["table"]
    c3 = (table.obs["region"] == "cell_labels-C3").to_numpy()
    assert np.isfinite(table.layers["omx_pred"][c3]).any(axis=1).all() and np.isnan(table.layers["omx_pred"][~c3]).all()
    genes = list(table.var_names)
    signatures = omx.tl.signatures_from_proportions(sample, sections=["C4"], genes=genes)
    omx.tl.deconvolve(x, signatures, n_cells_key=None, max_rounds=10, show_progress_bar=False)
    assert x.tables["table"].obsm["omx_proportions"].shape == (table.n_obs, signatures.n_obs)
