"""Bayesian deconvolution, cell types per nucleus and image-only proportions."""

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from deconv_data import simulate
from deconv_data import spot_sdata as _spot_sdata

import omx
from omx.models._deconv import (
    DeconvolutionModel,
    interval_coverage,
    jsd,
    nnls_proportions,
    signatures_from_reference,
)


def rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def test_bayesian_beats_nnls_on_simulated_spots():
    ref, Y, truth, types, n_cells = simulate()
    S, names = signatures_from_reference(ref, "cell_type")
    assert names == types
    model = DeconvolutionModel(max_rounds=10, seed=0, show_progress_bar=False).fit(Y, S, n_cells=n_cells)
    p = model.proportions_
    assert p.shape == truth.shape and np.allclose(p.sum(1), 1, atol=1e-4)
    assert (model.q05_ <= model.median_ + 1e-6).all() and (model.median_ <= model.q95_ + 1e-6).all()
    assert np.allclose(model.median_.sum(1), 1)
    p_nnls = nnls_proportions(Y, S)
    assert rmse(truth, p) < rmse(truth, p_nnls)
    assert jsd(truth, p).mean() < jsd(truth, p_nnls).mean()


def test_intervals_are_calibrated():
    """90 % and 50 % credible intervals hold 85-95 % and 45-55 % of the true proportions of simulated spots."""
    ref, Y, truth, _, n_cells = simulate(n_spots=400, seed=1)
    S, _ = signatures_from_reference(ref, "cell_type")
    model = DeconvolutionModel(seed=0, show_progress_bar=False).fit(Y, S, n_cells=n_cells)
    assert 0.85 <= interval_coverage(truth, model.q05_, model.q95_, model.absent_, level=0.9) <= 0.95
    assert 0.45 <= interval_coverage(truth, model.q25_, model.q75_, model.absent_, level=0.5) <= 0.55
    # where a type is present, its interval holds the truth about as often as the level says
    present = truth > 0
    inside = (truth >= model.q05_ - 1e-9) & (truth <= model.q95_ + 1e-9)
    assert 0.8 <= inside[present].mean() <= 0.97
    # a type absent from a spot has a lower bound of exactly 0 when the posterior allows less than half a cell
    assert (model.q05_[~present] == 0).mean() > 0.9
    # the mode (the proportions) lies in its interval except where the interval treats a small share as absent
    outside = (model.proportions_ < model.q05_ - 1e-9) | (model.proportions_ > model.q95_ + 1e-9)
    assert outside.mean() < 0.05 and (model.proportions_[outside] < 0.1).all()


def test_reference_batches_are_corrected():
    """Single cells from two batches with different detection: batch_key= gives the types their true RNA content."""
    ref, Y, truth, types, n_cells = simulate(n_spots=200, n_ref=1200, seed=2)
    rng = np.random.default_rng(0)
    # the cells of the first two types come mostly from a batch that detects 3 times more molecules
    lab = ref.obs["cell_type"].astype(str).to_numpy()
    in_b = np.where(np.isin(lab, types[:2]), rng.random(len(lab)) < 0.9, rng.random(len(lab)) < 0.1)
    X = np.asarray(ref.X).copy()
    X[in_b] = rng.binomial(np.round(X[in_b] * 3).astype(int), 1.0).astype(np.float32)
    ref = AnnData(X=X, obs=ref.obs.assign(batch=np.where(in_b, "b", "a")), var=ref.var)
    fits = {}
    for key in (None, "batch"):
        S, names = signatures_from_reference(ref, "cell_type", batch_key=key)
        assert names == types
        fits[key] = DeconvolutionModel(max_rounds=10, seed=0, show_progress_bar=False).fit(Y, S, n_cells=n_cells)
    assert rmse(truth, fits["batch"].proportions_) < 0.8 * rmse(truth, fits[None].proportions_)
    with pytest.raises(KeyError, match="batch_key=None"):
        signatures_from_reference(ref, "cell_type", batch_key="donor")


def test_common_dispersion():
    ref, Y, truth, _, n_cells = simulate(n_spots=150, seed=3)
    S, _ = signatures_from_reference(ref, "cell_type")
    common = DeconvolutionModel(dispersion="common", seed=0, show_progress_bar=False).fit(Y, S, n_cells=n_cells)
    per_gene = DeconvolutionModel(seed=0, show_progress_bar=False).fit(Y, S, n_cells=n_cells)
    kept = np.isfinite(common.dispersion_)
    assert np.unique(common.dispersion_[kept]).size == 1 and np.unique(per_gene.dispersion_[kept]).size > 1
    assert rmse(truth, common.proportions_) < 0.12  # the simulation's dispersion is one value for all genes
    with pytest.raises(ValueError, match="'gene' or 'common'"):
        DeconvolutionModel(dispersion="each")


def test_model_is_deterministic():
    ref, Y, _, _, n_cells = simulate(n_spots=60, n_genes=80)
    S, _ = signatures_from_reference(ref, "cell_type")
    a = DeconvolutionModel(max_rounds=10, seed=3, show_progress_bar=False).fit(Y, S, n_cells=n_cells).proportions_
    b = DeconvolutionModel(max_rounds=10, seed=3, show_progress_bar=False).fit(Y, S, n_cells=n_cells).proportions_
    np.testing.assert_allclose(a, b)


def test_deconvolve_writes_results(synthetic_sdata):
    sdata, ref, truth, types = _spot_sdata(synthetic_sdata)
    omx.tl.deconvolve(sdata, ref, labels_key="cell_type", max_rounds=10, show_progress_bar=False)
    t = sdata.tables["table"]
    props = t.obsm["omx_proportions"]
    assert isinstance(props, pd.DataFrame) and list(props.columns) == types
    assert np.allclose(props.sum(1), 1, atol=1e-4)
    assert (t.obsm["omx_proportions_q05"].to_numpy() <= props.to_numpy() + 1e-6).all()
    assert set(t.obs["omx_cell_type"].dropna()) <= set(types)
    assert t.uns["omx"]["omx_proportions"]["n_cells_prior"] is True
    assert t.varm["omx_proportions_signatures"].shape == (t.n_vars, len(types))
    with pytest.raises(KeyError, match="overwrite"):
        omx.tl.deconvolve(sdata, ref, labels_key="cell_type", max_rounds=10, show_progress_bar=False)

    # signatures as the reference (one row per type) work the same way
    S, names = signatures_from_reference(ref, "cell_type")
    sig = AnnData(X=S, obs=pd.DataFrame(index=names), var=pd.DataFrame(index=ref.var_names))
    omx.tl.deconvolve(sdata, sig, max_rounds=10, key_added="p2", show_progress_bar=False)
    assert list(t.obsm["p2"].columns) == types

    omx.tl.assign_cells(sdata)
    cells = sdata.tables["omx_cells"]
    assert cells.n_vars == len(t.uns["omx"]["omx_proportions"]["genes"])
    assert set(cells.obs["cell_type"].dropna()) <= set(types)
    assert cells.obs["cell_type"].notna().all()
    inside = cells.obs["spot_index"].to_numpy() >= 0
    # cells of a spot carry that spot's counts between them
    rows = cells.obs["spot_index"].to_numpy()
    r = rows[inside][0]
    got = np.asarray(cells.X[rows == r]).sum(0)
    want = np.asarray(t.X[r])[t.var_names.get_indexer(cells.var_names)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # type counts per spot follow its proportions (rounded)
    n_in = (rows == r).sum()
    counts = cells.obs.loc[rows == r, "cell_type"].value_counts().reindex(types).to_numpy()
    assert np.abs(counts - props.iloc[r].to_numpy() * n_in).max() < 1.0 + 1e-9
    with pytest.raises(KeyError, match="overwrite"):
        omx.tl.assign_cells(sdata)


def test_deconvolve_errors(synthetic_sdata):
    sdata, ref, _, _ = _spot_sdata(synthetic_sdata)
    with pytest.raises(KeyError, match="labels_key"):
        omx.tl.deconvolve(sdata, ref, labels_key="nope", show_progress_bar=False)
    few = ref[:40].copy()
    with pytest.raises(ValueError, match="fewer than min_cells_per_type"):
        omx.tl.deconvolve(sdata, few, labels_key="cell_type", min_cells_per_type=20, show_progress_bar=False)
    other = ref.copy()
    other.var_names = [f"x{i}" for i in range(ref.n_vars)]
    other.var_names = list(ref.var_names[:10]) + list(other.var_names[10:])
    with pytest.raises(ValueError, match="share 10 genes"):
        omx.tl.deconvolve(sdata, other, labels_key="cell_type", show_progress_bar=False)
    bad = sdata.tables["table"]
    bad.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        omx.tl.deconvolve(sdata, ref, labels_key="cell_type", show_progress_bar=False)
    bad.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        omx.tl.deconvolve(sdata, ref, labels_key="cell_type", show_progress_bar=False)


def test_predict_proportions_toy():
    sdata = omx.datasets.toy_sdata(n_spots=60, n_genes=10, n_sections=3, seed=0)
    t = sdata.tables[next(iter(sdata.tables))]
    rng = np.random.default_rng(0)
    t.obsm["ref_props"] = pd.DataFrame(rng.dirichlet(np.ones(3), t.n_obs), index=t.obs_names, columns=["a", "b", "c"])
    secs = sorted(t.obs["section"].astype(str).unique())
    omx.tl.predict_proportions(
        sdata, train=secs[:2], predict=secs[2], key="ref_props", alpha=1.0, show_progress_bar=False
    )
    p = t.obsm["omx_proportions"]
    m = (t.obs["section"] == secs[2]).to_numpy()
    assert np.allclose(p[m].sum(1), 1) and p[~m].isna().all().all()
    assert t.obs["omx_cell_type"][m].notna().all()
    with pytest.raises(ValueError, match="both"):
        omx.tl.predict_proportions(sdata, train=secs[:2], predict=secs[1], key="ref_props", show_progress_bar=False)


def test_single_cells_without_labels_are_refused():
    ref, Y, _, _, n_cells = simulate(n_spots=20, n_ref=300)
    del ref.obs["cell_type"]
    with pytest.raises(ValueError, match="looks like single cells"):
        signatures_from_reference(ref, None)
    S = np.abs(np.random.default_rng(0).normal(size=(300, Y.shape[1])))
    with pytest.raises(ValueError, match="300 cell types"):
        DeconvolutionModel(max_rounds=10, show_progress_bar=False).fit(Y, S)


def test_assign_cells_matches_types_by_name(synthetic_sdata):
    sdata, ref, _, types = _spot_sdata(synthetic_sdata)
    omx.tl.deconvolve(sdata, ref, labels_key="cell_type", max_rounds=10, show_progress_bar=False)
    t = sdata.tables["table"]
    omx.tl.assign_cells(sdata)
    before = np.asarray(sdata.tables["omx_cells"].X).copy()
    # the same types in another order: each nucleus still gets the profile of its own type
    sig = t.varm["omx_proportions_signatures"]
    t.varm["omx_proportions_signatures"] = sig[types[::-1]]
    omx.tl.assign_cells(sdata, overwrite=True)
    np.testing.assert_allclose(np.asarray(sdata.tables["omx_cells"].X), before, rtol=1e-5)
    # proportions that lack a type the signatures keep
    t.obsm["omx_proportions"] = t.obsm["omx_proportions"].drop(columns=types[0])
    with pytest.raises(ValueError, match=rf"the proportions lack \['{types[0]}'\]"):
        omx.tl.assign_cells(sdata, overwrite=True)


def test_section_without_spots_fails_before_fitting():
    sdata = omx.datasets.toy_sdata(seed=0)
    t = sdata.tables["table"]
    ids = t.obs["spot_id"].to_numpy().copy()
    ids[(t.obs["section"].astype(str) == "S2").to_numpy()] += 10**6
    t.obs["spot_id"] = ids
    with pytest.raises(ValueError, match="Section 'S2' has no spots"):
        omx.tl.fit_predict(sdata, train=["S1"], predict=["S2"], show_progress_bar=False)
    with pytest.raises(ValueError, match="Section 'S2' has no spots"):
        omx.tl.cross_validate(sdata, show_progress_bar=False)
    assert "omx_pred" not in t.layers


def test_prior_centres_each_spot():
    """A per-spot prior pulls the posterior towards it: towards the truth when it is right, away when it is wrong."""
    ref, Y, truth, _, n_cells = simulate(n_spots=120, seed=3)
    Y = np.random.default_rng(0).binomial(Y.astype(int), 0.05)  # shallow spots: the prior has room to act
    keep = Y.sum(1) > 0
    Y, truth, n_cells = Y[keep], truth[keep], n_cells[keep]
    S, _ = signatures_from_reference(ref, "cell_type")
    flat = DeconvolutionModel(seed=0, show_progress_bar=False).fit(Y, S, n_cells=n_cells)
    strong = DeconvolutionModel(prior_strength=100.0, seed=0, show_progress_bar=False)
    right = strong.fit(Y, S, n_cells=n_cells, prior=truth + 0.01).proportions_
    # the prior moves the mode, not the spread: the intervals keep the counts' own uncertainty
    width, flat_width = np.mean(strong.q95_ - strong.q05_), np.mean(flat.q95_ - flat.q05_)
    assert 0.7 * flat_width < width < 1.3 * flat_width
    wrong = strong.fit(Y, S, n_cells=n_cells, prior=truth[::-1] + 0.01).proportions_
    assert rmse(truth, right) < 0.8 * rmse(truth, flat.proportions_)
    assert rmse(truth, wrong) > rmse(truth, flat.proportions_)
    assert strong.init_params_["prior_strength"] == 100.0
    with pytest.raises(ValueError, match="prior must be"):
        strong.fit(Y, S, n_cells=n_cells, prior=truth[:, :2])
    with pytest.raises(ValueError, match="prior_strength"):
        DeconvolutionModel(prior_strength=-1.0)


def test_expression_prior_from_proportions():
    """signatures_from_proportions learns an expression prior and its strength; deconvolve uses it, or not."""
    from omx.tl._deconvolve import PRIOR_DISPERSIONS, PRIOR_STRENGTHS

    sdata = omx.datasets.her2st_sample()
    table = sdata.tables["table"]
    ref = omx.tl.signatures_from_proportions(sdata, sections=["C2", "C3"], show_progress_bar=False)
    types = list(ref.obs_names)
    assert ref.varm["omx_prior_coef"].shape == (ref.n_vars, len(types))
    info = ref.uns["omx_prior"]
    cv = np.asarray(info["cv_r"])  # dispersions x strengths
    assert cv.shape == (len(PRIOR_DISPERSIONS), len(PRIOR_STRENGTHS))
    chosen = (PRIOR_DISPERSIONS.index(info["dispersion"]), PRIOR_STRENGTHS.index(info["strength"]))
    assert cv[chosen] == cv.max()
    c4 = (table.obs["section"] == "C4").to_numpy()
    truth = table.obsm["stereoscope_major"][types].to_numpy()[c4]
    scores = {}
    for strength in (None, 0.0):
        model = omx.tl.deconvolve(
            sdata, ref, sections="C4", platform_sd=0.0, prior_strength=strength, overwrite=True,
            show_progress_bar=False,
        )  # fmt: skip
        entry = table.uns["omx"]["omx_proportions"]
        assert entry["expression_prior"] is (strength is None)
        assert model.prior_strength == (info["strength"] if strength is None else 0.0)
        assert model.dispersion == info["dispersion"]  # dispersion=None takes the one chosen with the prior
        pred = table.obsm["omx_proportions"][types].to_numpy()[c4]
        r = np.nanmean([np.corrcoef(truth[:, k], pred[:, k])[0, 1] for k in range(len(types))])
        scores[strength] = (r, jsd(truth, pred).mean())
    # held-out C4 agrees better with stereoscope with the prior than without, in r and in JSD
    assert scores[None][0] > scores[0.0][0] and scores[None][1] < scores[0.0][1]
    bare = omx.tl.signatures_from_proportions(sdata, sections=["C2", "C3"], prior=False, genes=list(ref.var_names))
    assert "omx_prior_coef" not in bare.varm
    with pytest.raises(ValueError, match="needs a reference with an expression prior"):
        omx.tl.deconvolve(sdata, bare, sections="C4", prior_strength=30.0, key_added="bare", show_progress_bar=False)
    one = omx.tl.signatures_from_proportions(sdata, sections=["C2"], genes=list(ref.var_names))
    assert "omx_prior_coef" not in one.varm  # one section: no held-out section to choose the strength
