"""Cell types from H&E alone: `omx.models.CompositionModel` and `omx.tl.predict_proportions` with nuclei."""

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import omx
from omx._schema import Key
from omx.models import CompositionModel
from omx.models._composition import nucleus_features, spot_aggregates
from omx.models._deconv import jsd
from omx.tl._engine import resolve_sections


def _synthetic(n_spots=120, n_groups=3, seed=0):
    """Spots whose nuclei have a type set by their first feature; proportions are the spots' type fractions."""
    rng = np.random.default_rng(seed)
    K = 3
    centres = np.array([-2.0, 0.0, 2.0])
    X, P, groups, U, spot, ngroups, labels = [], [], [], [], [], [], []
    offset = 0
    for g in range(n_groups):
        shift = rng.normal(0, 1, 4)  # a stain / scanner offset per group, removed by per-group standardisation
        mix = rng.dirichlet(np.full(K, 0.7), n_spots // n_groups)
        for i, p in enumerate(mix):
            n = rng.integers(8, 20)
            t = rng.choice(K, n, p=p)
            feats = np.column_stack([centres[t] + rng.normal(0, 0.4, n), rng.normal(0, 1, (n, 3))]) + shift
            U.append(feats)
            spot.append(np.full(n, offset + i))
            ngroups.append(np.full(n, g))
            labels.append(t)
            P.append(np.bincount(t, minlength=K) / n)
        X.append(rng.normal(0, 1, (len(mix), 5)))  # image features without signal
        groups.append(np.full(len(mix), g))
        offset += len(mix)
    # a few nuclei outside every spot
    U.append(rng.normal(0, 1, (5, 4)))
    spot.append(np.full(5, -1))
    ngroups.append(np.zeros(5, int))
    labels.append(np.full(5, -1))
    cat = np.concatenate
    return cat(X), np.array(P), cat(groups), cat(U), cat(spot), cat(ngroups), cat(labels)


def test_composition_model_learns_nucleus_types():
    X, P, groups, U, spot, ngroups, labels = _synthetic()
    tr, te = groups < 2, groups == 2
    ntr, nte = np.isin(ngroups, [0, 1]), ngroups == 2
    renum = np.full(len(X), -1)
    renum[tr] = np.arange(tr.sum())
    spot_tr = np.where(spot[ntr] >= 0, renum[np.maximum(spot[ntr], 0)], -1)
    fit_kw = {"groups": groups[tr], "U": U[ntr], "nucleus_spot": spot_tr, "nucleus_groups": ngroups[ntr]}
    model = CompositionModel(alphas=(1e-3, 1e-1)).fit(X[tr], P[tr], **fit_kw)
    renum_te = np.full(len(X), -1)
    renum_te[te] = np.arange(te.sum())
    spot_te = np.where(spot[nte] >= 0, renum_te[np.maximum(spot[nte], 0)], -1)
    kw = {"groups": groups[te], "U": U[nte], "nucleus_spot": spot_te, "nucleus_groups": ngroups[nte]}
    Q = model.predict(X[te], **kw)
    assert Q.shape == (te.sum(), 3)
    np.testing.assert_allclose(Q.sum(1), 1)
    # far better than the training average, and the nuclei are classified from their own features
    base = np.tile(P[tr].mean(0), (te.sum(), 1))
    assert jsd(P[te], Q).mean() < 0.5 * jsd(P[te], base).mean()
    probs = model.predict_nuclei(U[nte], nucleus_groups=ngroups[nte])
    np.testing.assert_allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == labels[nte]).mean() > 0.85
    assert model.weight_ in model.weights
    assert set(model.cv_) == {"alpha", "nucleus_alpha", "weight"}
    # deterministic
    again = CompositionModel(alphas=(1e-3, 1e-1), seed=0).fit(X[tr], P[tr], **fit_kw)
    np.testing.assert_array_equal(again.predict(X[te], **kw), Q)


def test_composition_model_spot_features_only_and_errors():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 4))
    logits = np.column_stack([2 * X[:, 0], -2 * X[:, 0], np.zeros(90)])
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    groups = np.repeat([0, 1, 2], 30)
    model = CompositionModel(alpha=1e-3).fit(X, P, groups=groups)
    Q = model.predict(X, groups=groups)
    assert jsd(P, Q).mean() < 0.01 and model.weight_ == 1.0 and not model.uses_nuclei_
    with pytest.raises(ValueError, match="without nuclei"):
        model.predict_nuclei(rng.normal(size=(3, 8)))
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :2], groups=groups)
    with pytest.raises(ValueError, match="weight"):
        CompositionModel(weight=2.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        CompositionModel().predict(X)
    U = rng.normal(size=(10, 8))
    nuc = CompositionModel(alpha=1e-2, nucleus_alpha=1e-2, weight=0.5).fit(
        X, P, groups=groups, U=U, nucleus_spot=np.arange(10), nucleus_groups=groups[:10]
    )
    with pytest.raises(ValueError, match="fitted with nuclei"):
        nuc.predict(X, groups=groups)


def test_nucleus_features_and_aggregates():
    obs = pd.DataFrame({"area_um2": [30.0, 40, 50, 60], "eccentricity": 0.5, "solidity": 0.9, "hematoxylin": 0.2,
                        "eosin": 0.1})  # fmt: skip
    xy = np.array([[0.0, 0], [10, 0], [0, 10], [500, 500]])
    U = nucleus_features(obs, xy, np.zeros(4))
    assert U.shape == (4, 8)
    np.testing.assert_allclose(np.exp(U[:, 0]), obs["area_um2"])
    assert U[0, 5] == pytest.approx(np.log1p(2)) and U[3, 5] == 0  # neighbours within 25 um
    A = spot_aggregates(U, np.array([0, 0, 1, -1]), 3)
    assert A.shape == (3, 17)
    np.testing.assert_allclose(A[:, 0], np.log1p([2, 1, 0]))
    assert np.isnan(A[2, 1]) and np.isnan(A[1, 9])  # no nuclei: no mean; one nucleus: no spread


def _toy_with_nuclei(seed=0):
    sdata = omx.datasets.toy_sdata(n_spots=60, n_genes=10, n_sections=3, seed=seed)
    table_key = next(iter(sdata.tables))
    t = sdata.tables[table_key]
    rng = np.random.default_rng(seed)
    secs = sorted(t.obs["section"].astype(str).unique())
    sections = resolve_sections(sdata, secs, table_key=table_key, section_key="section")
    obs, xy = [], []
    props = np.zeros((t.n_obs, 2))
    for name in secs:
        spots = sections[name].spots
        for i, row in enumerate(sections[name].rows):
            n = 10
            big = rng.random(n) < rng.random()
            props[row] = [big.mean(), 1 - big.mean()]
            obs.append(pd.DataFrame({
                "area_um2": np.where(big, 80.0, 20.0) * rng.lognormal(0, 0.1, n), "eccentricity": rng.random(n),
                "solidity": 0.9, "hematoxylin": rng.random(n), "eosin": rng.random(n), "spots_key": spots.shapes_key,
                "spot_id": str(spots.index[i]),
            }))  # fmt: skip
            xy.append(spots.centers[i] * spots.mpp + rng.normal(0, 10, (n, 2)))
    obs = pd.concat(obs, ignore_index=True)
    obs.index = [f"n{i}" for i in range(len(obs))]
    cells = AnnData(obs=obs)
    cells.obsm["spatial"] = np.concatenate(xy)
    cells.uns[Key.TABLE_MARK] = "cells"
    sdata.tables[Key.CELLS] = cells
    props = np.clip(props, 0.02, None)
    t.obsm["ref_props"] = pd.DataFrame(props / props.sum(1, keepdims=True), index=t.obs_names, columns=["big", "small"])
    return sdata, t, secs


def test_predict_proportions_labels_nuclei():
    sdata, t, secs = _toy_with_nuclei()
    cells = sdata.tables[Key.CELLS]
    label, conf = Key.image_type(Key.PROPORTIONS), Key.image_type_confidence(Key.PROPORTIONS)
    assert (label, conf) == ("omx_image_type", "omx_image_type_confidence")
    # every key is checked before any work: a user's column in the nuclei table is not replaced
    cells.obs[label] = "mine"
    with pytest.raises(KeyError, match="omx_image_type"):
        omx.tl.predict_proportions(sdata, train=secs[:2], predict=secs[2], key="ref_props", show_progress_bar=False)
    assert "omx_proportions" not in t.obsm and (cells.obs[label] == "mine").all()
    del cells.obs[label]
    kw = {"train": secs[:2], "predict": secs[2], "key": "ref_props", "context": (1.0,), "show_progress_bar": False}
    model = omx.tl.predict_proportions(sdata, **kw)
    assert model.uses_nuclei_
    shapes_key = resolve_sections(sdata, [secs[2]], table_key="table", section_key="section")[secs[2]].spots.shapes_key
    held = (cells.obs["spots_key"] == shapes_key).to_numpy()
    assert cells.obs[label][held].notna().all() and cells.obs[label][~held].isna().all()
    c = cells.obs[conf].to_numpy()
    assert np.all((c[held] >= 0.5) & (c[held] <= 1)) and np.isnan(c[~held]).all()
    # big nuclei are typed "big", small ones "small"
    big = cells.obs["area_um2"].to_numpy() > 45
    assert (cells.obs[label][held & big] == "big").mean() > 0.9
    assert (cells.obs[label][held & ~big] == "small").mean() > 0.9
    m = (t.obs["section"] == secs[2]).to_numpy()
    p = t.obsm["omx_proportions"]
    np.testing.assert_allclose(p[m].sum(1), 1)
    assert jsd(t.obsm["ref_props"][m].to_numpy(), p[m].to_numpy()).mean() < 0.05
    assert "omx_proportions" in cells.uns["omx"] and t.uns["omx"]["omx_proportions"]["fitted"]["uses_nuclei"]
    with pytest.raises(KeyError, match="already holds"):
        omx.tl.predict_proportions(sdata, **kw)
    omx.tl.predict_proportions(sdata, **kw, overwrite=True)


def test_predict_proportions_missing_nuclei(caplog):
    sdata, t, secs = _toy_with_nuclei()
    cells = sdata.tables[Key.CELLS]
    sections = resolve_sections(sdata, secs, table_key="table", section_key="section")
    keep = (cells.obs["spots_key"] != sections[secs[2]].spots.shapes_key).to_numpy()
    sdata.tables[Key.CELLS] = cells[keep].copy()
    with pytest.raises(ValueError, match=f"no nuclei of section {secs[2]!r}"):
        omx.tl.predict_proportions(sdata, train=secs[:2], predict=secs[2], key="ref_props", show_progress_bar=False)
    # no table of nuclei at all: image features alone, with a logged warning
    del sdata.tables[Key.CELLS]
    with caplog.at_level("WARNING", logger="omx"):
        model = omx.tl.predict_proportions(
            sdata, train=secs[:2], predict=secs[2], key="ref_props", context=(1.0,), show_progress_bar=False
        )
    assert not model.uses_nuclei_ and "segment_nuclei" in caplog.text
    assert np.allclose(t.obsm["omx_proportions"][(t.obs["section"] == secs[2]).to_numpy()].sum(1), 1)
