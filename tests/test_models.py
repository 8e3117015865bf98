import inspect
import json
import pickle

import numpy as np
import pytest

import omx.models
from omx.models import CNNRegressor, Context, Model, Ridge, get_model


def _mean_r(pred, truth):
    return np.mean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])])


@pytest.fixture(scope="module")
def linear_data():
    """300 rows, 3 groups of 100; Y depends linearly on 5 of 30 features, plus noise."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 30))
    W = np.zeros((30, 6))
    W[:5] = rng.normal(size=(5, 6))
    Y = (X @ W + 0.5 * rng.normal(size=(300, 6))).astype(np.float32)
    groups = np.repeat(["a", "b", "c"], 100)
    return X, Y, groups


def _colour_patches(n, px=32, seed=0):
    """Random-texture patches whose hematoxylin-like darkness t in [0, 1] drives the targets."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    base = np.array([235, 190, 215], dtype=np.float64)  # pale pink
    dark = np.array([90, 60, 150], dtype=np.float64)  # purple
    colour = base + t[:, None] * (dark - base)
    texture = rng.normal(0, 12, size=(n, px, px, 1))
    patches = np.clip(colour[:, None, None, :] + texture, 0, 255).astype(np.uint8)
    Y = np.stack([t, 1 - t, t**2], axis=1) + 0.05 * rng.normal(size=(n, 3))
    return patches, Y.astype(np.float32)


@pytest.fixture(scope="module")
def cnn_data():
    patches, Y = _colour_patches(180)
    groups = np.repeat(["s1", "s2", "s3"], 60)
    return patches, Y, groups


CNN_FAST = {"patch_px": 32, "width": 8, "epochs": 6, "batch_size": 32, "lr": 3e-3, "show_progress_bar": False}


# ---------------------------------------------------------------- ridge
def test_ridge_predicts_held_out_group(linear_data):
    X, Y, groups = linear_data
    train = groups != "c"
    model = Ridge(show_progress_bar=False).fit(X[train], Y[train], groups=groups[train])
    pred = model.predict(X[~train], groups=groups[~train])
    assert pred.shape == (100, 6) and pred.dtype == np.float32
    assert _mean_r(pred, Y[~train]) > 0.5
    assert model.n_features_in_ == 30 and model.n_targets_ == 6


def test_ridge_alpha_selection(linear_data):
    X, Y, groups = linear_data
    model = Ridge(n_components=None, show_progress_bar=False).fit(X, Y, groups=groups)
    assert set(model.history_) == {"alpha", "n_components", "cv_pearson"}
    assert np.shape(model.history_["cv_pearson"]) == (1, len(model.alphas))
    assert model.alpha_ == model.alphas[int(np.argmax(model.history_["cv_pearson"][0]))]
    # the clean signal wants little shrinkage ...
    assert model.alpha_ <= 1.0
    # ... while noisier targets push alpha up
    noise = np.random.default_rng(1).normal(size=(40, 3))
    rng = np.random.default_rng(2)
    Xn = rng.normal(size=(40, 30))
    Yn = Xn[:, :1] * 0.3 + noise
    noisy = Ridge(show_progress_bar=False).fit(Xn, Yn)  # 5-fold without groups
    assert noisy.alpha_ > model.alpha_
    fixed = Ridge(alpha=0.5, n_components=None, show_progress_bar=False).fit(X, Y)
    assert fixed.alpha_ == 0.5 and fixed.history_ == {}


def test_ridge_auto_components_find_low_rank_targets():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20))
    groups = np.repeat(["a", "b", "c"], 100)
    Y = X[:, :2] @ rng.normal(size=(2, 60)) + 2.0 * rng.normal(size=(300, 60))  # rank-2 signal in 60 noisy genes
    model = Ridge(show_progress_bar=False).fit(X, Y, groups=groups)
    assert model.n_components_ is not None and model.n_components_ <= 10
    assert np.shape(model.history_["cv_pearson"]) == (5, len(model.alphas))


def test_ridge_group_standardisation_removes_offset(linear_data):
    X, Y, groups = linear_data
    train = groups != "c"
    shifted = X.copy()
    shifted[~train] = X[~train] * 3.0 + 10.0  # a stain / scanner difference in the held-out section
    errors = {}
    for mode in ("group", "global"):
        model = Ridge(alpha=0.01, standardize=mode, show_progress_bar=False)
        model.fit(shifted[train], Y[train], groups=groups[train])
        pred = model.predict(shifted[~train], groups=groups[~train])
        errors[mode] = np.mean((pred - Y[~train]) ** 2)
    assert errors["group"] < 0.1 * errors["global"]
    assert errors["group"] < 1.0


def test_ridge_pca_targets(linear_data):
    X, Y, groups = linear_data
    model = Ridge(n_components=3, show_progress_bar=False).fit(X, Y, groups=groups)
    assert model.components_.shape == (3, 6)
    pred = model.predict(X, groups=groups)
    assert pred.shape == Y.shape
    assert _mean_r(pred, Y) > 0.5


# ---------------------------------------------------------------- CNN
def test_cnn_predicts_held_out_group(cnn_data):
    patches, Y, groups = cnn_data
    train = groups != "s3"
    model = CNNRegressor(**CNN_FAST).fit(patches[train], Y[train], groups=groups[train])
    hist = model.history_
    assert len(hist["train_loss"]) == len(hist["val_loss"]) >= 1
    assert np.isfinite(hist["val_loss"]).all()  # validation on a held-out group
    pred = model.predict(patches[~train])
    assert pred.shape == (60, 3) and pred.dtype == np.float32
    assert _mean_r(pred, Y[~train]) > 0.5
    # predictions come back on the scale of the targets
    assert abs(pred.mean() - Y[~train].mean()) < 0.3


def test_cnn_deterministic_on_cpu(cnn_data):
    patches, Y, _ = cnn_data
    params = {**CNN_FAST, "epochs": 2, "device": "cpu"}
    a = CNNRegressor(**params, seed=3).fit(patches[:96], Y[:96]).predict(patches[96:])
    b = CNNRegressor(**params, seed=3).fit(patches[:96], Y[:96]).predict(patches[96:])
    c = CNNRegressor(**params, seed=4).fit(patches[:96], Y[:96]).predict(patches[96:])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cnn_no_validation_and_encoder(cnn_data):
    patches, Y, _ = cnn_data
    model = CNNRegressor(**{**CNN_FAST, "epochs": 2, "val_fraction": 0.0, "augment": False}).fit(patches, Y)
    assert len(model.history_["train_loss"]) == 2 and np.isnan(model.history_["val_loss"]).all()
    enc = model.as_encoder(device="cpu")
    assert enc.transform(patches[:5]).shape == (5, 32)


def test_augmentation_keeps_range_and_symmetry():
    torch = pytest.importorskip("torch")
    from omx.models._cnn import augment_patches

    x = torch.rand(16, 3, 8, 8)
    out = augment_patches(x, torch.Generator().manual_seed(0), stain_scale=0.0, stain_shift=0.0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # without stain jitter each patch is one of the 8 symmetries of the input (up to the OD round trip)
    for i in range(16):
        sym = [x[i].flip(-1) if f else x[i] for f in (0, 1)]
        sym = [s.flip(-2) if f else s for s in sym for f in (0, 1)]
        sym = [s.transpose(-1, -2) if f else s for s in sym for f in (0, 1)]
        assert min(float((out[i] - s).abs().max()) for s in sym) < 1e-3


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path, linear_data, cnn_data):
    X, Y, groups = linear_data
    meta = {"genes": ["A", "B"], "size_um": 100.0}
    ridge = Ridge(n_components=4, show_progress_bar=False).fit(X, Y, Context(groups=groups, meta=meta))
    ridge.save(tmp_path / "ridge")
    loaded = omx.models.load(tmp_path / "ridge")
    assert type(loaded) is Ridge and loaded.init_params_ == ridge.init_params_
    assert loaded.meta_ == ridge.meta_
    np.testing.assert_array_equal(loaded.predict(X, groups=groups), ridge.predict(X, groups=groups))
    assert loaded.history_ == ridge.history_
    with pytest.raises(FileExistsError, match="overwrite"):
        ridge.save(tmp_path / "ridge")
    ridge.save(tmp_path / "ridge", overwrite=True)
    params = json.loads((tmp_path / "ridge" / "params.json").read_text())
    params["init_params"]["retired"] = 1  # a parameter an older version took
    (tmp_path / "ridge" / "params.json").write_text(json.dumps(params))
    with pytest.warns(UserWarning, match=r"\['retired'\].*ignored"):
        old = omx.models.load(tmp_path / "ridge")
    np.testing.assert_array_equal(old.predict(X, groups=groups), ridge.predict(X, groups=groups))

    patches, Yp, pgroups = cnn_data
    cnn = CNNRegressor(**{**CNN_FAST, "epochs": 2}).fit(patches, Yp, groups=pgroups)
    cnn.save(tmp_path / "cnn")
    assert (tmp_path / "cnn" / "params.json").exists() and (tmp_path / "cnn" / "weights.pt").exists()
    loaded = Model.load(tmp_path / "cnn", device="cpu")
    assert isinstance(loaded, CNNRegressor) and loaded.meta_ is None
    np.testing.assert_array_equal(loaded.predict(patches), cnn.predict(patches))
    assert loaded.history_ == cnn.history_
    with pytest.raises(TypeError, match="CNNRegressor"):
        Ridge.load(tmp_path / "cnn")
    with pytest.raises(FileNotFoundError):
        omx.models.load(tmp_path / "nothing")


# ---------------------------------------------------------------- errors and factory
def test_input_errors(linear_data, cnn_data):
    X, Y, _ = linear_data
    with pytest.raises(ValueError, match="not fitted"):
        Ridge().predict(X)
    with pytest.raises(ValueError, match="not fitted"):
        Ridge().save("never-written")
    with pytest.raises(ValueError, match="rows"):
        Ridge().fit(X, Y[:-1])
    bad = Y.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Ridge().fit(X, bad)
    with pytest.raises(ValueError, match="groups"):
        Ridge().fit(X, Y, groups=np.zeros(5))
    with pytest.raises(ValueError, match="encode them"):
        Ridge().fit(np.zeros((4, 8, 8, 3)), Y[:4])
    model = Ridge(alpha=1.0, show_progress_bar=False).fit(X, Y)
    with pytest.raises(ValueError, match="30 features"):
        model.predict(X[:, :10])

    patches, Yp, _ = cnn_data
    cnn = CNNRegressor(**CNN_FAST)
    with pytest.raises(ValueError, match="not fitted"):
        cnn.predict(patches)
    with pytest.raises(ValueError, match="32 x 32"):
        cnn.fit(np.zeros((10, 48, 48, 3), np.uint8), Yp[:10])
    with pytest.raises(ValueError, match="uint8"):
        cnn.fit(patches / 255.0, Yp)
    with pytest.raises(ValueError, match="shape"):
        cnn.fit(patches.transpose(0, 3, 1, 2), Yp)
    with pytest.raises(ValueError, match="rows"):
        cnn.fit(patches, Yp[:5])


def test_clone_keeps_params_and_encoder():
    torch = pytest.importorskip("torch")
    from omx.encoders import TorchEncoder

    enc = TorchEncoder(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)), device="cpu")
    ridge = Ridge(encoder=enc, alpha=3.0)
    twin = ridge.clone()
    assert twin is not ridge and twin.encoder is enc and twin.init_params_ == ridge.init_params_
    assert not twin.is_fitted_
    assert CNNRegressor(epochs=3).clone(seed=5).init_params_["seed"] == 5


def test_get_model():
    assert isinstance(get_model("ridge"), Ridge)
    cnn = get_model("CNN", patch_px=48, epochs=3)
    assert isinstance(cnn, CNNRegressor) and cnn.patch_px == 48 and cnn.init_params_["epochs"] == 3
    assert cnn.input == "patches" and Ridge.input == "features"
    ridge = Ridge(alpha=2.0)
    assert get_model(ridge) is ridge
    with pytest.raises(ValueError, match="Keyword"):
        get_model(ridge, alpha=1.0)
    with pytest.raises(ValueError, match="Unknown model"):
        get_model("transformer")


@pytest.mark.gpu
def test_cnn_on_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    Y = patches.reshape(64, -1, 3).mean(1)[:, :2].astype(np.float32)
    kw = {"patch_px": 32, "epochs": 3, "val_fraction": 0, "augment": False, "show_progress_bar": False}
    cpu = CNNRegressor(device="cpu", **kw).fit(patches, Y).predict(patches)
    gpu = CNNRegressor(device="cuda", **kw).fit(patches, Y).predict(patches)
    assert np.corrcoef(cpu.ravel(), gpu.ravel())[0, 1] > 0.95  # same seed; mixed precision on CUDA


# ---------------------------------------------------------------- the contract: context, requires, devices
class _GroupMean(Model):
    """Predicts each target's training mean; declares that it needs the groups and reads nothing else."""

    uses = frozenset({"groups"})
    requires = frozenset({"groups"})

    def __init__(self, *, seed: int = 0, device: str = "auto", show_progress_bar: bool = True):
        super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)

    def _fit(self, X, Y, context):
        self.seen_ = context
        self.mean_ = Y.mean(0)

    def _predict(self, X, context):
        self.seen_ = context
        return np.tile(self.mean_, (len(X), 1))

    def _get_state(self):
        return {}, {"mean": self.mean_}

    def _set_state(self, state, arrays):
        self.mean_ = arrays["mean"]


def test_context_reaches_the_model_checked_and_trimmed(linear_data):
    X, Y, groups = linear_data
    coords = np.random.default_rng(0).normal(size=(len(X), 2))
    model = _GroupMean().fit(X, Y, Context(groups=groups, patients=groups, coords=coords, meta={"genes": ["a"]}))
    # the model sees only the fields it declares in `uses` ...
    assert model.seen_.given() == {"groups", "meta"}
    np.testing.assert_array_equal(model.seen_.groups, groups)
    # ... and keeps the description of the data as meta_ (saved with it)
    assert model.meta_ == {"genes": ["a"]}
    model.predict(X[:5], groups=groups[:5])
    assert model.seen_.given() == {"groups"}
    # a field it requires is missing: the error names it and says how to pass it
    with pytest.raises(ValueError, match=r"_GroupMean cannot run without `groups`.*pass `groups=`"):
        _GroupMean().fit(X, Y)
    with pytest.raises(ValueError, match="cannot run without `groups`"):
        model.predict(X[:5], Context(coords=coords[:5]))
    # refitting without meta forgets the old one
    assert _GroupMean().fit(X, Y, groups=groups).meta_ is None


def test_context_errors(linear_data):
    X, Y, groups = linear_data
    with pytest.raises(ValueError, match="not both"):
        Ridge().fit(X, Y, Context(groups=groups), groups=groups)
    with pytest.raises(TypeError, match="omx.models.Context"):
        Ridge().fit(X, Y, {"groups": groups})
    with pytest.raises(ValueError, match="`patients` must hold one label per row"):
        Ridge().fit(X, Y, Context(patients=np.zeros(3)))
    with pytest.raises(ValueError, match=r"`coords` must be finite spot centres of shape \(300, 2\)"):
        Ridge().fit(X, Y, coords=np.zeros((len(X), 3)))
    with pytest.raises(ValueError, match="`library_size` must hold one positive total count"):
        Ridge().fit(X, Y, Context(library_size=-np.ones(len(X))))
    model = Ridge(alpha=1.0, show_progress_bar=False).fit(X, Y, Context(groups=groups))
    np.testing.assert_array_equal(model.predict(X, Context(groups=groups)), model.predict(X, groups=groups))
    with pytest.raises(ValueError, match="no predictive variance"):
        model.predict(X, return_var=True)
    with pytest.raises(ValueError, match="groups"):
        model.predict(X, groups=groups[:10])


def test_declarations():
    assert (Ridge.input, Ridge.target, Ridge.provides_variance) == ("features", "log", False)
    assert Ridge.uses == {"groups", "group_stats"} and not Ridge.requires
    assert (CNNRegressor.input, CNNRegressor.target) == ("patches", "log") and CNNRegressor.uses == {"groups"}


def test_to_device(cnn_data):
    ridge = Ridge()
    assert ridge.to("cpu") is ridge and ridge.device == "cpu"
    patches, Y, groups = cnn_data
    cnn = CNNRegressor(**{**CNN_FAST, "epochs": 1}).fit(patches, Y, groups=groups)
    assert cnn.device == "auto"
    assert cnn.to("cpu") is cnn and cnn.device == "cpu"
    assert {p.device.type for p in cnn.module_.parameters()} == {"cpu"}
    with pytest.raises(RuntimeError):
        cnn.to("not-a-device")
    assert cnn.device == "cpu"  # unchanged by a bad device


@pytest.mark.gpu
def test_to_moves_the_network_to_cuda(cnn_data):
    patches, Y, groups = cnn_data
    cnn = CNNRegressor(**{**CNN_FAST, "epochs": 2}, device="cpu").fit(patches, Y, groups=groups)
    on_cpu = cnn.predict(patches)
    cnn.to("cuda")
    assert {p.device.type for p in cnn.module_.parameters()} == {"cuda"}
    np.testing.assert_allclose(cnn.predict(patches), on_cpu, atol=0.05)  # mixed precision on CUDA


# ---------------------------------------------------------------- constructor parameters, recorded once
def test_init_params_recorded_from_the_signature():
    ridge = Ridge(alpha=2, alphas=np.array([0.1, 1.0]), seed=np.int64(3))
    assert ridge.init_params_ == {
        "encoder": "handcrafted",
        "alpha": 2,
        "n_components": "auto",
        "standardize": "group",
        "alphas": [0.1, 1.0],
        "seed": 3,
        "device": "auto",
        "show_progress_bar": True,
    }
    json.dumps(ridge.init_params_)  # JSON-able as written to params.json
    for klass in (Ridge, CNNRegressor):  # every argument of the signature, defaults included, in its order
        assert list(klass().init_params_) == list(inspect.signature(klass).parameters)
    assert CNNRegressor(epochs=3).init_params_["epochs"] == 3 and CNNRegressor().init_params_["epochs"] == 40

    class Wider(CNNRegressor):
        def __init__(self, *, extra: int = 1, **kwargs):
            self.extra = extra
            super().__init__(**kwargs)

    wide = Wider(extra=2, epochs=5)  # the outermost constructor records, its **kwargs flattened
    assert wide.init_params_ == {"extra": 2, "epochs": 5}
    assert wide.clone().extra == 2 and wide.clone().epochs == 5

    class Plain(_GroupMean):
        pass

    assert Plain(seed=4).init_params_ == {"seed": 4, "device": "auto", "show_progress_bar": True}


def test_init_params_save_load_and_clone(tmp_path, cnn_data):
    torch = pytest.importorskip("torch")
    from omx.encoders import TorchEncoder

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    ridge = Ridge(encoder=module, alpha=3.0)  # a bare torch module: described by the encoder made of it
    assert isinstance(ridge.encoder, TorchEncoder) and ridge.init_params_["encoder"] == ridge.encoder.get_params()
    assert ridge.clone().encoder.module is module  # clone passes the live object again

    patches, Y, groups = cnn_data
    cnn = CNNRegressor(**{**CNN_FAST, "epochs": 1}).fit(patches, Y, groups=groups)
    cnn.save(tmp_path / "cnn")
    loaded = omx.models.load(tmp_path / "cnn")
    assert loaded.init_params_ == cnn.init_params_ and loaded.epochs == 1
    twin = loaded.clone(seed=9)
    assert twin.init_params_ == {**cnn.init_params_, "seed": 9} and not twin.is_fitted_


# ---------------------------------------------------------------- the training module
def test_train_early_stops_and_restores_the_best_epoch():
    torch = pytest.importorskip("torch")
    from omx.models._training import train

    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.normal(size=(120, 4)).astype(np.float32))
    y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    seen = []

    def batch_loss(net, rows, training):
        seen.append(net is module)
        return torch.nn.functional.mse_loss(net(X[rows]).squeeze(1), y[rows])

    scores = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.9])  # best at the second epoch, then two without improvement
    weights = []

    def val_score():
        weights.append(module.weight.detach().clone())  # the weights after each epoch
        return next(scores)

    result = train(
        module, batch_loss, np.arange(100), np.arange(100, 120), epochs=6, batch_size=16, lr=0.05,
        weight_decay=0.0, patience=2, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
        val_score=val_score, show_progress_bar=False,
    )  # fmt: skip
    assert all(seen) and not module.training
    assert result.best_epoch == 1 and result.history["val_score"] == [0.1, 0.5, 0.3, 0.2]
    assert len(result.history["train_loss"]) == len(result.history["val_loss"]) == 4
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    torch.testing.assert_close(module.weight.detach(), weights[1], rtol=0, atol=0)  # the best epoch's weights
    assert not torch.equal(weights[1], weights[-1])


# ---------------------------------------------------------------- per-group standardisation
def _standardize_by_group_before(X, groups, mean, scale, stats=None):
    """The function GroupStandardizer replaced, verbatim (for the equality test)."""
    out = (X - mean) / scale
    labels, inverse = (
        (np.array([0]), np.zeros(len(X), int)) if groups is None else np.unique(groups, return_inverse=True)
    )
    stats = stats or {}
    for k, label in enumerate(labels):
        rows = inverse == k
        if str(label) in stats:
            mu, sd, n = stats[str(label)]
        else:
            mu, sd, n = X[rows].mean(0), X[rows].std(0), int(rows.sum())
        if n >= 5:
            out[rows] = (X[rows] - mu) / np.where(np.asarray(sd) > 1e-12, sd, 1.0)
    return out


def test_group_standardizer_equals_the_function_it_replaced():
    from omx.models import GroupStandardizer

    rng = np.random.default_rng(0)
    X = rng.normal(2.0, 3.0, (60, 4))
    X[:, 3] = 1.5  # a constant feature standardises to 0
    groups = np.array(["a"] * 30 + ["b"] * 27 + ["tiny"] * 3)  # "tiny" falls back to the fitted statistics
    std = GroupStandardizer().fit(X[:40])
    mean, scale = X[:40].mean(0), np.where(X[:40].std(0) > 1e-12, X[:40].std(0), 1.0)
    np.testing.assert_array_equal(std.transform(X, groups), _standardize_by_group_before(X, groups, mean, scale))
    np.testing.assert_array_equal(std.transform(X), _standardize_by_group_before(X, None, mean, scale))
    stats = {"b": (X[30:57].mean(0) + 1, X[30:57].std(0), 27)}
    np.testing.assert_array_equal(
        std.transform(X, groups, stats), _standardize_by_group_before(X, groups, mean, scale, stats)
    )
    assert (std.transform(X, groups)[:, 3] == 0).all()
    np.testing.assert_array_equal(GroupStandardizer("global").fit(X[:40]).transform(X, groups), (X - mean) / scale)
    np.testing.assert_array_equal(GroupStandardizer(None).fit(X).transform(X, groups), X)
    restored = GroupStandardizer().set_state(std.get_state())
    np.testing.assert_array_equal(restored.transform(X, groups), std.transform(X, groups))
    with pytest.raises(ValueError, match="standardize must be"):
        GroupStandardizer("section")


# ---------------------------------------------------------------- model files: format, checksums, clear errors
def _edit_params(folder, **changes):
    """Change top-level entries of params.json (a value of None deletes the entry)."""
    params = json.loads((folder / "params.json").read_text())
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    (folder / "params.json").write_text(json.dumps(params))
    return params


def _edit_nested(folder, entry, drop=(), **changes):
    params = json.loads((folder / "params.json").read_text())
    params[entry] = {k: v for k, v in {**params[entry], **changes}.items() if k not in drop}
    (folder / "params.json").write_text(json.dumps(params))


def _restamp(folder, name):
    """Record the current size and sha256 of `name` in params.json, as a writer that knew the format would."""
    import hashlib

    data = (folder / name).read_bytes()
    _edit_nested(folder, "files", **{name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})


def _truncate(folder):
    data = (folder / "weights.npz").read_bytes()
    (folder / "weights.npz").write_bytes(data[: len(data) // 2])


def _flip_byte(folder):
    data = bytearray((folder / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "weights.npz").write_bytes(bytes(data))


def _object_array(folder):
    np.savez(folder / "weights.npz", coef=np.array([{"run": "anything"}], dtype=object))
    _restamp(folder, "weights.npz")


def _pickle_in_torch_file(folder):
    import fractions

    torch = pytest.importorskip("torch")
    torch.save({"module": {}, "arrays": {}, "extra": fractions.Fraction(1, 3)}, folder / "weights.pt")
    _restamp(folder, "weights.pt")


FUTURE = {"omx_version": "99.0.0"}
CORRUPTIONS = {
    "truncated weights": ("ridge", _truncate, r"weights.npz is \d[\d,]* bytes.*recorded.*truncated"),
    "flipped byte": ("ridge", _flip_byte, r"weights.npz is corrupt: its sha256"),
    "weights deleted": ("ridge", lambda f: (f / "weights.npz").unlink(), r"weights.npz is missing"),
    "garbage params.json": (
        "ridge",
        lambda f: (f / "params.json").write_bytes(b"\x00\xff{garbage"),
        r"params.json is not valid JSON",
    ),
    "another program's params.json": (
        "ridge",
        lambda f: (f / "params.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 768})),
        r"params.json is not the params.json of an omx model.*'architectures'",
    ),
    "params.json not an object": (
        "ridge",
        lambda f: (f / "params.json").write_text("[1, 2]"),
        r"not the params.json of an omx model.*a JSON list",
    ),
    "future format": (
        "ridge",
        lambda f: _edit_params(f, format=2, **FUTURE),
        r"written by omx 99.0.0 in model-file format 2, but this omx \(.+\) reads formats up to 1\. Upgrade omx",
    ),
    "format of the wrong type": ("ridge", lambda f: _edit_params(f, format="one"), r"has format 'one'"),
    "files entry lost": ("ridge", lambda f: _edit_params(f, files=None), r"lacks the entries \['files'\]"),
    "weights outside the folder": (
        "ridge",
        lambda f: _edit_params(f, weights="../weights.npz"),
        r"names '\.\./weights\.npz' as its weights, which is not a file in",
    ),
    "unknown class from a newer omx": (
        "ridge",
        lambda f: _edit_params(f, **{"class": "FancyRegressor"}, **FUTURE),
        r"holds a 'FancyRegressor', which this omx does not know\. It was written by omx 99.0.0.*upgrade omx",
    ),
    "unknown parameter from a newer omx": (
        "ridge",
        lambda f: (_edit_params(f, **FUTURE), _edit_nested(f, "init_params", new_option=1)),
        r"written by omx 99.0.0, newer than this omx.*parameters \['new_option'\].*Upgrade omx",
    ),
    "missing state": (
        "ridge",
        lambda f: _edit_nested(f, "state", drop=("n_targets", "alpha_")),
        r"lacks the fitted values \['n_targets', 'alpha_'\] that Ridge needs",
    ),
    "object array (pickle)": ("ridge", _object_array, r"holds 'coef' as an object array.*never loads"),
    "pickle file as weights": (
        "ridge",
        lambda f: ((f / "weights.npz").write_bytes(pickle.dumps({"coef": [1.0]})), _restamp(f, "weights.npz")),
        r"weights.npz is a pickle file.*never loads",
    ),
    "torch weights truncated": (
        "cnn",
        lambda f: (f / "weights.pt").write_bytes((f / "weights.pt").read_bytes()[:100]),
        r"weights.pt is 100 bytes.*truncated",
    ),
    "pickled object in torch weights": ("cnn", _pickle_in_torch_file, r"weights.pt holds pickled Python objects"),
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, linear_data, cnn_data):
    """A fitted Ridge and CNNRegressor and the folders they were saved in."""
    X, Y, groups = linear_data
    ridge = Ridge(alpha=1.0, show_progress_bar=False).fit(X, Y, groups=groups)
    patches, Yp, pgroups = cnn_data
    cnn = CNNRegressor(**{**CNN_FAST, "epochs": 1}).fit(patches, Yp, groups=pgroups)
    root = tmp_path_factory.mktemp("saved")
    ridge.save(root / "ridge")
    cnn.save(root / "cnn")
    return {"ridge": (ridge, root / "ridge", (X, groups)), "cnn": (cnn, root / "cnn", (patches, None))}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_foreign_or_newer_model_files_give_clear_errors(case, saved_models, tmp_path):
    import shutil

    name, damage, message = CORRUPTIONS[case]
    folder = shutil.copytree(saved_models[name][1], tmp_path / name)
    damage(folder)
    with pytest.raises(omx.models.ModelFileError, match=message) as info:
        omx.models.load(folder)
    assert isinstance(info.value, ValueError)


def test_no_model_in_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        omx.models.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"No params.json in .*holds no saved model"):
        omx.models.load(tmp_path)
    (tmp_path / ".weights.npz.x1.tmp").write_bytes(b"")  # what a save killed half-way leaves
    with pytest.raises(FileNotFoundError, match=r"save into it was cut short"):
        omx.models.load(tmp_path)


@pytest.mark.parametrize("name", ["ridge", "cnn"])
def test_saved_files_are_recorded_and_round_trip_bit_identical(name, saved_models):
    import hashlib

    model, folder, (X, groups) = saved_models[name]
    params = json.loads((folder / "params.json").read_text())
    assert params["format"] == omx.models._files.FORMAT == 1
    weights = folder / params["weights"]
    assert params["files"] == {
        weights.name: {"size": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    }
    assert sorted(p.name for p in folder.iterdir()) == sorted(["params.json", weights.name])  # no temporary files
    loaded = omx.models.load(folder, device="cpu")
    kwargs = {} if groups is None else {"groups": groups}
    np.testing.assert_array_equal(loaded.predict(X, **kwargs), model.predict(X, **kwargs))
    (state, arrays), (state2, arrays2) = model._get_state(), loaded._get_state()
    assert state == state2 and arrays.keys() == arrays2.keys()
    for key in arrays:
        assert arrays[key].dtype == arrays2[key].dtype
        np.testing.assert_array_equal(arrays[key], arrays2[key])


@pytest.mark.parametrize("name", ["ridge", "cnn"])
def test_models_saved_before_the_format_still_load(name, saved_models, tmp_path):
    import shutil
    import warnings

    model, original, (X, groups) = saved_models[name]
    folder = shutil.copytree(original, tmp_path / name)
    _edit_params(folder, format=None, files=None)  # what omx wrote before it recorded format and checksums
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = omx.models.load(folder, device="cpu")
    kwargs = {} if groups is None else {"groups": groups}
    np.testing.assert_array_equal(loaded.predict(X, **kwargs), model.predict(X, **kwargs))
    weights = folder / json.loads((folder / "params.json").read_text())["weights"]
    weights.write_bytes(weights.read_bytes()[:200])  # no checksum to catch it: the reader's error is wrapped
    with pytest.raises(omx.models.ModelFileError, match=r"cannot be read as the weights of a .*before omx recorded"):
        omx.models.load(folder, device="cpu")


def test_model_from_a_newer_omx_of_the_same_format_loads_with_a_warning(saved_models, tmp_path):
    import shutil

    model, original, (X, groups) = saved_models["ridge"]
    folder = shutil.copytree(original, tmp_path / "ridge")
    _edit_params(folder, omx_version="99.0.0")
    with pytest.warns(omx.OmxWarning, match=r"written by omx 99.0.0, newer than this omx \(.+\).*upgrade omx"):
        loaded = omx.models.load(folder)
    np.testing.assert_array_equal(loaded.predict(X, groups=groups), model.predict(X, groups=groups))


def test_a_failed_save_leaves_the_previous_model(saved_models, tmp_path, monkeypatch):
    import shutil

    model, original, (X, groups) = saved_models["ridge"]
    folder = shutil.copytree(original, tmp_path / "ridge")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half_written(file, arrays):
        file.write_bytes(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(model, "_save_arrays", half_written)
    with pytest.raises(OSError, match="disk full"):
        model.save(folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no debris, the old model intact
    monkeypatch.undo()
    cnn = saved_models["cnn"][0]
    cnn.save(folder, overwrite=True)  # another class: the old weights file goes with the old model
    assert sorted(p.name for p in folder.iterdir()) == ["params.json", "weights.pt"]
    assert isinstance(omx.models.load(folder, device="cpu"), CNNRegressor)


def test_version_tuple():
    from omx.models._files import version_tuple

    assert version_tuple("0.2.1.dev3+g12ab") == (0, 2, 1)
    assert version_tuple("1.0") == version_tuple("1.0.0") == (1,)
    assert version_tuple("unknown") is None and version_tuple(None) is None
