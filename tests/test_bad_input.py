"""Bad input gets a clear error that names the problem and the fix, never a silent wrong answer.

Each case breaks one thing in a fresh toy object and runs the call a user would; the error must be of the
expected type and its message must name the problem. Cases that are handled correctly instead assert the result.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely

import omx


def _fresh():
    return omx.datasets.toy_sdata(seed=0)


def _fit(sdata, **kw):
    kw = {"train": ["S1"], "predict": ["S2"], "model": "ridge", "show_progress_bar": False, **kw}
    return omx.tl.fit_predict(sdata, **kw)


def _nan_coordinate(s):
    g = s.shapes["S2_spots"]
    g.loc[g.index[0], "geometry"] = shapely.Point(np.nan, np.nan)


def _duplicate_shapes_index(s):
    g = s.shapes["S2_spots"]
    idx = g.index.tolist()
    idx[1] = idx[0]
    g.index = idx


def _instance_key(s):
    t = s.tables["table"]
    return t, t.uns["spatialdata_attrs"]["instance_key"]


def _drop_instance_column(s):
    t, key = _instance_key(s)
    del t.obs[key]


def _duplicate_instance_ids(s):
    t, key = _instance_key(s)
    ids = t.obs[key].to_numpy().copy()
    ids[1] = ids[0]
    t.obs[key] = ids


def _log_normalise(s):
    t = s.tables["table"]
    X = t.X.toarray().astype(float)
    t.X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)


# (case, how to break the object, keywords of the call, error type, the words the message must hold)
CASES = [
    ("NaN spot coordinates", _nan_coordinate, {}, ValueError, r"NaN or infinite coordinates"),
    ("duplicated shapes index", _duplicate_shapes_index, {}, ValueError, r"duplicated index values"),
    ("missing instance-key column", _drop_instance_column, {}, KeyError, r"no obs column 'spot_id'.*instance key"),
    ("duplicated instance ids", _duplicate_instance_ids, {}, ValueError, r"same instance id"),
    ("log-normalised counts in X", _log_normalise, {}, ValueError, r"non-integer values.*layer="),
    ("genes=[]", None, {"genes": []}, ValueError, r"genes=\[\] selects no gene"),
    ("mpp as a string", None, {"mpp": "1"}, TypeError, r"mpp .* must be a number, got '1'"),
    ("mpp zero", None, {"mpp": 0}, ValueError, r"must be positive"),
    ("mpp NaN", None, {"mpp": float("nan")}, ValueError, r"must be positive"),
    ("context=[]", None, {"context": []}, ValueError, r"context must hold positive multiples"),
    ("context=[nan]", None, {"context": [float("nan")]}, ValueError, r"context must hold positive multiples"),
    ("context=[-1]", None, {"context": [-1]}, ValueError, r"context must hold positive multiples"),
    ("size_um=0", None, {"size_um": 0}, ValueError, r"size_um must be a positive"),
]


@pytest.mark.parametrize(("case", "breaks", "kwargs", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_fit_predict_refuses(case, breaks, kwargs, error, message):
    sdata = _fresh()
    if breaks is not None:
        breaks(sdata)
    with pytest.raises(error, match=message):
        _fit(sdata, **kwargs)
    assert "omx_pred" not in sdata.tables["table"].layers  # nothing half-written


@pytest.fixture(scope="module")
def saved_ridge(tmp_path_factory):
    sdata = _fresh()
    model = omx.models.Ridge(show_progress_bar=False)
    _fit(sdata, model=model)
    path = tmp_path_factory.mktemp("models") / "ridge"
    model.save(path)
    return path, list(model.meta_["genes"])


def test_saved_model_matches_genes_by_name(saved_ridge):
    """A table with a renamed gene: an error names it; genes= writes the others into their own columns."""
    path, genes = saved_ridge
    sdata = _fresh()
    table = sdata.tables["table"]
    renamed = genes[7]
    table.var_names = [("OTHER7" if g == renamed else g) for g in table.var_names]
    with pytest.raises(KeyError, match=rf"lacks 1 of the {len(genes)} genes.*{renamed}.*genes="):
        omx.tl.predict_expression(sdata, path, shapes_key="S2_spots", show_progress_bar=False)
    assert "omx_pred" not in table.layers
    present = [g for g in genes if g in table.var_names]
    omx.tl.predict_expression(sdata, path, shapes_key="S2_spots", genes=present, show_progress_bar=False)
    pred = table.layers["omx_pred"]
    s2 = (table.obs["section"] == "S2").to_numpy()
    assert np.isnan(pred[:, table.var_names.get_loc("OTHER7")]).all()  # never gene_7's values under OTHER7
    # every other gene's column holds exactly what the model predicts for that gene
    full = omx.tl.predict_expression(_fresh(), path, shapes_key="S2_spots", inplace=False, show_progress_bar=False)
    for g in present[:5]:
        np.testing.assert_allclose(pred[s2, table.var_names.get_loc(g)], full[:, g].X.ravel(), rtol=1e-6)


def test_predict_genes_argument_checks(saved_ridge):
    path, _ = saved_ridge
    with pytest.raises(KeyError, match="does not predict genes"):
        omx.tl.predict_expression(_fresh(), path, shapes_key="S2_spots", genes=["NOPE"], show_progress_bar=False)
    with pytest.raises(ValueError, match=r"genes=\[\]"):
        omx.tl.predict_expression(_fresh(), path, shapes_key="S2_spots", genes=[], show_progress_bar=False)


def test_deconvolve_refuses_a_type_without_profile():
    """A cell type whose signature is all zeros would take a share of every spot (17.5 % measured): refused."""
    sdata = omx.datasets.her2st_sample()
    signatures = omx.tl.signatures_from_proportions(sdata, sections=["C2"])
    X = np.asarray(signatures.X, dtype=float).copy()
    X[0] = 0
    signatures.X = X
    with pytest.raises(ValueError, match=rf"Cell types \['{signatures.obs_names[0]}'\] express none"):
        omx.tl.deconvolve(sdata, signatures, sections=["C3"], n_cells_key=None, max_rounds=10, show_progress_bar=False)
    assert "omx_proportions" not in sdata.tables["table"].obsm


# ------------------------------------------------------------------------------------------ images that are not H&E
def _with_image(values: np.ndarray | None = None, *, crop: int | None = None):
    """The toy object with ``S1_he`` replaced by ``values`` (its pixels converted) or cropped to ``crop`` px."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    sdata = _fresh()
    level0 = sd.get_pyramid_levels(sdata.images["S1_he"], n=0)
    rgb = np.asarray(level0.values) if values is None else values
    if crop is not None:
        rgb = rgb[:, :crop, :crop]
    transformations = sd.transformations.get_transformation(level0, get_all=True)
    sdata.images["S1_he"] = Image2DModel.parse(
        rgb, dims=("c", "y", "x"), transformations=transformations, scale_factors=[2]
    )
    return sdata


@pytest.fixture(scope="module")
def toy_rgb():
    import spatialdata as sd

    return np.asarray(sd.get_pyramid_levels(_fresh().images["S1_he"], n=0).values)


def _patches(sdata):
    return omx.pp.extract_patches(sdata, shapes_key="S1_spots", image_key="S1_he", size_px=32)


# (case, how the uint8 image is converted, the warning it must give or None)
SAME_AS_UINT8 = [
    ("uint16 holding 0-255", lambda a: a.astype(np.uint16), "read as 8-bit values"),
    ("uint16 full range", lambda a: a.astype(np.uint16) * 257, None),
    ("uint16 of a 12-bit scanner", lambda a: (a.astype(np.uint32) * 4095 // 255).astype(np.uint16), "12-bit"),
    ("float in [0, 1]", lambda a: a.astype(np.float32) / 255, None),
    ("float in [0, 255]", lambda a: a.astype(np.float64), None),
]


@pytest.mark.parametrize(("case", "convert", "warning"), SAME_AS_UINT8, ids=[c[0] for c in SAME_AS_UINT8])
def test_image_values_read_once_per_image(case, convert, warning, toy_rgb, recwarn):
    ref = _patches(_with_image(toy_rgb))
    patches = _patches(_with_image(convert(toy_rgb)))
    np.testing.assert_array_equal(patches, ref)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, omx.OmxWarning)]
    if warning is None:
        assert not messages
    else:
        assert any(warning in m and "'S1_he'" in m for m in messages), messages


def test_uint16_holding_8_bit_values_gives_the_uint8_features(toy_rgb):
    # chunk by chunk, as `encode` streams them: every chunk reads the image with the same scale
    encoder = omx.encoders.HandcraftedEncoder(patch_px=32)
    kw = {"shapes_key": "S1_spots", "image_key": "S1_he", "size_um": 55, "chunk_spots": 9}
    ref = omx.pp.encode(_with_image(toy_rgb), encoder, **kw)
    with pytest.warns(omx.OmxWarning, match="read as 8-bit values"):
        got = omx.pp.encode(_with_image(toy_rgb.astype(np.uint16)), encoder, **kw)
    np.testing.assert_array_equal(got, ref)


# (case, how the uint8 image is broken, the words the error must hold)
BAD_IMAGES = [
    ("float above 255", lambda a: a.astype(np.float32) * 1.5, r"'S1_he' \(float32\) holds values from .*uint8"),
    ("negative float", lambda a: a.astype(np.float32) / 255 - 0.5, r"'S1_he' \(float32\) holds values from"),
    ("NaN", lambda a: np.where(a > 250, np.nan, a / 255.0), "holds NaN values"),
    ("negative integers", lambda a: a.astype(np.int16) - 128, "holds negative values"),
]


@pytest.mark.parametrize(("case", "breaks", "message"), BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_image_values_refused(case, breaks, message, toy_rgb):
    with pytest.raises(ValueError, match=message):
        _patches(_with_image(breaks(toy_rgb)))


def test_image_smaller_than_a_patch_refused(toy_rgb):
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    sdata = _with_image(toy_rgb, crop=30)
    t = get_transformation(sdata.shapes["S1_spots"], get_all=True)
    spot = gpd.GeoDataFrame({"radius": [27.5]}, geometry=[shapely.Point(15, 15)])
    sdata.shapes["S1_spots"] = ShapesModel.parse(spot, transformations=t)
    with pytest.raises(ValueError, match=r"'S1_he' is 30 x 30 px .* smaller in both dimensions than one patch"):
        omx.pp.extract_patches(sdata, shapes_key="S1_spots", image_key="S1_he", table_key=None, size_px=224)


def test_segment_nuclei_warns_on_noise():
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    noise = np.random.default_rng(0).integers(0, 256, (3, 600, 600), dtype=np.uint8)
    image = Image2DModel.parse(noise, dims=("c", "y", "x"), transformations={"um": sd.transformations.Identity()})
    sdata = sd.SpatialData(images={"noise": image})
    with pytest.warns(omx.OmxWarning, match="'noise' look like noise"):
        omx.pp.segment_nuclei(sdata, image_key="noise", mpp=2.0, show_progress_bar=False)


@pytest.mark.parametrize("which", ["toy", "her2st"])
def test_segment_nuclei_quiet_on_tissue(which, recwarn):
    sdata = _fresh() if which == "toy" else omx.datasets.her2st_sample("C2")
    image_key = "S1_he" if which == "toy" else "C2_he"
    omx.pp.segment_nuclei(sdata, image_key=image_key, show_progress_bar=False)
    assert not [w for w in recwarn if "look like noise" in str(w.message)]
