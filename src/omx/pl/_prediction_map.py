"""Predicted expression of any units (tile grids, spots, nuclei, super-resolved bins) over the H&E of one section."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.font_manager import FontProperties
from matplotlib.image import AxesImage
from matplotlib.transforms import Affine2D
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from scipy import sparse
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key, entries
from omx._utils import as_list, logger
from omx.pl._expression import _check_genes, _pick_section
from omx.pl._maps import _grid
from omx.pl._tissue import frame, padded_bounds, placed_spots
from omx.pl._utils import finish
from omx.pp._spots import section_column

#: Above this many circles, they are painted into one raster instead of drawn one by one: an EllipseCollection
#: of 400,000 circles takes about 2.5 s per panel to render, and at that density a circle is a pixel or two
#: of the saved figure anyway.
_MAX_CIRCLES = 200_000
#: Pixels along the longer side of the raster that circles are painted into (beyond ``_MAX_CIRCLES``).
_CIRCLE_RASTER_PX = 2048
#: Largest raster (cells) a square grid is drawn as; a sparser lattice is drawn as circles.
_MAX_RASTER_CELLS = 50_000_000
#: Relative tolerance of the square-lattice test (bin sides, and centres on the lattice).
_LATTICE_TOL = 1e-2


@dataclass
class Lattice:
    """Bins that tile a regular grid: bin ``k`` is raster cell ``(iy[k], ix[k])``.

    ``affine`` maps raster coordinates (``u`` along columns, ``v`` along rows; cell ``(i, j)`` is the square
    ``j <= u <= j + 1``, ``i <= v <= i + 1``) to level-0 pixels of the image: an axis-aligned grid when it has
    no rotation, any orientation otherwise.
    """

    ix: np.ndarray  # (n,) column of each bin
    iy: np.ndarray  # (n,) row of each bin
    shape: tuple[int, int]  # (rows, columns) of the raster
    affine: np.ndarray  # (3, 3) raster coordinates -> level-0 pixels

    @property
    def axis_aligned(self) -> bool:
        """Whether the raster's rows and columns run along the image's axes."""
        return bool(self.affine[0, 1] == 0 and self.affine[1, 0] == 0)

    def raster(self, values: np.ndarray) -> np.ndarray:
        """A ``shape`` float32 array with ``values`` in the bins' cells and NaN in cells without a bin."""
        grid = np.full(self.shape, np.nan, dtype=np.float32)
        grid[self.iy, self.ix] = values
        return grid

    def draw(self, ax: Axes, values: np.ndarray, mpp: float, **kwargs) -> AxesImage:
        """Draw the raster of ``values`` in microns, each cell exactly over its bin."""
        ny, nx = self.shape
        to_um = np.diag([mpp, mpp, 1.0]) @ self.affine
        if self.axis_aligned:  # a plain extent: left, right, bottom, top
            (left, top), (right, bottom) = (to_um @ [0, 0, 1])[:2], (to_um @ [nx, ny, 1])[:2]
            return ax.imshow(self.raster(values), extent=(left, right, bottom, top), interpolation="nearest", **kwargs)
        transform = Affine2D(to_um) + ax.transData
        return ax.imshow(
            self.raster(values), extent=(0, nx, ny, 0), transform=transform, interpolation="nearest", **kwargs
        )


def _polygons(sdata: SpatialData, spots):
    """The shapes of ``spots`` (in their order) when all are polygons, with the affine to level-0 pixels."""
    from omx.pp._spots import to_pixels

    shapes = sdata.shapes[spots.shapes_key]
    if not shapes.index.is_unique:
        return None
    pos = shapes.index.get_indexer(spots.index)
    if (pos < 0).any():
        return None
    shapes = shapes.iloc[pos]
    if set(shapes.geometry.geom_type.unique()) != {"Polygon"}:
        return None
    return shapes, to_pixels(shapes, spots.levels[0], spots.coordinate_system)


def square_lattice(sdata: SpatialData, spots) -> Lattice | None:
    """The grid that the polygons of ``spots`` tile, when they are bins of one regular lattice; else None.

    Two tests, on the geometry itself, so that one raster cell is exactly one bin's footprint:

    - axis-aligned: every polygon fills its bounding box, all boxes have one width and one height in image
      pixels, and their corners lie on the lattice of that pitch (contiguous bins, or bins spaced by whole
      bins, the cells between them NaN; no ``array_*`` columns needed);
    - any orientation (e.g. bins on a slightly rotated slide): the shapes have integer ``array_row`` and
      ``array_col``, the bins' centres are an affine function of them (within a tenth of a bin) and each
      polygon's area is that of one lattice cell (contiguous bins, neither gaps nor overlaps).

    Circles, spaced bins, hexagons and other polygons fail both; the caller draws them as circles.
    """
    found = _polygons(sdata, spots)
    if found is None:
        return None
    shapes, to_px = found
    return _aligned_lattice(shapes, to_px) or _array_lattice(shapes, to_px, spots.centers)


def _aligned_lattice(shapes, to_px: np.ndarray) -> Lattice | None:
    scale = np.abs(np.diag(to_px)[:2])
    if not (scale > 0).all() or np.abs(to_px[[0, 1], [1, 0]]).max() > 1e-9 * scale.max():
        return None  # rotated or sheared: bins are not axis-aligned in the image
    b = shapes.geometry.bounds.to_numpy(dtype=np.float64)  # minx, miny, maxx, maxy in the shapes' units
    box_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    if not np.allclose(shapes.geometry.area.to_numpy(), box_area, rtol=1e-3, atol=0):
        return None  # not rectangles
    xs = np.sort(np.c_[b[:, 0], b[:, 2]] * to_px[0, 0] + to_px[0, 2], axis=1)
    ys = np.sort(np.c_[b[:, 1], b[:, 3]] * to_px[1, 1] + to_px[1, 2], axis=1)
    index = []
    for lo_hi in (xs, ys):
        size = lo_hi[:, 1] - lo_hi[:, 0]
        side = float(np.median(size))
        if side <= 0 or np.abs(size - side).max() > _LATTICE_TOL * side:
            return None
        origin = float(lo_hi[:, 0].min())
        f = (lo_hi[:, 0] - origin) / side
        i = np.rint(f).astype(np.int64)
        if np.abs(f - i).max() > _LATTICE_TOL:
            return None
        index.append((i, origin, side))
    (ix, x0, wx), (iy, y0, wy) = index
    affine = np.array([[wx, 0.0, x0], [0.0, wy, y0], [0.0, 0.0, 1.0]])
    return _checked(ix, iy, affine)


def _array_lattice(shapes, to_px: np.ndarray, centers: np.ndarray) -> Lattice | None:
    if not {"array_row", "array_col"} <= set(shapes.columns) or len(shapes) < 3:
        return None
    rc = shapes[["array_row", "array_col"]].to_numpy(dtype=np.float64)
    if not np.isfinite(rc).all() or (rc != np.rint(rc)).any():
        return None
    row, col = rc[:, 0].astype(np.int64), rc[:, 1].astype(np.int64)
    design = np.c_[col, row, np.ones(len(row))]
    coef, *_ = np.linalg.lstsq(design, centers, rcond=None)  # (3, 2): per column, per row, offset
    step_col, step_row = coef[0], coef[1]
    cell_area = abs(step_col[0] * step_row[1] - step_col[1] * step_row[0])
    pitch = min(np.hypot(*step_col), np.hypot(*step_row))
    if not cell_area > 0 or np.abs(design @ coef - centers).max() > 0.1 * pitch:
        return None
    area_px = shapes.geometry.area.to_numpy() * abs(np.linalg.det(to_px[:2, :2]))
    if np.abs(area_px - cell_area).max() > 0.05 * cell_area:
        return None  # bins with gaps, overlapping, or not one cell each
    c0, r0 = int(col.min()), int(row.min())
    # raster coordinates (u, v) -> array (col, row) = (u - 0.5 + c0, v - 0.5 + r0) -> pixels
    to_array = np.array([[1.0, 0.0, c0 - 0.5], [0.0, 1.0, r0 - 0.5], [0.0, 0.0, 1.0]])
    affine = np.vstack([coef.T, [0.0, 0.0, 1.0]]) @ to_array
    return _checked(col - c0, row - r0, affine)


def _checked(ix: np.ndarray, iy: np.ndarray, affine: np.ndarray) -> Lattice | None:
    shape = (int(iy.max()) + 1, int(ix.max()) + 1)
    if shape[0] * shape[1] > _MAX_RASTER_CELLS:
        return None
    return Lattice(ix=ix, iy=iy, shape=shape, affine=affine)


@dataclass
class Discs:
    """Circles painted into a raster: raster cell ``pixels[k]`` (flat index) shows circle ``units[k]``."""

    pixels: np.ndarray
    units: np.ndarray
    shape: tuple[int, int]
    extent: tuple[float, float, float, float]  # left, right, bottom, top, in the units of the circles

    @classmethod
    def paint(cls, xy: np.ndarray, radius: np.ndarray, limits: tuple[float, float, float, float]) -> Discs:
        """Rasterise circles (centres ``xy``, ``radius``) over ``limits`` at ``_CIRCLE_RASTER_PX`` pixels across.

        A circle covers the raster cells whose centres lie within its radius of its own cell's centre (so a
        circle smaller than a cell still shows as that cell); where circles overlap, the last one drawn shows.
        """
        x0, x1, y0, y1 = limits
        cell = max(x1 - x0, y1 - y0) / _CIRCLE_RASTER_PX
        shape = (max(1, math.ceil((y1 - y0) / cell)), max(1, math.ceil((x1 - x0) / cell)))
        cx = np.floor((xy[:, 0] - x0) / cell).astype(np.int64)
        cy = np.floor((xy[:, 1] - y0) / cell).astype(np.int64)
        r_cells = np.round(2 * radius / cell) / 2  # radii in cells, to the half cell: a few stencils
        pixels, units = [], []
        for r in np.unique(r_cells):
            sel = np.flatnonzero(r_cells == r)
            reach = math.ceil(r)
            oy, ox = np.mgrid[-reach : reach + 1, -reach : reach + 1]
            disc = ox**2 + oy**2 <= max(r, 0.5) ** 2
            px, py = cx[sel, None] + ox[disc], cy[sel, None] + oy[disc]
            inside = (px >= 0) & (px < shape[1]) & (py >= 0) & (py < shape[0])
            pixels.append((py * shape[1] + px)[inside])
            units.append(np.broadcast_to(sel[:, None], px.shape)[inside])
        extent = (x0, x0 + shape[1] * cell, y0 + shape[0] * cell, y0)
        return cls(np.concatenate(pixels), np.concatenate(units), shape, extent)

    def raster(self, values: np.ndarray) -> np.ndarray:
        """A ``shape`` float32 array with each circle's value in its cells and NaN elsewhere."""
        grid = np.full(self.shape, np.nan, dtype=np.float32)
        grid.ravel()[self.pixels] = np.asarray(values)[self.units]
        return grid


def _limit(values: np.ndarray, spec: str | float | None, which: str) -> float:
    """A colour limit: a number, ``"pNN"`` (the NN-th percentile of ``values``) or None (their min or max)."""
    finite = values[np.isfinite(values)]
    if spec is None:
        return float(finite.min() if which == "vmin" else finite.max()) if finite.size else 0.0
    if isinstance(spec, str):
        match = re.fullmatch(r"p(\d+(?:\.\d*)?)", spec.strip())
        if match is None or float(match.group(1)) > 100:
            raise ValueError(f"`{which}` must be a number, None or a percentile such as 'p99', got {spec!r}.")
        return float(np.percentile(finite, float(match.group(1)))) if finite.size else 0.0
    return float(spec)


def _norm(values: np.ndarray, vmin, vmax) -> tuple[Normalize, str]:
    """The colour scale of one gene and the colourbar's ``extend`` (arrows where values lie beyond the limits)."""
    lo, hi = _limit(values, vmin, "vmin"), _limit(values, vmax, "vmax")
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    finite = values[np.isfinite(values)]
    below, above = bool((finite < lo).any()), bool((finite > hi).any())
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
    return Normalize(vmin=lo, vmax=hi), extend[below, above]


def _nice_length(span: float) -> float:
    """The largest of 1, 2, 5 times a power of ten that is at most a fifth of ``span``."""
    target = span / 5
    power = 10.0 ** math.floor(math.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)


def add_scalebar(ax: Axes, limits: tuple[float, float, float, float], unit: str) -> AnchoredSizeBar:
    """A scale bar of a round length (about a fifth of the width) in the lower right corner of ``ax``."""
    x0, x1, y0, y1 = limits
    length = _nice_length(x1 - x0)
    label = f"{length / 1000:g} mm" if unit == "µm" and length >= 1000 else f"{length:g} {unit}"
    bar = AnchoredSizeBar(
        ax.transData,
        length,
        label,
        loc="lower right",
        pad=0.3,
        borderpad=0.6,
        sep=3,
        size_vertical=(y1 - y0) / 120,
        color="black",
        frameon=True,
        fontproperties=FontProperties(size=7),
    )
    bar.patch.set(facecolor="white", alpha=0.75, edgecolor="none")
    ax.add_artist(bar)
    return bar


def _predictions(table: AnnData, table_key: str, layer: str | None) -> tuple[object, str, str]:
    """The matrix of predictions, how to name it in messages, and its scale (the colourbar's label)."""
    key = table_key if layer is None else layer
    entry = entries(table).get(key, {})
    scale = entry.get("target_scale") if isinstance(entry, Mapping) else None
    if layer is None:
        if table.uns.get(Key.TABLE_MARK) != "predictions":
            raise ValueError(
                f"Table {table_key!r} was not made by omx as a table of predictions, so its X is not taken for "
                f"them. Pass the layer that holds predictions as `layer=` (layers: {list(table.layers.keys())})."
            )
        return table.X, f"Table {table_key!r}", str(scale or Key.TARGET_SCALE)
    if layer not in table.layers:
        raise KeyError(
            f"Table {table_key!r} has no layer {layer!r} (layers: {list(table.layers.keys())}). Pass the layer "
            "with the predictions, or `layer=None` for the X of a table of predictions that omx made."
        )
    return table.layers[layer], f"Layer {layer!r}", str(scale or layer)


def _columns(M, cols: np.ndarray) -> np.ndarray:
    """``M[:, cols]`` as dense float64 (without copying the other columns of a large table)."""
    sub = M[:, cols]
    sub = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)
    return sub.astype(np.float64, copy=False)


def _check_crop(crop) -> tuple[float, float, float, float]:
    try:
        x0, x1, y0, y1 = (float(v) for v in crop)
    except (TypeError, ValueError):
        raise ValueError(f"`crop` must be four numbers (x0, x1, y0, y1), got {crop!r}.") from None
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"`crop` must have x0 < x1 and y0 < y1, got {crop!r}.")
    return x0, x1, y0, y1


@doc_params()
def prediction_map(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    table_key: str = Key.PRED,
    layer: str | None = None,
    section_key: str = "section",
    section: str | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    crop: tuple[float, float, float, float] | None = None,
    cmap: str | Colormap = "viridis",
    vmin: str | float | None = "p1",
    vmax: str | float | None = "p99",
    alpha: float = 1.0,
    ncols: int = 4,
    scalebar: bool = True,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | PathLike | bool | None = None,
) -> list[Axes] | None:
    """Plot predicted expression of any units over the H&E of one section, one panel per gene.

    The units are those of the shapes element the predictions annotate: bins of a tissue tile grid,
    super-resolved bins, nuclei, or measured spots. A low-resolution level of the image is drawn underneath at
    its physical extent, and the units over it in microns:

    - square (or rectangular) bins that tile a regular grid (the Visium HD 2/8/16 um layout, tile grids)
      become one raster with one cell per bin, NaN (transparent) where there is no bin, drawn with
      `~matplotlib.axes.Axes.imshow` over exactly the bins' footprint, so 400,000 bins render in about half a
      second and show no seams. Axis-aligned bins are recognised from their geometry; a grid turned against
      the image (a slide scanned askew) from integer ``array_row`` and ``array_col`` columns;
    - circles (hex grids, spots, nuclei) are drawn at their true radius; beyond 200,000 of them they are
      painted into a raster of 2048 pixels across the drawn area instead (drawn one by one they would take
      seconds per panel and be a pixel or two each);
    - any other polygons are drawn as circles at their centroid with their area.

    Each gene has its own colour scale (``vmin`` to ``vmax`` of the units drawn) and a colourbar labelled with
    the scale of the predictions (``uns["omx"][key]["target_scale"]``, usually ``log1p(counts / total * 1e4)``).

    Parameters
    ----------
    {sdata}
    genes
        One gene or a list of them.
    table_key
        The table with the predictions: a table of predictions that omx made (``uns["omx_table"] ==
        "predictions"``, predictions in ``X``), or any table together with ``layer``.
    layer
        The layer with the predictions, e.g. ``"omx_pred"`` of the measured spot table. Omitted, the ``X`` of a
        table of predictions.
    {section_key_pl}
    {section_pl}
    {image_key}
    shapes_key
        The units to draw; omitted, the shapes element that the section's rows annotate.
    crop
        ``(x0, x1, y0, y1)`` in microns to zoom on (the frame of ``obsm["spatial"]``: microns from the image's
        top-left corner); the image is read at a finer level for it. Omitted, the extent of the units.
    cmap
        Colour map of the predictions.
    vmin, vmax
        Colour limits: numbers, percentiles of each gene's values drawn (``"p1"``, ``"p99.5"``), or None for
        their minimum and maximum.
    alpha
        Opacity of the predictions over the image.
    ncols
        Panels per row.
    scalebar
        Draw a scale bar of a round length.
    ax
        ``len(genes)`` axes to draw into; a new figure when omitted.
    {show}
    {save}

    Returns
    -------
    With ``show=False``, one axes per gene (the figure is ``axes[0].figure``); otherwise None.

    Examples
    --------
    >>> omx.pl.prediction_map(sdata, ["ERBB2", "GNAS"])  # doctest: +SKIP
    >>> omx.pl.prediction_map(sdata, "ERBB2", table_key="table", layer="omx_pred", section="C4")  # doctest: +SKIP
    >>> omx.pl.prediction_map(sdata, "ERBB2", crop=(2000, 3000, 1500, 2500))  # doctest: +SKIP
    """
    genes = as_list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    if ncols < 1:
        raise ValueError(f"`ncols` must be at least 1, got {ncols}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
    crop = None if crop is None else _check_crop(crop)
    if table_key not in sdata.tables:
        with_layer = [k for k, t in sdata.tables.items() if Key.PRED in t.layers]
        hint = ""
        if with_layer:
            hint = f" Layer {Key.PRED!r} of {with_layer} holds predictions: pass `table_key=` and `layer={Key.PRED!r}`."
        raise KeyError(f"There is no table {table_key!r} (tables: {list(sdata.tables.keys())}).{hint}")
    table = sdata.tables[table_key]
    matrix, source, scale = _predictions(table, table_key, layer)
    cols = _check_genes(table, genes)

    column = section_column(table, section_key)
    sections = table.obs[column].astype(str).to_numpy()
    values_all = _columns(matrix, cols)
    has = ~np.isnan(values_all).all(axis=1)
    section = _pick_section(sections, has, section, source, column)
    what = f"predicted units of section {section!r}"
    mask = (sections == section) & has
    spots, unit = placed_spots(sdata, table_key, mask, what=what, image_key=image_key, shapes_key=shapes_key)

    if crop is not None:
        reach = 1.5 * spots.radius_px  # beyond the half diagonal of a square bin of this area
        x0, x1, y0, y1 = (c / spots.mpp for c in crop)
        cx, cy = spots.centers[:, 0], spots.centers[:, 1]
        inside = (cx + reach >= x0) & (cx - reach <= x1) & (cy + reach >= y0) & (cy - reach <= y1)
        if not inside.any():
            lo, hi = spots.centers.min(axis=0) * spots.mpp, spots.centers.max(axis=0) * spots.mpp
            raise ValueError(
                f"No unit of section {section!r} lies in crop {crop}; the units span x {lo[0]:.0f} to {hi[0]:.0f} "
                f"and y {lo[1]:.0f} to {hi[1]:.0f} {unit}."
            )
        spots = spots.subset(inside)
        bounds = (x0, x1, y0, y1)
    else:
        bounds = padded_bounds(spots.centers, spots.radius_px)
    view = frame(spots, spots.radius_px, bounds)
    values = values_all[spots.table_rows]
    if empty := [g for g, none in zip(genes, np.isnan(values).all(axis=0), strict=True) if none]:
        raise ValueError(f"{source} holds no predictions for {empty} in section {section!r} (all NaN) where drawn.")

    lattice, discs = square_lattice(sdata, spots), None
    polygons = set(sdata.shapes[spots.shapes_key].geom_type.unique()) != {"Point"}
    if lattice is not None:
        kind = "bins"
    else:
        kind = "polygons drawn as circles" if polygons else "circles"
        if spots.n_spots > _MAX_CIRCLES:
            discs, kind = Discs.paint(view.xy, view.radius, view.limits), f"{kind} (rasterised)"

    fig, axes = _grid(len(genes), ncols, view.aspect, ax)
    cmap = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    for a, gene, v in zip(axes, genes, values.T, strict=True):
        norm, extend = _norm(v, vmin, vmax)
        view.draw_background(a)
        if lattice is not None:  # one cell per bin, its edges the bins' edges
            lattice.draw(a, v, spots.mpp, cmap=cmap, norm=norm, alpha=alpha, zorder=1)
        elif discs is not None:
            # averaged in RGBA when shown smaller, so circles smaller than a pixel of the figure blend with the
            # gaps between them as drawn circles would, instead of aliasing into stripes
            grid = discs.raster(v)
            a.imshow(grid, extent=discs.extent, cmap=cmap, norm=norm, alpha=alpha, interpolation="antialiased",
                     interpolation_stage="rgba", zorder=1)  # fmt: skip
        else:
            ok = np.isfinite(v)
            view.draw_circles(a, v[ok], ok, cmap=cmap, norm=norm, alpha=alpha, zorder=1)
        view.set_view(a)
        a.set_title(gene, fontsize=10)
        if scalebar:
            add_scalebar(a, view.limits, unit)
        # the colourbar of the colour map itself, opaque whatever the `alpha` over the image
        cbar = fig.colorbar(ScalarMappable(norm, cmap), ax=a, shrink=0.8, pad=0.02, aspect=25, extend=extend)
        cbar.set_label(scale, fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    if ax is None:
        title = f"{table_key}, section {section}: {spots.n_spots:,} {kind} of {spots.shapes_key!r}"
        fig.suptitle(title, fontsize=10, wrap=True)  # wrapped within the figure: one panel is narrower than it
    logger.debug("Drew %d genes over %d %s of %r.", len(genes), spots.n_spots, kind, spots.shapes_key)
    return finish(list(axes), show=show, save=save, name="prediction_map")
