import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")

import omx  # noqa: E402
from omx.models import Context, Contrastive, get_model  # noqa: E402
from omx.models._neighbors import PROPAGATION_GRID, nearest, neighbour_matrix, propagate  # noqa: E402

FAST = {
    "epochs": 10,
    "head": "trained",
    "neighbors": 0,
    "batch_size": 64,
    "k": 10,
    "hidden": 64,
    "embed_dim": 32,
    "show_progress_bar": False,
}


def _mean_r(pred, truth):
    return np.mean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])])


@pytest.fixture(scope="module")
def data():
    """Four groups of 80 rows; 12 targets depend non-linearly on 4 of 20 features, plus noise."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(320, 20))
    W = rng.normal(size=(4, 12))
    Y = (np.tanh(X[:, :4]) @ W + 0.3 * rng.normal(size=(320, 12))).astype(np.float32)
    groups = np.repeat(["a", "b", "c", "d"], 80)
    coords = np.concatenate([np.stack(np.meshgrid(np.arange(10), np.arange(8)), -1).reshape(-1, 2) * 100.0] * 4)
    return X, Y, groups, coords


def test_learns_and_predicts_both_ways(data):
    X, Y, groups, _ = data
    train = groups != "d"
    head_only = {**FAST, "blend": 0.0}  # the trained head alone: no linear part, no retrieval
    untrained = Contrastive(**{**head_only, "epochs": 1, "lr": 1e-5}).fit(X[train], Y[train], groups=groups[train])
    trained = Contrastive(**head_only).fit(X[train], Y[train], groups=groups[train])
    model = Contrastive(**FAST).fit(X[train], Y[train], groups=groups[train])
    hist = model.history_
    assert hist["train_loss"][-1] < hist["train_loss"][0]  # the loss falls
    assert len(hist["val_score"]) == len(hist["train_loss"])
    # cross-fitted: one fold per training group, then trained on all rows for the folds' mean best epoch count
    assert len(model.fold_best_epochs_) == 3
    assert len(hist["refit_train_loss"]) == model.best_epoch_ + 1 == round(np.mean(model.fold_best_epochs_)) + 1
    # the part weights: on a grid of step 0.1 summing to 1, the best of the cross-fitted scores
    assert len(hist["weights_grid"]) == len(hist["weights_score"]) == 66  # three parts
    best = hist["weights_grid"][int(np.argmax(hist["weights_score"]))]
    assert model.weights_ == pytest.approx({"retrieval": 0.0, "head": 0.0, "linear": 0.0, **best})
    assert sum(model.weights_.values()) == pytest.approx(1.0) and model.propagation_ == 0.0
    before = _mean_r(untrained.predict(X[~train], groups=groups[~train]), Y[~train])
    r = {}
    for mode in ("default", "retrieval", "regression"):
        pred = model.predict(X[~train], groups=groups[~train], mode=mode)
        assert pred.shape == (80, 12) and pred.dtype == np.float32
        r[mode] = _mean_r(pred, Y[~train])
    assert _mean_r(trained.predict(X[~train], groups=groups[~train]), Y[~train]) > before + 0.2  # training helps
    assert r["default"] > 0.5
    ax = omx.pl.history(model, show=False)  # the first cross-fitting fold's curves, its best epoch marked
    assert "first cross-fitting fold" in ax.get_title()
    assert ax.lines[-1].get_xdata()[0] == model.fold_best_epochs_[0] + 1
    assert r["retrieval"] > 0.4 and r["regression"] > 0.3
    fixed = Contrastive(**{**FAST, "blend": 0.25}).fit(X[train], Y[train], groups=groups[train])
    assert fixed.weights_ == {"retrieval": 0.25, "head": 0.75, "linear": 0.0}
    assert abs(model.predict(X[~train], groups=groups[~train]).mean() - Y[~train].mean()) < 0.5  # targets' scale


def test_planted_copy_is_never_retrieved(data):
    X, Y, groups, _ = data
    # the bank holds every row, section "d" included, plus exact copies of three spots of "d" (labelled "d")
    planted = [250, 260, 270]
    Xb, Yb = np.concatenate([X, X[planted]]), np.concatenate([Y, Y[planted]])
    gb = np.concatenate([groups, groups[planted]])
    model = Contrastive(**FAST, exclude="group").fit(Xb, Yb, groups=gb)
    copies = np.arange(320, 323)
    query = X[groups == "d"]
    _, index, weight = model.retrieve(query, groups=np.full(len(query), "d"))
    assert index.shape == weight.shape == (80, FAST["k"])
    np.testing.assert_allclose(weight.sum(1), 1.0, rtol=1e-5)
    assert not np.isin(index, copies).any()
    assert (model.bank_.groups[index] != "d").all()  # nothing of the predicted section
    # the control: without section labels nothing is excluded, and the copies are retrieved
    _, index_all, _ = model.retrieve(query)
    assert np.isin(copies, index_all).any()
    # the regression head and the blend do not see the bank, but the retrieval part of the default follows it
    np.testing.assert_array_equal(
        model.predict(query, groups=np.full(len(query), "d"), mode="retrieval"),
        model.retrieve(query, groups=np.full(len(query), "d"))[0],
    )


def test_patient_exclusion(data):
    X, Y, groups, _ = data
    patients = pd.Series(groups).map({"a": "P1", "b": "P1", "c": "P2", "d": "P2"}).to_numpy()
    context = Context(groups=groups, patients=patients)
    model = Contrastive(**{**FAST, "epochs": 3}).fit(X, Y, context)
    np.testing.assert_array_equal(model.bank_.patients, patients)  # each bank row keeps its patient
    query = Context(groups=groups[:80], patients=patients[:80])  # section "a" of patient P1
    _, index, _ = model.retrieve(X[:80], query)
    assert set(model.bank_.groups[index].ravel()) <= {"c", "d"}
    _, index, _ = model.retrieve(X[:80], groups=groups[:80])  # without the query's patients: its section only
    assert "b" in set(model.bank_.groups[index].ravel())
    group_only = Contrastive(**{**FAST, "epochs": 3}, exclude="group").fit(X, Y, context)
    _, index, _ = group_only.retrieve(X[:80], query)
    assert "b" in set(group_only.bank_.groups[index].ravel()) and "a" not in set(group_only.bank_.groups[index].ravel())


def test_deterministic_and_save_load(tmp_path, data):
    X, Y, groups, _ = data
    kw = {**FAST, "epochs": 4, "seed": 3, "device": "cpu", "head": "ridge+features"}
    a = Contrastive(**kw).fit(X, Y, groups=groups)
    b = Contrastive(**kw).fit(X, Y, groups=groups)
    assert a.head_ridge_["coef"].shape == (FAST["embed_dim"] + 20, 12)
    np.testing.assert_array_equal(a.predict(X, groups=groups), b.predict(X, groups=groups))
    a.meta_ = {"genes": ["x"]}
    a.save(tmp_path / "m")
    loaded = omx.models.load(tmp_path / "m")
    assert isinstance(loaded, Contrastive) and loaded.meta_ == a.meta_ and loaded.history_ == a.history_
    for name in ("embedding", "targets", "groups", "patients"):
        np.testing.assert_array_equal(getattr(loaded.bank_, name), getattr(a.bank_, name))
    assert loaded.weights_ == a.weights_ and loaded.head_alpha_ == a.head_alpha_
    np.testing.assert_array_equal(loaded.linear_.coef_, a.linear_.coef_)
    for mode in ("default", "retrieval", "regression"):
        np.testing.assert_array_equal(
            loaded.predict(X, groups=groups, mode=mode), a.predict(X, groups=groups, mode=mode)
        )
    np.testing.assert_array_equal(loaded.retrieve(X, groups=groups)[1], a.retrieve(X, groups=groups)[1])


def test_spot_context_and_patches(data):
    X, Y, groups, coords = data
    model = Contrastive(**{**FAST, "epochs": 3, "neighbors": 4}).fit(X, Y, groups=groups, coords=coords)
    assert "coords" in model.requires and "context" in model.module_
    assert model.propagation_ in PROPAGATION_GRID and len(model.history_["share_score"]) == 7
    pred = model.predict(X[:80], groups=groups[:80], coords=coords[:80])
    assert pred.shape == (80, 12)
    # the prediction is the unpropagated one, propagated over the same 4 nearest spots
    share, model.propagation_ = model.propagation_, 0.0
    raw = (model.predict(X[:80], groups=groups[:80], coords=coords[:80]) - model.target_mean_) / model.target_std_
    expected = propagate(raw, neighbour_matrix(*nearest(coords[:80], groups[:80], 4)), 0.3) * model.target_std_
    model.propagation_ = 0.3
    np.testing.assert_allclose(
        model.predict(X[:80], groups=groups[:80], coords=coords[:80]), expected + model.target_mean_, atol=1e-4
    )
    assert share == model.history_["share_grid"][int(np.argmax(model.history_["share_score"]))]
    with pytest.raises(ValueError, match="coords"):
        model.predict(X[:80], groups=groups[:80])

    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, 96)
    patches = np.clip(235 - 120 * t[:, None, None, None] + rng.normal(0, 10, (96, 32, 32, 3)), 0, 255).astype(np.uint8)
    Yp = np.stack([t, 1 - t, t**2], 1).astype(np.float32)
    cnn = Contrastive(image="patches", patch_px=32, width=8, **{**FAST, "epochs": 2, "k": 5})
    assert cnn.input == "patches" and cnn.encoder is None
    cnn.fit(patches, Yp, groups=np.repeat(["a", "b", "c"], 32))
    assert cnn.predict(patches[:10]).shape == (10, 3)
    with pytest.raises(ValueError, match="32 x 32"):
        cnn.predict(np.zeros((4, 48, 48, 3), np.uint8))


def test_errors(data):
    X, Y, groups, _ = data
    ungrouped = Contrastive(**{**FAST, "epochs": 2}).fit(X, Y)  # random validation rows, nothing excluded
    assert ungrouped.predict(X[:5]).shape == (5, 12) and set(ungrouped.bank_.groups) == {""}
    with pytest.raises(ValueError, match="not fitted"):
        Contrastive().predict(X)
    with pytest.raises(ValueError, match="rows"):
        Contrastive(**FAST).fit(X, Y[:-1])
    bad = Y.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Contrastive(**FAST).fit(X, bad)
    with pytest.raises(ValueError, match="encode them"):
        Contrastive(**FAST).fit(np.zeros((4, 8, 8, 3)), Y[:4])
    with pytest.raises(ValueError, match="larger than the reference bank"):
        Contrastive(**{**FAST, "k": 500}).fit(X, Y)
    with pytest.raises(ValueError, match="groups"):
        Contrastive(**FAST).fit(X, Y, groups=groups[:10])
    for kwargs in (
        {"image": "pixels"},
        {"blend": 2.0},
        {"k": 0},
        {"exclude": "none"},
        {"epochs": 0},
        {"head": "ridge+features", "image": "patches"},
    ):
        with pytest.raises(ValueError):
            Contrastive(**kwargs)
    model = Contrastive(**{**FAST, "k": 70, "epochs": 1}).fit(X[:160], Y[:160], groups=groups[:160])
    with pytest.raises(ValueError, match="20 features"):
        model.predict(X[:, :5])
    # the bank holds 80 rows of "a" and 80 of "b"; a query of "a" may retrieve only the 80 of "b"
    model.predict(X[:10], groups=np.full(10, "a"), mode="retrieval")
    small = Contrastive(**{**FAST, "k": 90, "epochs": 1}).fit(X[:160], Y[:160], groups=groups[:160])
    with pytest.raises(ValueError, match="fewer than k=90"):
        small.predict(X[:10], groups=np.full(10, "a"), mode="retrieval")
    with pytest.raises(ValueError, match="mode"):
        model.predict(X, mode="nearest")


def test_factory_and_tl():
    model = get_model("contrastive", k=5)
    assert isinstance(model, Contrastive) and model.k == 5 and "coords" in model.requires  # spot context by default
    sdata = omx.datasets.toy_sdata(n_spots=150, n_genes=20, n_sections=3, seed=0)
    fitted = omx.tl.fit_predict(
        sdata, train=["S1", "S2"], predict="S3", model=Contrastive(**{**FAST, "neighbors": 4}), show_progress_bar=False
    )
    entry = sdata.tables["table"].uns["omx"]["omx_pred"]
    assert entry["model"]["class"] == "Contrastive" and fitted.bank_.groups.tolist().count("S1") > 0
    assert entry["summary"]["S3"]["all"]["pearson"] > 0.3


def test_tl_patients_and_section_labels(monkeypatch):
    sdata = omx.datasets.toy_sdata(n_spots=150, n_genes=20, n_sections=3, seed=0)
    table = sdata.tables["table"]
    table.obs["patient"] = table.obs["patient"].astype(str).replace({"P2": "P1"})  # S1 and S2: one patient
    model = Contrastive(**{**FAST, "k": 5, "blend": 0.5})
    omx.tl.fit_predict(sdata, train=["S1", "S2"], predict="S3", model=model, show_progress_bar=False)
    # omx.tl gives the model every row's patient, from obs["patient"]; the model sets no attribute of its own
    assert "patients" not in model.init_params_
    assert dict(zip(model.bank_.groups, model.bank_.patients, strict=True)) == {"S1": "P1", "S2": "P1"}
    seen = []
    retrieve = Contrastive._retrieve

    def spy(self, bank, h, groups, patients, strict=True):
        seen.append((set(groups), set(patients)))
        return retrieve(self, bank, h, groups, patients, strict)

    monkeypatch.setattr(Contrastive, "_retrieve", spy)
    with pytest.warns(omx.OmxWarning, match="regression parts alone"):
        omx.tl.predict_expression(sdata, model, shapes_key="S1_spots", key_added="again", show_progress_bar=False)
    # the query is labelled with its section as in the table (not its shapes element), so nothing of S1, nor of
    # its patient's S2, may be retrieved: its spots fall back on the regression parts, with a warning
    assert seen == [({"S1"}, {"P1"})]
    assert np.isfinite(table.layers["again"][(table.obs["section"] == "S1").to_numpy()]).all()


def test_nothing_to_retrieve_falls_back_on_regression(data):
    X, Y, groups, _ = data
    patients = pd.Series(groups).map({"a": "P1", "b": "P1", "c": "P2", "d": "P2"}).to_numpy()
    model = Contrastive(**{**FAST, "epochs": 3, "blend": 0.5})
    train = groups != "d"
    model.fit(X[train], Y[train], Context(groups=groups[train], patients=patients[train]))  # bank: a, b (P1), c (P2)
    query = X[groups == "d"]  # d is P2's: only the 160 rows of a and b are allowed
    label = Context(groups=np.full(80, "d"), patients=np.full(80, "P2"))
    blended = model.predict(query, label)
    assert not np.allclose(blended, model.predict(query, label, mode="regression"))
    model.k = 161  # now too few rows of other patients for a query of d
    np.testing.assert_allclose(model.predict(query, label), model.predict(query, label, mode="regression"), rtol=1e-5)
    with pytest.raises(ValueError, match=r"and patient excluded\), fewer than k=161"):
        model.predict(query, label, mode="retrieval")
