import numpy as np
import pytest

import omx
from omx.metrics import pearson
from omx.models import GraphRidge, GroupStandardizer, SpatialGraph, get_model

FAST = {"hidden": 32, "epochs": 15, "lr": 3e-3, "show_progress_bar": False}


def _grid(side):
    return np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(float) * 100.0


@pytest.fixture(scope="module")
def smooth_data():
    """3 sections on 18 x 18 grids; targets follow a smooth field that each spot's features see only noisily."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 8))
    X, Y, coords, groups = [], [], [], []
    for s in range(3):
        xy = _grid(15)
        phase = rng.uniform(0, 2 * np.pi, (3, 2))
        field = np.stack(
            [
                np.sin(xy[:, 0] / 100 * 0.3 + phase[k, 0]) * np.cos(xy[:, 1] / 100 * 0.25 + phase[k, 1])
                for k in range(3)
            ],
            axis=1,
        )
        X.append(np.concatenate([field + 2.0 * rng.normal(size=field.shape), rng.normal(size=(len(xy), 7))], 1))
        Y.append((field @ W + 0.3 * rng.normal(size=(len(xy), 8))).astype(np.float32))
        coords.append(xy)
        groups.append(np.full(len(xy), f"s{s}"))
    return np.concatenate(X), np.concatenate(Y), np.concatenate(coords), np.concatenate(groups)


@pytest.mark.parametrize("cls", [SpatialGraph, GraphRidge])
def test_graph_beats_same_predictor_without_graph(smooth_data, cls):
    X, Y, coords, groups = smooth_data
    tr = groups != "s2"
    scores = {}
    for n_layers in (0, 2):
        model = cls(n_layers=n_layers, **(FAST if cls is SpatialGraph else {"show_progress_bar": False}))
        model.fit(X[tr], Y[tr], groups=groups[tr], coords=coords[tr])
        pred = model.predict(X[~tr], groups=groups[~tr], coords=coords[~tr])
        assert pred.shape == (tr.sum() // 2, 8) and pred.dtype == np.float32
        scores[n_layers] = np.nanmean(pearson(Y[~tr], pred))
    assert scores[2] > scores[0] + 0.1, scores
    if cls is SpatialGraph:
        assert "val_score" in model.history_ and len(model.history_["val_score"]) >= 1
    else:  # the neighbour share is chosen by CV over the training sections; a smooth signal wants some
        assert model.propagation_ > 0 and len(model.history_["cv_pearson"]) == len(model.history_["propagation"])


def test_graph_ridge_is_ridge_then_propagation(smooth_data):
    from omx.models import Ridge
    from omx.models._neighbors import PROPAGATION_GRID, propagate, spatial_graph

    X, Y, coords, groups = smooth_data
    model = GraphRidge(show_progress_bar=False).fit(X, Y, groups=groups, coords=coords)
    ridge = Ridge(show_progress_bar=False).fit(X, Y, groups=groups)  # the same ridge, its own CV
    np.testing.assert_array_equal(model.ridge_.coef_, ridge.coef_)
    cv = model.history_["cv_pearson"]
    assert model.propagation_ == PROPAGATION_GRID[int(np.argmax(cv))] > 0
    held = groups == "s1"
    neighbours = spatial_graph(coords[held], groups[held], n_neighbors=6, self_loops=False)
    expected = propagate(ridge.predict(X[held], groups=groups[held]), neighbours, model.propagation_, n_layers=2)
    pred = model.predict(X[held], groups=groups[held], coords=coords[held])
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-5)
    alone = ridge.predict(X[held], groups=groups[held])
    assert np.nanmean(pearson(Y[held], pred)) > np.nanmean(pearson(Y[held], alone))


@pytest.mark.parametrize("conv", ["gcn", "attention"])
def test_subgraphs_equal_full_graph(conv):
    """Tiles with their full k-hop halos give the whole graph's outputs and gradients."""
    import torch

    rng = np.random.default_rng(1)
    coords = _grid(9)
    X = rng.normal(size=(len(coords), 5))
    Y = rng.normal(size=(len(coords), 3)).astype(np.float32)
    model = SpatialGraph(conv=conv, hidden=16, dropout=0.0, tile_size=9, show_progress_bar=False)
    model.standardizer_ = GroupStandardizer().fit(X)
    adj = model._build_graph(coords, None)
    deg = np.asarray(adj.sum(1)).ravel()
    torch.manual_seed(0)
    net = model._build(5, 3)
    model.module_ = net
    feats = torch.from_numpy(model._standardise(X, None))
    cpu = torch.device("cpu")
    everything = np.arange(len(X))
    _, full_edges, _ = model._subgraph(adj, deg, everything, cpu)
    full = net(feats, *full_edges)
    loss = ((full - torch.from_numpy(Y)) ** 2).sum()
    full_grad = torch.autograd.grad(loss, list(net.parameters()))

    tiles = model._tiles(coords, None, everything)
    assert len(tiles) > 4 and sum(len(t) for t in tiles) == len(X)
    tiled_out = torch.zeros_like(full)
    tiled_grad = [torch.zeros_like(p) for p in net.parameters()]
    for tile in tiles:
        seeds = np.sort(tile)
        nodes, edges, pos = model._subgraph(adj, deg, seeds, cpu)
        assert len(nodes) < len(X)  # a real subgraph
        out = net(feats[nodes], *edges)[pos]
        tiled_out[seeds] = out.detach()
        grads = torch.autograd.grad(((out - torch.from_numpy(Y[seeds])) ** 2).sum(), list(net.parameters()))
        tiled_grad = [a + b for a, b in zip(tiled_grad, grads, strict=True)]
    np.testing.assert_allclose(tiled_out.numpy(), full.detach().numpy(), atol=1e-5)
    for a, b in zip(tiled_grad, full_grad, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, rtol=1e-4)


def test_fit_is_deterministic_and_tiling_invariant_at_prediction(smooth_data):
    X, Y, coords, groups = smooth_data
    a = SpatialGraph(**{**FAST, "epochs": 3}).fit(X, Y, groups=groups, coords=coords)
    b = SpatialGraph(**{**FAST, "epochs": 3}).fit(X, Y, groups=groups, coords=coords)
    pa = a.predict(X, groups=groups, coords=coords)
    np.testing.assert_array_equal(pa, b.predict(X, groups=groups, coords=coords))
    import omx.models._gnn as graph_module

    chunk = graph_module.PREDICT_CHUNK
    graph_module.PREDICT_CHUNK = 37  # many small subgraphs instead of one
    try:
        np.testing.assert_allclose(a.predict(X, groups=groups, coords=coords), pa, atol=1e-5)
    finally:
        graph_module.PREDICT_CHUNK = chunk


@pytest.mark.parametrize(("cls", "likelihood"), [(GraphRidge, None), (SpatialGraph, "mse"), (SpatialGraph, "zinb")])
def test_save_load_round_trip(smooth_data, tmp_path, cls, likelihood):
    X, Y, coords, groups = smooth_data
    if likelihood not in (None, "mse"):
        Y = np.random.default_rng(0).poisson(np.exp(Y / 4) * 3).astype(np.float32)
    if cls is GraphRidge:
        model = GraphRidge(graph="delaunay", show_progress_bar=False)
    else:
        model = SpatialGraph(likelihood=likelihood, graph="delaunay", conv="attention", **{**FAST, "epochs": 2})
    model.fit(X, Y, groups=groups, coords=coords)
    model.save(tmp_path / "m")
    loaded = omx.models.load(tmp_path / "m")
    assert type(loaded) is cls and loaded.init_params_ == model.init_params_
    np.testing.assert_array_equal(
        loaded.predict(X, groups=groups, coords=coords), model.predict(X, groups=groups, coords=coords)
    )
    if likelihood == "zinb":
        _, v1 = model.predict(X, groups=groups, coords=coords, return_var=True)
        _, v2 = loaded.predict(X, groups=groups, coords=coords, return_var=True)
        np.testing.assert_array_equal(v1, v2)
        assert (v1 >= 0).all() and v1.shape == Y.shape


def test_errors(smooth_data):
    X, Y, coords, groups = smooth_data
    for cls in (GraphRidge, SpatialGraph):
        with pytest.raises(ValueError, match="graph must be one of"):
            cls(graph="grid")
        with pytest.raises(ValueError, match="needs `radius=`"):
            cls(graph="radius")
        with pytest.raises(ValueError, match="n_neighbors must be >= 1"):
            cls(n_neighbors=0)
        with pytest.raises(ValueError, match="pass `coords=`"):
            cls().fit(X, Y, groups=groups)
    far = coords.copy()
    far[[5, 40]] += 1e5  # two spots far from everything
    with pytest.raises(ValueError, match=r"2 of 225 spots of section 's0' have no neighbour.*larger `radius`"):
        SpatialGraph(graph="radius", radius=150.0, **FAST).fit(X, Y, groups=groups, coords=far)
    lonely = groups.astype(object)
    lonely[0] = "alone"
    with pytest.raises(ValueError, match="Section 'alone' has one spot"):
        SpatialGraph(**FAST).fit(X, Y, groups=lonely, coords=coords)
    with pytest.raises(ValueError, match="Section 'alone' has one spot"):
        GraphRidge(show_progress_bar=False).fit(X, Y, groups=lonely, coords=coords)
    with pytest.raises(ValueError, match="no counts"):  # the library sizes default to the row sums
        SpatialGraph(likelihood="nb", **FAST).fit(X, np.zeros_like(Y), groups=groups, coords=coords)
    with pytest.raises(ValueError, match="negative"):
        SpatialGraph(likelihood="nb", **FAST).fit(X, Y - 10, groups=groups, coords=coords)
    model = SpatialGraph(**{**FAST, "epochs": 1}).fit(X, Y, groups=groups, coords=coords)
    with pytest.raises(ValueError, match="count likelihood"):
        model.predict(X, groups=groups, coords=coords, return_var=True)
    assert type(get_model("graph")) is GraphRidge and type(get_model("gnn")) is SpatialGraph


def test_tl_count_likelihood_writes_prediction_and_variance():
    """NB head through omx.tl on toy data: layers written, and the variance is larger where errors are larger."""
    sdata = omx.datasets.toy_sdata(n_spots=150, n_genes=20, n_sections=2, seed=0)
    model = SpatialGraph(likelihood="nb", **FAST)
    omx.tl.fit_predict(sdata, train="S1", predict="S2", model=model, show_progress_bar=False)
    table = sdata.tables["table"]
    s2 = (table.obs["section"] == "S2").to_numpy()
    cols = table.var_names.get_indexer(model.meta_["genes"])
    pred = table.layers["omx_pred"][np.ix_(s2, cols)]
    var = table.layers["omx_pred_var"][np.ix_(s2, cols)]
    assert np.isfinite(pred).all() and np.isfinite(var).all() and (var > 0).all()
    assert np.isnan(table.layers["omx_pred_var"][~s2]).all()
    assert model.meta_["target_norm"] == "counts"
    truth = omx._utils.log_normalize(table.X[s2])[:, cols]
    err = np.abs(truth - pred).ravel()
    v = var.ravel()
    low, high = v <= np.quantile(v, 1 / 3), v >= np.quantile(v, 2 / 3)
    assert err[high].mean() > 1.5 * err[low].mean()
    assert table.uns["omx"]["omx_pred"]["summary"]["S2"]["all"]["pearson"] > 0.2


def test_contract_declarations(smooth_data):
    """What each graph model takes and gives, as declared to its callers."""
    X, Y, coords, groups = smooth_data
    ridge, gnn, nb = GraphRidge(), SpatialGraph(), SpatialGraph(likelihood="nb", n_layers=1)
    assert ridge.requires == gnn.requires == {"coords"} and ridge.target == gnn.target == "log"
    assert "group_stats" in ridge.uses and "library_size" in gnn.uses
    assert nb.target == "counts" and nb.provides_variance and not gnn.provides_variance and not ridge.provides_variance
    assert nb.init_params_["likelihood"] == "nb" and nb.init_params_["n_layers"] == 1
    assert ridge.init_params_["encoder"] == gnn.init_params_["encoder"] == "handcrafted"
    assert nb.clone(seed=3).init_params_ == {**nb.init_params_, "seed": 3}
    assert nb.to("cpu") is nb and nb.device == "cpu"
    # library sizes come in the context; the variance follows them
    counts = np.random.default_rng(0).poisson(np.exp(Y / 4) * 3).astype(np.float32)
    lib = counts.sum(1) + 1.0
    nb = SpatialGraph(likelihood="nb", **{**FAST, "epochs": 2})
    nb.fit(X, counts, omx.models.Context(groups=groups, coords=coords, library_size=lib))
    assert nb.library_size_ == np.median(lib)
    small = omx.models.Context(groups=groups, coords=coords, library_size=np.full(len(X), 10.0))
    large = omx.models.Context(groups=groups, coords=coords, library_size=np.full(len(X), 1e5))
    p1, v1 = nb.predict(X, small, return_var=True)
    p2, v2 = nb.predict(X, large, return_var=True)
    np.testing.assert_array_equal(p1, p2)  # the prediction is a rate: the library size sets only the variance
    assert v1.mean() > v2.mean()  # fewer counts, more counting noise
    for attr in ("_library_in", "_predict_library", "_return_var", "last_var_"):
        assert not hasattr(nb, attr)
