"""omx.tl.super_resolve: fine units trained from spots, anchored to measured spots, written to a table of their own."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import omx
from omx._utils import log_normalize
from omx.metrics import pearson

BIN_UM = 20.0


@pytest.fixture(scope="module")
def resolved():
    sdata = omx.datasets.toy_sdata(n_spots=60, n_genes=8, n_sections=2, seed=3)
    before = sdata.tables["table"].copy()
    model = omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], bin_um=BIN_UM, show_progress_bar=False)
    return sdata, model, before


def test_writes_a_table_of_the_fine_units_and_leaves_the_spots_alone(resolved):
    sdata, model, before = resolved
    key = omx._schema.Key.bins("S2_spots", BIN_UM)
    assert key in sdata.shapes
    out = sdata.tables["omx_superres"]
    assert out.n_obs == len(sdata.shapes[key])
    assert list(out.var_names) == model.meta_["genes"]
    assert set(out.obs["region"]) == {key}
    assert (out.obs["section"] == "S2").all()
    assert np.isfinite(out.X).all() and (out.X >= 0).all()
    entry = out.uns["omx"]["omx_superres"]
    assert entry["function"] == "super_resolve" and entry["anchored"] == ["S2"]
    assert model.meta_["superres"]["bin_um"] == BIN_UM
    # the spot table is untouched
    table = sdata.tables["table"]
    assert list(table.layers) == list(before.layers) and list(table.obsm) == list(before.obsm)
    assert (table.X != before.X).nnz == 0
    # bins are square, BIN_UM wide, and some lie between the spots
    area = sdata.shapes[key].geometry.area.to_numpy() * 1.0**2  # toy images: 1 um per pixel
    np.testing.assert_allclose(area, BIN_UM**2)
    assert out.obs["omx_spot"].isna().any() and out.obs["omx_spot"].notna().any()


def test_anchored_units_average_to_their_spot(resolved):
    """Inside a spot, the units' mean (log scale) is the spot's measured value wherever nothing was clipped at 0."""
    sdata, model, _ = resolved
    out = sdata.tables["omx_superres"]
    table = sdata.tables["table"]
    genes = model.meta_["genes"]
    rows = np.flatnonzero(table.obs["section"] == "S2")
    measured = pd.DataFrame(
        log_normalize(table.X[rows], columns=table.var_names.get_indexer(genes)),
        index=table.obs["spot_id"].astype(str).to_numpy()[rows],
    )
    inside = out.obs["omx_spot"].notna().to_numpy()
    pred = pd.DataFrame(out.X[inside], index=out.obs["omx_spot"].to_numpy()[inside])
    unclipped = (pred > 0).groupby(level=0).all().to_numpy()
    mean = pred.groupby(level=0).mean()
    assert unclipped.sum() > 100
    np.testing.assert_allclose(mean.to_numpy()[unclipped], measured.loc[mean.index].to_numpy()[unclipped], atol=1e-4)


def test_image_only_units_track_their_spots_and_match_predict_expression(resolved, tmp_path):
    """On an H&E-only grid, the units come from the image alone; the fitted model is an ordinary omx model."""
    sdata, model, _ = resolved
    key = omx._schema.Key.bins("S2_spots", BIN_UM)
    omx.tl.super_resolve(
        sdata, train=["S1"], predict=[key], bin_um=BIN_UM, key_added="image_only", show_progress_bar=False
    )
    out = sdata.tables["image_only"]
    assert out.uns["omx"]["image_only"]["anchored"] == []
    assert out.obs["omx_spot"].isna().all()
    # the units inside each spot, averaged, predict the held-out spots' measured expression
    anchored = sdata.tables["omx_superres"]
    spot = anchored.obs["omx_spot"].to_numpy()
    inside = anchored.obs["omx_spot"].notna().to_numpy()
    genes = list(out.var_names)
    mean = pd.DataFrame(out.X[inside], index=spot[inside]).groupby(level=0).mean()
    table = sdata.tables["table"]
    rows = np.flatnonzero(table.obs["section"] == "S2")
    measured = pd.DataFrame(
        log_normalize(table.X[rows], columns=table.var_names.get_indexer(genes)),
        index=table.obs["spot_id"].astype(str).to_numpy()[rows],
    ).loc[mean.index]
    assert np.nanmean(pearson(measured.to_numpy(), mean.to_numpy())) > 0.3
    # saved and loaded, the model predicts the same grid through predict_expression
    model.save(tmp_path / "sr")
    omx.tl.predict_expression(
        sdata, tmp_path / "sr", shapes_key=key, key_added="again", device="cpu", show_progress_bar=False
    )
    np.testing.assert_allclose(sdata.tables["again"].X, out.X, rtol=1e-4, atol=1e-4)


def test_given_fine_units_and_clear_errors():
    sdata = omx.datasets.toy_sdata(n_spots=30, n_genes=5, n_sections=2, seed=1)
    with pytest.raises(TypeError, match="linear in their features"):
        omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], model="cnn", show_progress_bar=False)
    with pytest.raises(ValueError, match="bin_um"):
        omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], bin_um=-1, show_progress_bar=False)
    with pytest.raises(ValueError, match="one shapes element"):
        omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], fine="S2_spots", show_progress_bar=False)
    with pytest.raises(KeyError, match="not a shapes element"):
        omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], fine={"S2": "nope"}, show_progress_bar=False)
    with pytest.raises(KeyError, match="neither in `train` nor in `predict`"):
        omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], fine={"S9": "S2_spots"}, show_progress_bar=False)
    with pytest.raises(ValueError, match="below one pixel"):
        omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], bin_um=0.5, show_progress_bar=False)


def test_refuses_to_replace_results():
    sdata = omx.datasets.toy_sdata(n_spots=30, n_genes=5, n_sections=2, seed=2)
    kw = {"train": ["S1"], "predict": ["S2"], "bin_um": 25.0, "show_progress_bar": False}
    omx.tl.super_resolve(sdata, **kw)
    first = sdata.tables["omx_superres"].X.copy()
    with pytest.raises(KeyError, match="already holds"):
        omx.tl.super_resolve(sdata, **kw)
    omx.tl.super_resolve(sdata, overwrite=True, **kw)
    np.testing.assert_allclose(sdata.tables["omx_superres"].X, first)  # deterministic


def test_nuclei_get_their_expression_in_the_nuclei_table():
    sdata = omx.datasets.toy_sdata(n_spots=30, n_genes=5, n_sections=2, seed=4)
    omx.pp.segment_nuclei(sdata, image_key="S2_he", show_progress_bar=False)
    cells = sdata.tables["omx_cells"]
    morphology = cells.obs.copy()
    assert cells.n_vars == 0 and cells.n_obs > 100
    fine = {"S2": "S2_he_nuclei_shapes"}
    omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], fine=fine, show_progress_bar=False)
    assert "omx_superres" not in sdata.tables
    cells = sdata.tables["omx_cells"]
    assert cells.n_vars == 5 and cells.n_obs == len(morphology)
    pd.testing.assert_frame_equal(cells.obs, morphology)
    assert np.isfinite(cells.X).all() and (cells.X >= 0).all()
    assert cells.uns["omx"]["omx_superres"]["function"] == "super_resolve"
    assert "segment_nuclei" in {e["function"] for e in cells.uns["omx"].values()}
    with pytest.raises(KeyError, match="already holds expression"):
        omx.tl.super_resolve(sdata, train=["S1"], predict=["S2"], fine=fine, show_progress_bar=False)
