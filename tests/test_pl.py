import matplotlib

matplotlib.use("Agg")

import anndata as ad
import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import EllipseCollection
from matplotlib.image import AxesImage
from scipy import sparse
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import omx.pl
from omx import metrics

MPP = 2.0  # microns per pixel of the full-resolution images
TISSUE = np.array([230, 150, 190], dtype=np.uint8)  # pink
GLASS = np.array([250, 250, 250], dtype=np.uint8)
GENES = ["GRAD_X", "GRAD_Y", "NOISE", "PATCHY"]


def _section(name: str, rng, *, cx: float, cy: float, rx: float, ry: float, shape=(260, 320)):
    """One section in the contract's layout: image in pixels, spots and Scale in microns."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((xx + 0.5 - cx / MPP) / (rx / MPP)) ** 2 + ((yy + 0.5 - cy / MPP) / (ry / MPP)) ** 2 <= 1
    rgb = np.where(tissue[..., None], TISSUE, GLASS).astype(np.uint8)
    nuclei = tissue & (rng.random((h, w)) < 0.02)
    rgb[nuclei] = (90, 40, 130)
    image = Image2DModel.parse(
        rgb.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2],
        transformations={name: Scale([MPP, MPP], axes=("y", "x"))},
    )
    # spots on a 40 um grid, kept where the whole spot lies on tissue
    radius = 12.0
    gx, gy = np.meshgrid(np.arange(20.0, w * MPP, 40.0), np.arange(20.0, h * MPP, 40.0))
    inside = ((gx - cx) / (rx - radius)) ** 2 + ((gy - cy) / (ry - radius)) ** 2 <= 1
    xy = np.c_[gx[inside], gy[inside]]
    gdf = gpd.GeoDataFrame({"radius": np.full(len(xy), radius)}, geometry=[Point(x, y) for x, y in xy])
    shapes = ShapesModel.parse(gdf, transformations={name: Identity()})
    return image, shapes, xy


def _counts(xy, rng):
    x = (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0])
    y = (xy[:, 1] - xy[:, 1].min()) / np.ptp(xy[:, 1])
    rates = np.c_[2 + 30 * x, 2 + 30 * y, np.full(len(x), 10.0), 2 + 40 * (np.sin(8 * x) * np.cos(6 * y) > 0.3)]
    other = rng.poisson(50, size=(len(x), 6))  # housekeeping genes so totals vary little
    return np.c_[rng.poisson(rates), other]


@pytest.fixture
def sdata():
    """Sections A and B, one table; predictions ("omx_pred") for B only, NaN for A and for one spot of B."""
    rng = np.random.default_rng(0)
    elements, obs, counts = {"images": {}, "shapes": {}}, [], []
    geometry = {"A": {"cx": 300, "cy": 260, "rx": 260, "ry": 200}, "B": {"cx": 340, "cy": 250, "rx": 220, "ry": 230}}
    for name, geo in geometry.items():
        image, shapes, xy = _section(name, rng, **geo)
        elements["images"][f"{name}_he"] = image
        elements["shapes"][f"{name}_spots"] = shapes
        obs.append(
            pd.DataFrame(
                {
                    "section": name,
                    "patient": "P1",
                    "region": f"{name}_spots",
                    "spot_id": np.arange(len(xy)),
                    "x": xy[:, 0],
                    "y": xy[:, 1],
                },
                index=[f"{name}_{int(x)}x{int(y)}" for x, y in xy],
            )
        )
        counts.append(_counts(xy, rng))
    obs = pd.concat(obs)
    for col in ("section", "patient", "region"):
        obs[col] = obs[col].astype("category")
    X = np.concatenate(counts)
    var = pd.DataFrame(index=GENES + [f"HK{i}" for i in range(6)])
    adata = ad.AnnData(X=sparse.csr_matrix(X.astype(np.float32)), obs=obs, var=var)
    adata.obsm["spatial"] = obs[["x", "y"]].to_numpy()
    lognorm = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    pred = (0.6 * lognorm + 0.4 * lognorm.mean(0) + rng.normal(0, 0.1, size=X.shape)).astype(np.float32)
    is_a = (obs["section"] == "A").to_numpy()
    pred[is_a] = np.nan
    pred[np.flatnonzero(~is_a)[0]] = np.nan  # a spot of B without prediction: skipped too
    adata.layers["omx_pred"] = pred
    adata.layers["lognorm"] = lognorm.astype(np.float32)
    table = TableModel.parse(adata, region=["A_spots", "B_spots"], region_key="region", instance_key="spot_id")
    sd = SpatialData(images=elements["images"], shapes=elements["shapes"], tables={"table": table})
    sd.attrs["omx"] = {"units": {"A": "um", "B": "um"}}
    return sd


def _spot_panels(fig):
    """(axes, image, spot collection) of every map panel of a figure."""
    out = []
    for a in fig.axes:
        colls = [c for c in a.collections if isinstance(c, EllipseCollection)]
        if colls:
            images = [im for im in a.get_children() if isinstance(im, AxesImage)]
            out.append((a, images[0] if images else None, colls[0]))
    return out


def test_expression_draws_shared_scales_and_saves(sdata, tmp_path):
    path = tmp_path / "expr.png"
    axes = omx.pl.expression(sdata, ["GRAD_X", "PATCHY"], save=path, show=False)
    assert len(axes) == 4
    fig = axes[0].figure
    assert path.stat().st_size > 10_000
    panels = _spot_panels(fig)
    assert len(panels) == 4
    table = sdata.tables["table"]
    n_b = int((table.obs["section"] == "B").sum())
    for (a_obs, im_obs, c_obs), (a_pred, im_pred, c_pred) in zip(panels[::2], panels[1::2], strict=True):
        assert im_obs is not None and im_pred is not None
        assert len(c_obs.get_array()) == len(c_pred.get_array()) == n_b - 1  # the NaN spot is skipped
        assert c_obs.norm.vmin == c_pred.norm.vmin and c_obs.norm.vmax == c_pred.norm.vmax
        assert "observed" in a_obs.get_title() and "r = " in a_pred.get_title()
    n_colorbars = sum(1 for a in fig.axes if a.get_label() == "<colorbar>")
    assert n_colorbars == 2
    assert "Section B" in fig.get_suptitle()
    plt.close(fig)


def test_expression_values_and_correlation(sdata):
    table = sdata.tables["table"]
    rows = np.flatnonzero((table.obs["section"] == "B").to_numpy())[1:]
    X = table.X.toarray()
    expected_obs = np.log1p(X[rows, 0] / X[rows].sum(1) * 1e4)
    expected_pred = table.layers["omx_pred"][rows, 0]
    fig = omx.pl.expression(sdata, "GRAD_X", section="B", show=False)[0].figure
    (a_obs, _, c_obs), (a_pred, _, c_pred) = _spot_panels(fig)
    # the spots are drawn in the shapes' order, which here equals the table's order
    np.testing.assert_allclose(np.sort(c_obs.get_array()), np.sort(expected_obs), rtol=1e-5)
    np.testing.assert_allclose(np.sort(c_pred.get_array()), np.sort(expected_pred), rtol=1e-5)
    r = np.corrcoef(c_obs.get_array(), c_pred.get_array())[0, 1]
    assert f"r = {r:.2f}" in a_pred.get_title()
    assert r > 0.8  # the gradient gene is predicted well
    lo, hi = np.percentile(np.r_[expected_obs, expected_pred], [1, 99])
    assert c_obs.norm.vmin == pytest.approx(lo) and c_obs.norm.vmax == pytest.approx(hi)
    plt.close(fig)


def test_expression_spots_lie_on_tissue(sdata):
    """Every spot centre falls on a tissue pixel of the background image, at the spot's true radius."""
    fig = omx.pl.expression(sdata, "GRAD_Y", show=False)[0].figure
    a, im, coll = _spot_panels(fig)[0]
    rgb = np.asarray(im.get_array())
    left, right, bottom, top = im.get_extent()
    xy = coll.get_offsets()
    cols = ((xy[:, 0] - left) / (right - left) * rgb.shape[1]).astype(int)
    rows = ((xy[:, 1] - top) / (bottom - top) * rgb.shape[0]).astype(int)
    on_tissue = np.all(rgb[rows, cols] != GLASS, axis=-1)
    assert on_tissue.all()
    # shapes are in microns, 12 um radius: the collection draws diameters in data units (microns)
    np.testing.assert_allclose(coll.get_widths(), 24.0, rtol=1e-6)
    # the image spans the microns of the section (B: 320 px * 2 um wide, cropped around the spots)
    assert 0 <= left < xy[:, 0].min() and right > xy[:, 0].max()
    plt.close(fig)


def test_expression_into_given_axes_observed_layer_and_spot_size(sdata, tmp_path):
    fig, axes = plt.subplots(2, 2, figsize=(6, 6))
    out = omx.pl.expression(sdata, ["GRAD_X", "GRAD_Y"], ax=axes, observed_layer="lognorm", spot_size=10, show=False)
    assert out == list(axes.ravel())
    (_, _, c_obs), _, _, _ = _spot_panels(fig)
    table = sdata.tables["table"]
    rows = np.flatnonzero((table.obs["section"] == "B").to_numpy())[1:]
    np.testing.assert_allclose(np.sort(c_obs.get_array()), np.sort(table.layers["lognorm"][rows, 0]), rtol=1e-6)
    np.testing.assert_allclose(c_obs.get_widths(), 10.0, rtol=1e-6)
    fig.savefig(tmp_path / "given_axes.png")
    with pytest.raises(ValueError, match="Pass 4 axes"):
        omx.pl.expression(sdata, ["GRAD_X", "GRAD_Y"], ax=axes.ravel()[:3], show=False)
    plt.close("all")


def test_expression_errors(sdata):
    with pytest.raises(KeyError, match="GRADX"):
        omx.pl.expression(sdata, "GRADX")
    with pytest.raises(KeyError, match=r"no layer 'missing'.*omx_pred.*fit_predict"):
        omx.pl.expression(sdata, "GRAD_X", layer="missing")
    with pytest.raises(KeyError, match=r"no section 'Z'.*\['A', 'B'\]"):
        omx.pl.expression(sdata, "GRAD_X", section="Z")
    with pytest.raises(ValueError, match="no predictions for section 'A'"):
        omx.pl.expression(sdata, "GRAD_X", section="A")
    table = sdata.tables["table"]
    table.layers["omx_pred"][:, GENES.index("NOISE")] = np.nan  # a gene the model did not predict
    with pytest.raises(ValueError, match=r"no predictions for \['NOISE'\] in section 'B'"):
        omx.pl.expression(sdata, ["GRAD_X", "NOISE"])
    with pytest.raises(ValueError, match="modelled genes"):
        omx.pl.expression(sdata, "NOISE")
    with pytest.raises(KeyError, match="observed_layer"):
        omx.pl.expression(sdata, "GRAD_X", observed_layer="nope")
    table = sdata.tables["table"]
    table.layers["omx_pred"] = np.nan_to_num(table.layers["omx_pred"])
    with pytest.raises(ValueError, match=r"Ambiguous section.*\['A', 'B'\].*section="):
        omx.pl.expression(sdata, "GRAD_X")
    fig = omx.pl.expression(sdata, "GRAD_X", section="A", show=False)[0].figure  # now A has predictions
    assert "Section A" in fig.get_suptitle()
    plt.close(fig)


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(80, 40))
    pred = y * np.linspace(0, 1, 40) + rng.normal(size=y.shape)
    pred[:, 3] = 1.0  # constant prediction: NaN correlation
    return metrics.gene_scores(y, pred, [f"gene{i}" for i in range(40)])


def test_gene_scores_from_frame(scores, tmp_path):
    ax_hist, ax_bar = omx.pl.gene_scores(scores, n_label=4, show=False, save=tmp_path / "scores.png")
    fig = ax_hist.figure
    assert fig.axes == [ax_hist, ax_bar] and (tmp_path / "scores.png").stat().st_size > 10_000
    mean = scores["pearson"].mean()
    assert any(np.allclose(line.get_xdata(), mean) for line in ax_hist.get_lines())
    assert "39 genes" in ax_hist.get_title() and "1 NaN" in ax_hist.get_title()
    names = [t.get_text() for t in ax_bar.get_yticklabels()]
    order = scores["pearson"].dropna().sort_values(ascending=False).index
    assert names == list(order[:4]) + list(order[-4:])
    plt.close(fig)


def test_gene_scores_mse_lower_is_better(scores):
    _, ax_bar = omx.pl.gene_scores(scores, metric="mse", n_label=2, show=False)
    names = [t.get_text() for t in ax_bar.get_yticklabels()]
    fig = ax_bar.figure
    order = scores["mse"].sort_values().index
    assert names[:2] == list(order[:2])
    plt.close(fig)


def test_gene_scores_from_table_uns_and_single_axes(scores):
    from omx._schema import scores_columns

    table = ad.AnnData(np.zeros((2, 2)))
    table.uns["omx"] = {"omx_pred": {"scores": scores_columns({"S2": scores})}}
    fig, ax = plt.subplots()
    out = omx.pl.gene_scores(table, metric="ccc", ax=ax, n_label=3, show=False)
    assert out == [ax] and ax.figure is fig
    text = " ".join(t.get_text() for t in ax.texts)
    best = scores["ccc"].dropna().sort_values(ascending=False).index[:3]
    assert all(g in text for g in best)
    with pytest.raises(KeyError, match="no omx result 'other'"):
        omx.pl.gene_scores(table, key="other", show=False)
    with pytest.raises(KeyError, match="No score 'r2'"):
        omx.pl.gene_scores(scores, metric="r2", show=False)
    plt.close("all")


def test_gene_scores_per_section(scores):
    from omx._schema import scores_columns

    shifted = scores.assign(pearson=scores["pearson"] + 0.1)
    table = ad.AnnData(np.zeros((2, 2)))
    table.uns["omx"] = {
        "fit": {"scores": scores_columns({"S2": scores})},  # one scored section (omx.tl.fit_predict)
        "cv": {"scores": scores_columns({"S1": scores, "S2": shifted}, fold={"S1": "a", "S2": "b"})},
    }
    ax_hist, _ = omx.pl.gene_scores(table, key="fit", show=False)
    assert "section S2" in ax_hist.get_title()
    ax_hist, _ = omx.pl.gene_scores(table, key="cv", section="S2", show=False)
    mean_line = ax_hist.get_lines()[0].get_xdata()[0]
    assert mean_line == pytest.approx(scores["pearson"].mean() + 0.1)
    ax_hist, _ = omx.pl.gene_scores(table, key="cv", show=False)  # averaged over the two sections, gene by gene
    assert "mean over 2 sections" in ax_hist.get_title()
    assert ax_hist.get_lines()[0].get_xdata()[0] == pytest.approx(scores["pearson"].mean() + 0.05)
    with pytest.raises(KeyError, match=r"No scores for sections \['S9'\].*\['S1', 'S2'\]"):
        omx.pl.gene_scores(table, key="cv", section="S9", show=False)
    with pytest.raises(ValueError, match="only applies when `scores` is a table"):
        omx.pl.gene_scores(scores, section="S1", show=False)
    plt.close("all")


def test_plots_after_fit_predict_on_toy_data(tmp_path):
    """End to end with the package's own toy data and front door."""
    import omx

    sdata = omx.datasets.toy_sdata(seed=0)
    omx.tl.fit_predict(sdata, train="S1", predict="S2", show_progress_bar=False)
    table = sdata.tables["table"]
    fig = omx.pl.expression(sdata, ["gene_0", "gene_1"], save=tmp_path / "toy.png", show=False)[0].figure
    assert "Section S2" in fig.get_suptitle()
    (_, im, coll), *_ = _spot_panels(fig)
    assert im is not None and len(coll.get_array()) == int((table.obs["section"] == "S2").sum())
    (ax_hist, _) = omx.pl.gene_scores(table, show=False, save=tmp_path / "toy_scores.png")
    assert "section S2" in ax_hist.get_title()
    plt.close("all")


@pytest.fixture(scope="module")
def sample():
    return omx.datasets.her2st_sample()


def test_cell_types_dominant_and_panels(sample, tmp_path):
    axes = omx.pl.cell_types(sample, key="stereoscope_major", section="C3", save=tmp_path / "ct.png", show=False)
    fig = axes[0].figure
    table = sample.tables["table"]
    n_types = table.obsm["stereoscope_major"].shape[1]
    drawn = [a for a in fig.axes if a.get_title()]  # colourbars have no title
    assert len(drawn) == 1 + n_types and axes == drawn
    c3 = (table.obs["section"] == "C3").to_numpy()
    dominant = drawn[0].collections[0].get_array()
    assert len(dominant) == c3.sum()
    expected = np.argmax(table.obsm["stereoscope_major"].to_numpy()[c3], axis=1)
    assert sorted(np.bincount(np.asarray(dominant, int), minlength=n_types)) == sorted(
        np.bincount(expected, minlength=n_types)
    )
    assert (tmp_path / "ct.png").stat().st_size > 10_000
    with pytest.raises(KeyError, match="obsm has no 'nope'"):
        omx.pl.cell_types(sample, key="nope", show=False)
    with pytest.raises(KeyError, match="are not columns"):
        omx.pl.cell_types(sample, key="stereoscope_major", section="C3", cell_types=["Neurons"], show=False)


def test_history_of_ridge_and_cnn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 5))
    Y = X[:, :2] + 0.1 * rng.normal(size=(90, 2))
    groups = np.repeat(["a", "b", "c"], 30)
    ridge = omx.models.Ridge(show_progress_bar=False).fit(X, Y, groups=groups)
    ax = omx.pl.history(ridge, show=False)
    assert len(ax.lines) == len(ridge.history_["n_components"]) and ax.get_xscale() == "log"
    patches = rng.integers(0, 256, size=(60, 16, 16, 3), dtype=np.uint8)
    cnn = omx.models.CNNRegressor(patch_px=16, epochs=3, patience=None, show_progress_bar=False)
    cnn.fit(patches, patches.mean(axis=(1, 2))[:, :2].astype(np.float32), groups=groups[:60].copy())
    ax = omx.pl.history(cnn, show=False)
    assert len(ax.lines[0].get_xdata()) == 3
    with pytest.raises(ValueError, match="no training history"):
        omx.pl.history(omx.models.Ridge(alpha=1.0, n_components=None), show=False)
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 100.0
    graph = omx.models.GraphRidge(show_progress_bar=False)
    graph.fit(X, Y, groups=groups, coords=np.concatenate([coords] * 3))
    ax = omx.pl.history(graph, show=False)
    assert len(ax.lines[0].get_xdata()) == len(graph.history_["propagation"]) and "propagation" in ax.get_title()


def test_uncertainty_panels_and_errors(sample):
    sdata = omx.datasets.her2st_sample("C4")
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    table.layers["p"] = rng.normal(2, 1, size=table.shape).astype(np.float32)
    with pytest.raises(KeyError, match="no layer 'p_var'"):
        omx.pl.uncertainty(sdata, ["GNAS"], layer="p", show=False)
    table.layers["p_var"] = rng.uniform(0.1, 1, size=table.shape).astype(np.float32)
    axes = omx.pl.uncertainty(sdata, ["GNAS", "SCD"], layer="p", show=False)
    drawn = [a for a in axes[0].figure.axes if a.get_title()]  # colourbars have no title
    assert len(drawn) == 6 and axes == drawn  # prediction, SD and |error| for each gene
    sd_values = np.asarray(drawn[1].collections[0].get_array())
    col = table.var_names.get_loc("GNAS")
    np.testing.assert_allclose(np.sort(sd_values), np.sort(np.sqrt(table.layers["p_var"][:, col])), rtol=1e-6)


def test_cell_types_draws_typed_nuclei():
    sdata = omx.datasets.her2st_sample()
    reference = omx.tl.signatures_from_proportions(sdata, key="stereoscope_major", sections=["C2", "C3"])
    omx.pp.segment_nuclei(sdata, image_key="C4_he", show_progress_bar=False)
    omx.tl.deconvolve(sdata, reference, sections="C4", max_rounds=10, show_progress_bar=False)
    omx.tl.assign_cells(sdata)
    axes = omx.pl.cell_types(sdata, section="C4", cell_types=["Epithelial"], show=False)
    drawn = {a.get_title(): a for a in axes}
    nuclei_panel = next(a for t, a in drawn.items() if t.startswith("nuclei by type"))
    n_cells = sdata.tables["omx_cells"].n_obs
    assert len(nuclei_panel.collections[0].get_array()) == n_cells
    assert len(drawn) == 4  # most abundant type, nuclei, Epithelial, the width of its 90 % interval
    table = sdata.tables["table"]
    c4 = (table.obs["section"] == "C4").to_numpy()
    want = (table.obsm["omx_proportions_q95"] - table.obsm["omx_proportions_q05"])["Epithelial"].to_numpy()[c4]
    got = np.asarray(drawn["Epithelial: 90 % interval width"].collections[0].get_array())
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=1e-6)
    no_nuclei = omx.pl.cell_types(
        sdata, section="C4", cell_types=["Epithelial"], cells_key=None, intervals=False, show=False
    )
    assert len(no_nuclei) == 2
    with pytest.raises(KeyError, match="intervals=True needs"):
        omx.pl.cell_types(sdata, key="stereoscope_major", section="C4", intervals=True, show=False)


# ------------------------------------------------------------------------------------- one way for every plot
def _history_model():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    Y = X[:, :2] + 0.1 * rng.normal(size=(60, 2))
    return omx.models.Ridge(show_progress_bar=False).fit(X, Y, groups=np.repeat(["a", "b", "c"], 20))


@pytest.fixture(scope="module")
def every_plot():
    """Each public plot as a call ``draw(**kwargs)``, on data it can draw."""
    import omx

    uncertain = omx.datasets.her2st_sample("C4")
    table = uncertain.tables["table"]
    rng = np.random.default_rng(0)
    table.layers["p"] = rng.normal(2, 1, size=table.shape).astype(np.float32)
    table.layers["p_var"] = rng.uniform(0.1, 1, size=table.shape).astype(np.float32)
    scores = metrics.gene_scores(rng.normal(size=(30, 8)), rng.normal(size=(30, 8)), [f"g{i}" for i in range(8)])
    sample = omx.datasets.her2st_sample("C3")
    model = _history_model()
    return {
        "expression": lambda sdata, **kw: omx.pl.expression(sdata, ["GRAD_X", "GRAD_Y"], **kw),
        "gene_scores": lambda sdata, **kw: omx.pl.gene_scores(scores, **kw),
        "cell_types": lambda sdata, **kw: omx.pl.cell_types(
            sample, key="stereoscope_major", cell_types=["B-cells"], **kw
        ),
        "uncertainty": lambda sdata, **kw: omx.pl.uncertainty(uncertain, "GNAS", layer="p", **kw),
        "history": lambda sdata, **kw: omx.pl.history(model, **kw),
        "prediction_map": lambda sdata, **kw: omx.pl.prediction_map(
            sdata, ["GRAD_X", "PATCHY"], table_key="table", layer="omx_pred", **kw
        ),
    }


def test_every_public_plot_is_listed(every_plot):
    assert set(every_plot) == set(omx.pl.__all__)


@pytest.mark.parametrize(
    "name", ["expression", "gene_scores", "cell_types", "uncertainty", "history", "prediction_map"]
)
def test_plots_return_axes_save_and_show(every_plot, sdata, tmp_path, name):
    from matplotlib.axes import Axes

    draw = every_plot[name]
    path = tmp_path / "sub" / f"{name}.pdf"
    out = draw(sdata, show=False, save=path)
    axes = [out] if name == "history" else out
    assert isinstance(out, Axes) if name == "history" else isinstance(out, list)
    assert axes and all(isinstance(a, Axes) for a in axes)
    assert len({a.figure for a in axes}) == 1 and all(a.has_data() or a.images or a.collections for a in axes)
    assert path.read_bytes()[:4] == b"%PDF"  # the suffix picks the format; the folder was made
    with omx.settings.override(figdir=tmp_path / "figs"):
        draw(sdata, show=False, save=True)
    assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 5_000
    assert draw(sdata, show=True) is None  # shown: nothing returned (Agg shows nothing)
    with omx.settings.override(autoshow=False):
        assert draw(sdata) is not None  # show omitted: omx.settings.autoshow decides
    with omx.settings.override(autoshow=True):
        assert draw(sdata) is None
    plt.close("all")


def test_plots_into_given_axes(every_plot, sdata):
    fig, axes = plt.subplots(1, 2)
    assert omx.pl.history(_history_model(), ax=axes[0], show=False) is axes[0]
    assert omx.pl.gene_scores(metrics.gene_scores(np.eye(5), np.eye(5), list("abcde")), ax=axes, show=False) == list(
        axes
    )
    plt.close("all")


def test_section_key_and_table_key(sdata):
    table = sdata.tables["table"]
    table.obs["slide"] = table.obs["section"]
    del table.obs["section"]
    with pytest.raises(KeyError, match="no obs column 'sektion'"):
        omx.pl.expression(sdata, "GRAD_X", section_key="sektion", show=False)
    axes = omx.pl.expression(sdata, "GRAD_X", section_key="slide", show=False)
    assert "Section B" in axes[0].figure.get_suptitle()
    # without a "section" column, the default falls back to the region column: one section per shapes element
    axes = omx.pl.expression(sdata, "GRAD_X", section="B_spots", show=False)
    assert "Section B_spots" in axes[0].figure.get_suptitle()
    # table_key=None: the measured table, as in omx.tl, even beside a table that omx made
    made = ad.AnnData(np.zeros((1, 1), np.float32), obs=pd.DataFrame({"region": ["A_spots"], "spot_id": [0]}))
    made.obs["region"] = made.obs["region"].astype("category")
    made.uns["omx_table"] = "predictions"
    sdata.tables["omx_pred"] = TableModel.parse(made, region="A_spots", region_key="region", instance_key="spot_id")
    axes = omx.pl.expression(sdata, "GRAD_X", section_key="slide", show=False)
    assert len(axes) == 2
    plt.close("all")


def test_expression_warns_on_non_integer_counts(sdata):
    table = sdata.tables["table"]
    table.X = table.X * 0.5
    with pytest.warns(omx.OmxWarning, match="table.X does not hold integer counts") as record:
        omx.pl.expression(sdata, "GRAD_X", show=False)
    assert record[0].filename == __file__
    plt.close("all")
