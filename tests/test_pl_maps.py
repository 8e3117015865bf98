import matplotlib

matplotlib.use("Agg")

import anndata as ad
import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import shapely
from matplotlib.collections import EllipseCollection
from matplotlib.image import AxesImage
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import get_transformation

import omx
from omx._schema import Key

MPP = 2.0  # microns per pixel of the toy image, so that pixels and microns differ
BIN_PX = 8  # side of a square bin in image pixels (16 um)
GRID_X0, GRID_Y0 = 40, 24  # top-left corner of the grid in image pixels
GRID_ROWS, GRID_COLS = 30, 40
GENES = ["gene_0", "gene_1", "gene_2"]


def _toy():
    return omx.datasets.toy_sdata(n_spots=60, n_genes=5, n_sections=1, seed=0, mpp=MPP)


def _image_transformations(sdata):
    """The transformations of the image's level 0: shapes drawn in its pixels carry the same."""
    return get_transformation(sdata.images["S1_he"], get_all=True)


def _prediction_table(shapes_key, index, xy_um, values, *, section="S1", genes=GENES):
    """A table of predictions laid out as omx.tl's prediction_table makes it."""
    obs = pd.DataFrame(
        {"region": shapes_key, "unit_id": np.asarray(index), "section": section},
        index=[f"{section}_{i}" for i in index],
    )
    obs["region"] = obs["region"].astype("category")
    adata = ad.AnnData(X=np.asarray(values, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = np.asarray(xy_um, dtype=np.float64)
    adata.uns[Key.UNS] = {"omx_pred": {"target_scale": Key.TARGET_SCALE, "written": ["X"]}}
    adata.uns[Key.TABLE_MARK] = "predictions"
    return TableModel.parse(adata, region=shapes_key, region_key="region", instance_key="unit_id")


def add_square_grid(sdata, *, shapes_key="S1_grid", table_key="omx_pred"):
    """Square bins over part of the image (a round hole without bins), in its pixels, and their predictions.

    Returns the bins' array_row, array_col and the predictions (bins x genes).
    """
    row, col = np.divmod(np.arange(GRID_ROWS * GRID_COLS), GRID_COLS)
    x0, y0 = GRID_X0 + col * BIN_PX, GRID_Y0 + row * BIN_PX
    hole = (row - 15) ** 2 + (col - 25) ** 2 <= 16  # bins left out: NaN in the raster
    row, col, x0, y0 = row[~hole], col[~hole], x0[~hole], y0[~hole]
    gdf = gpd.GeoDataFrame(
        {"array_row": row, "array_col": col},
        geometry=shapely.box(x0, y0, x0 + BIN_PX, y0 + BIN_PX),
        index=pd.RangeIndex(len(row)),
    )
    sdata.shapes[shapes_key] = ShapesModel.parse(gdf, transformations=_image_transformations(sdata))
    values = np.c_[col / GRID_COLS, row / GRID_ROWS, np.sin(col / 4.0) * np.cos(row / 5.0)] * 3
    centres_um = np.c_[x0 + BIN_PX / 2, y0 + BIN_PX / 2] * MPP
    sdata.tables[table_key] = _prediction_table(shapes_key, gdf.index, centres_um, values)
    return row, col, values


def add_hex_grid(sdata, *, shapes_key="S1_hex", table_key="omx_hex", pitch_um=40.0, section="S1"):
    """Circles on a hex lattice (Visium offset rows: array_col = 2 * column + row % 2), in microns."""
    n_rows, n_cols = 14, 16
    row, c = np.divmod(np.arange(n_rows * n_cols), n_cols)
    x_um = 120 + (c + 0.5 * (row % 2)) * pitch_um
    y_um = 100 + row * pitch_um * np.sqrt(3) / 2
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(row), pitch_um * 0.45 / MPP), "array_row": row, "array_col": 2 * c + row % 2},
        geometry=gpd.points_from_xy(x_um / MPP, y_um / MPP),  # in pixels, with the image's transformations
    )
    sdata.shapes[shapes_key] = ShapesModel.parse(gdf, transformations=_image_transformations(sdata))
    values = np.c_[x_um / 100, y_um / 100, np.hypot(x_um - 500, y_um - 400) / 100]
    sdata.tables[table_key] = _prediction_table(shapes_key, gdf.index, np.c_[x_um, y_um], values, section=section)
    return x_um, y_um, values


def _images(ax):
    return [c for c in ax.get_children() if isinstance(c, AxesImage)]


def _colorbars(fig):
    """The colourbars of a figure, in the order of the panels they belong to."""
    return [a._colorbar for a in fig.axes if a.get_label() == "<colorbar>"]


def _he_extent_um(sdata):
    h, w = (int(sdata.images["S1_he"].sizes[d]) for d in ("y", "x"))
    return w * MPP, h * MPP


@pytest.fixture
def sdata():
    return _toy()


def test_square_grid_is_one_raster_at_the_bins_footprint(sdata, tmp_path):
    row, col, values = add_square_grid(sdata)
    path = tmp_path / "grid.png"
    axes = omx.pl.prediction_map(sdata, GENES, save=path, show=False)
    assert len(axes) == 3 and path.stat().st_size > 10_000
    for j, a in enumerate(axes):
        background, raster = _images(a)
        # the H&E underneath: a copy of the whole image at its physical extent (the grid lies inside it)
        assert background.get_array().shape[2] == 3 and background.get_zorder() < raster.get_zorder()
        # one raster cell per bin: the raster spans the grid's columns and rows exactly, in microns
        left, right, bottom, top = raster.get_extent()
        np.testing.assert_allclose(left, GRID_X0 * MPP)
        np.testing.assert_allclose(top, GRID_Y0 * MPP)
        np.testing.assert_allclose(right, (GRID_X0 + GRID_COLS * BIN_PX) * MPP)
        np.testing.assert_allclose(bottom, (GRID_Y0 + GRID_ROWS * BIN_PX) * MPP)
        grid = np.asarray(raster.get_array().filled(np.nan))
        assert grid.shape == (GRID_ROWS, GRID_COLS)
        np.testing.assert_allclose(grid[row, col], values[:, j], rtol=1e-6)
        hole = np.ones(grid.shape, bool)
        hole[row, col] = False
        assert hole.sum() > 0 and np.isnan(grid[hole]).all()  # no bin: NaN, drawn transparent
        assert raster.get_interpolation() == "nearest"
        assert a.get_title() == GENES[j]
        # robust limits of the gene's values, the colourbar labelled with the scale
        assert raster.norm.vmax == pytest.approx(np.percentile(values[:, j], 99))
        cbar = _colorbars(a.figure)[j]
        assert cbar.ax.get_ylabel() == Key.TARGET_SCALE
        assert (cbar.norm.vmin, cbar.norm.vmax) == (raster.norm.vmin, raster.norm.vmax)
    # a bin at a known place: the one at array (row 3, col 7) covers pixels x 96..104, y 48..56 (x2 um/px)
    a, k = axes[0], int(np.flatnonzero((row == 3) & (col == 7))[0])
    raster = _images(a)[1]
    left, right, bottom, top = raster.get_extent()
    cell_x = left + (np.array([7, 8]) * (right - left) / GRID_COLS)
    cell_y = top + (np.array([3, 4]) * (bottom - top) / GRID_ROWS)
    np.testing.assert_allclose(cell_x, [(GRID_X0 + 7 * BIN_PX) * MPP, (GRID_X0 + 8 * BIN_PX) * MPP])
    np.testing.assert_allclose(cell_y, [(GRID_Y0 + 3 * BIN_PX) * MPP, (GRID_Y0 + 4 * BIN_PX) * MPP])
    assert raster.get_array()[3, 7] == pytest.approx(values[k, 0])
    plt.close(axes[0].figure)


def test_background_has_the_image_extent_and_crop_sets_limits(sdata):
    add_square_grid(sdata)
    a = omx.pl.prediction_map(sdata, "gene_0", scalebar=False, show=False)[0]
    background = _images(a)[0]
    w_um, h_um = _he_extent_um(sdata)
    left, right, bottom, top = background.get_extent()
    assert left <= GRID_X0 * MPP and top <= GRID_Y0 * MPP  # the image read around the grid, in microns
    assert right <= w_um + 1e-9 and bottom <= h_um + 1e-9
    assert right >= (GRID_X0 + GRID_COLS * BIN_PX) * MPP and bottom >= (GRID_Y0 + GRID_ROWS * BIN_PX) * MPP

    crop = (200.0, 400.0, 150.0, 300.0)
    a = omx.pl.prediction_map(sdata, "gene_0", crop=crop, show=False)[0]
    assert a.get_xlim() == pytest.approx((200, 400)) and a.get_ylim() == pytest.approx((300, 150))
    raster = _images(a)[1]
    left, right, bottom, top = raster.get_extent()
    assert left <= 200 and right >= 400 and top <= 150 and bottom >= 300  # the bins that reach into the crop
    assert (right - left) / raster.get_array().shape[1] == pytest.approx(BIN_PX * MPP)  # still one cell per bin
    plt.close("all")


def test_circles_are_drawn_at_their_true_radius(sdata):
    x_um, y_um, values = add_hex_grid(sdata)
    axes = omx.pl.prediction_map(sdata, ["gene_0", "gene_2"], table_key="omx_hex", ncols=2, show=False)
    assert len(axes) == 2
    for j, a in zip([0, 2], axes, strict=True):
        (coll,) = [c for c in a.collections if isinstance(c, EllipseCollection)]
        np.testing.assert_allclose(coll.get_offsets(), np.c_[x_um, y_um])
        np.testing.assert_allclose(coll.get_widths(), 2 * 0.45 * 40.0)  # diameters in microns
        np.testing.assert_allclose(coll.get_array(), values[:, j])
        assert len(_images(a)) == 1  # the H&E only
    plt.close("all")


def test_title_of_one_panel_stays_inside_the_figure(sdata):
    add_hex_grid(sdata, shapes_key="S1_hexagonal_grid_of_55um", table_key="omx_predictions_on_the_grid")
    a = omx.pl.prediction_map(sdata, "gene_0", table_key="omx_predictions_on_the_grid", show=False)[0]
    fig = a.figure
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert "S1_hexagonal_grid_of_55um" in fig.get_suptitle().replace("\n", " ")
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1  # wrapped, not cut at the figure's edges
    plt.close("all")


def test_spot_predictions_in_a_layer_of_the_measured_table(sdata):
    table = sdata.tables["table"]
    pred = np.log1p(np.asarray(table.X.todense(), dtype=np.float32))
    pred[:5] = np.nan  # spots without predictions are left out
    table.layers["omx_pred"] = pred
    with pytest.raises(KeyError, match=r"no table 'omx_pred'.*layer='omx_pred'"):
        omx.pl.prediction_map(sdata, "gene_1", show=False)
    with pytest.raises(ValueError, match="not made by omx.*layer="):
        omx.pl.prediction_map(sdata, "gene_1", table_key="table", show=False)
    a = omx.pl.prediction_map(sdata, "gene_1", table_key="table", layer="omx_pred", show=False)[0]
    (coll,) = [c for c in a.collections if isinstance(c, EllipseCollection)]
    np.testing.assert_allclose(coll.get_array(), pred[5:, 1])
    assert _colorbars(a.figure)[0].ax.get_ylabel() == "omx_pred"  # no scale recorded: the layer's name
    plt.close("all")


def test_sections_and_errors(sdata):
    add_square_grid(sdata)
    with pytest.raises(KeyError, match=r"\['nope'\] are not in the table.*include \['gene_0', 'gene_1'"):
        omx.pl.prediction_map(sdata, ["gene_0", "nope"], show=False)
    with pytest.raises(ValueError, match="`crop` must have x0 < x1"):
        omx.pl.prediction_map(sdata, "gene_0", crop=(10, 0, 0, 10), show=False)
    with pytest.raises(ValueError, match="No unit of section 'S1' lies in crop"):
        omx.pl.prediction_map(sdata, "gene_0", crop=(5000, 6000, 0, 10), show=False)
    sdata.tables["omx_pred"].X[:, 2] = np.nan  # a gene the model did not predict
    with pytest.raises(ValueError, match=r"no predictions for \['gene_2'\] in section 'S1'"):
        omx.pl.prediction_map(sdata, ["gene_0", "gene_2"], show=False)
    with pytest.raises(ValueError, match="Pass 1 axes as `ax=`, got 2"):
        omx.pl.prediction_map(sdata, "gene_0", ax=list(plt.subplots(1, 2)[1]), show=False)
    # a table covering two sections: one of them must be named
    table = sdata.tables["omx_pred"]
    table.obs["section"] = np.where(np.arange(table.n_obs) % 2 == 0, "S1", "S2")
    with pytest.raises(ValueError, match=r"Ambiguous section.*\['S1', 'S2'\].*section="):
        omx.pl.prediction_map(sdata, "gene_0", show=False)
    with pytest.raises(KeyError, match=r"no section 'S3'.*\['S1', 'S2'\]"):
        omx.pl.prediction_map(sdata, "gene_0", section="S3", show=False)
    a = omx.pl.prediction_map(sdata, "gene_0", section="S2", show=False)[0]
    grid = _images(a)[1].get_array().filled(np.nan)
    assert np.isfinite(grid).sum() == (table.obs["section"] == "S2").sum()
    plt.close("all")


def test_into_given_axes_with_fixed_limits(sdata):
    add_square_grid(sdata)
    fig, ax = plt.subplots()
    out = omx.pl.prediction_map(sdata, "gene_1", ax=ax, vmin=0, vmax=1.5, cmap="magma", show=False)
    assert out == [ax] and fig.get_suptitle() == ""
    raster = _images(ax)[1]
    assert (raster.norm.vmin, raster.norm.vmax) == (0, 1.5) and raster.cmap.name == "magma"
    assert _colorbars(fig)[0].extend == "max"  # values above 1.5 exist: an arrow on the colourbar
    with pytest.raises(ValueError, match="percentile such as 'p99'"):
        omx.pl.prediction_map(sdata, "gene_1", vmax="99%", show=False)
    plt.close("all")


def add_rotated_grid(sdata, *, angle_deg=20.0, side_px=6.0, shapes_key="S1_rot", table_key="omx_rot"):
    """Square bins of a lattice turned by ``angle_deg`` (a slide scanned askew), with array_row / array_col."""
    n = 24
    row, col = np.divmod(np.arange(n * n), n)
    keep = (row - 12) ** 2 + (col - 12) ** 2 <= 121  # a disc of bins
    row, col = row[keep] + 5, col[keep] + 3
    theta = np.deg2rad(angle_deg)
    u = side_px * np.array([np.cos(theta), np.sin(theta)])  # one column along the lattice, in pixels
    v = side_px * np.array([-np.sin(theta), np.cos(theta)])  # one row
    centres = np.array([200.0, 60.0]) + col[:, None] * u + row[:, None] * v
    corners = centres[:, None, :] + np.array([-0.5, 0.5, 0.5, -0.5])[None, :, None] * u
    corners = corners + np.array([-0.5, -0.5, 0.5, 0.5])[None, :, None] * v
    gdf = gpd.GeoDataFrame({"array_row": row, "array_col": col}, geometry=shapely.polygons(corners))
    sdata.shapes[shapes_key] = ShapesModel.parse(gdf, transformations=_image_transformations(sdata))
    values = np.c_[col / 10.0, row / 10.0, (row + col) % 3]
    sdata.tables[table_key] = _prediction_table(shapes_key, gdf.index, centres * MPP, values)
    return row, col, centres * MPP, values


def test_rotated_bins_with_array_indices_are_one_turned_raster(sdata):
    row, col, centres_um, values = add_rotated_grid(sdata)
    a = omx.pl.prediction_map(sdata, "gene_2", table_key="omx_rot", show=False)[0]
    raster = _images(a)[1]
    grid = raster.get_array().filled(np.nan)
    i, j = row - row.min(), col - col.min()
    np.testing.assert_allclose(grid[i, j], values[:, 2], rtol=1e-6)
    assert np.isnan(grid).sum() == grid.size - len(row)
    # the raster is turned with the bins: cell (i, j)'s centre lands on bin (i, j)'s centre, its corner on the
    # bin's corner
    display = raster.get_transform().transform(np.c_[j + 0.5, i + 0.5])
    np.testing.assert_allclose(display, a.transData.transform(centres_um), atol=1e-6)
    plt.close("all")


def test_circles_beyond_the_limit_are_painted_into_a_raster(sdata, monkeypatch):
    from omx.pl import _prediction_map

    x_um, y_um, values = add_hex_grid(sdata)
    monkeypatch.setattr(_prediction_map, "_MAX_CIRCLES", 100)  # 224 circles: rasterised
    monkeypatch.setattr(_prediction_map, "_CIRCLE_RASTER_PX", 256)
    a = omx.pl.prediction_map(sdata, "gene_0", table_key="omx_hex", show=False)[0]
    assert not [c for c in a.collections if isinstance(c, EllipseCollection)]
    raster = _images(a)[1]
    left, right, bottom, top = raster.get_extent()
    grid = raster.get_array().filled(np.nan)
    assert max(grid.shape) == 256
    cell = (right - left) / grid.shape[1]
    # each circle's centre cell holds its value; the gaps between circles are NaN
    cx = np.floor((x_um - left) / cell).astype(int)
    cy = np.floor((y_um - top) / cell).astype(int)
    np.testing.assert_allclose(grid[cy, cx], values[:, 0], rtol=1e-6)
    covered = np.isfinite(grid).sum() * cell**2
    true_area = len(x_um) * np.pi * (0.45 * 40.0) ** 2
    assert covered == pytest.approx(true_area, rel=0.1)  # the circles at their true size
    plt.close("all")


def _shrink_bins(sdata, factor):
    shapes = sdata.shapes["S1_grid"]
    shrunk = gpd.GeoDataFrame(
        {"array_row": shapes["array_row"].to_numpy()}, geometry=shapes.geometry.scale(factor, factor).values
    )
    sdata.shapes["S1_grid"] = ShapesModel.parse(shrunk, transformations=_image_transformations(sdata))


def test_polygons_off_a_lattice_are_drawn_as_circles_of_their_area(sdata):
    add_square_grid(sdata)
    _shrink_bins(sdata, 0.6)  # bins of 4.8 px every 8 px: no lattice has them as its cells
    a = omx.pl.prediction_map(sdata, "gene_0", show=False)[0]
    (coll,) = [c for c in a.collections if isinstance(c, EllipseCollection)]
    side_um = 0.6 * BIN_PX * MPP
    np.testing.assert_allclose(coll.get_widths(), 2 * side_um / np.sqrt(np.pi))  # equal-area circles
    assert len(_images(a)) == 1 and "polygons drawn as circles" in a.figure.get_suptitle()
    plt.close("all")


def test_bins_half_the_pitch_are_cells_of_a_finer_raster(sdata):
    row, col, values = add_square_grid(sdata)
    _shrink_bins(sdata, 0.5)  # bins of 4 px every 8 px: every other cell of a 4 px raster, NaN between
    a = omx.pl.prediction_map(sdata, "gene_0", show=False)[0]
    raster = _images(a)[1]
    grid = raster.get_array().filled(np.nan)
    assert grid.shape == (2 * GRID_ROWS - 1, 2 * GRID_COLS - 1)
    np.testing.assert_allclose(grid[2 * row, 2 * col], values[:, 0], rtol=1e-6)
    assert np.isfinite(grid).sum() == len(row)
    left, right, _, top = raster.get_extent()
    assert left == pytest.approx((GRID_X0 + 2) * MPP) and top == pytest.approx((GRID_Y0 + 2) * MPP)
    plt.close("all")
