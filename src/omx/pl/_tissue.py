"""Drawing spots of one section over its H&E: the pieces that every tissue plot shares."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize
from spatialdata import SpatialData
from spatialdata.models import get_table_keys

if TYPE_CHECKING:
    from omx.pp import Spots

#: Side (pixels) that the background image is read at: the coarsest pyramid level that still has this many
#: pixels across the spots' extent, then subsampled to at most twice that.
_TARGET_PX = 800


@dataclass
class Canvas:
    """Spots of one section placed in microns, and a low-resolution copy of the image behind them."""

    image_key: str  # the image behind the spots
    rows: np.ndarray  # table row of each drawn spot
    xy: np.ndarray  # (n, 2) centres in microns
    radius: np.ndarray  # (n,) radii in microns
    background: tuple[np.ndarray, list[float]] | None  # (rgb, extent in microns)
    limits: tuple[float, float, float, float]  # x0, x1, y0, y1 in microns

    @property
    def aspect(self) -> float:
        """Height over width of the drawn area."""
        x0, x1, y0, y1 = self.limits
        return (y1 - y0) / max(x1 - x0, 1e-9)

    def draw_background(self, ax: Axes) -> None:
        """Draw the low-resolution image, at its physical extent, under everything else."""
        if self.background is not None:
            ax.imshow(self.background[0], extent=self.background[1], interpolation="bilinear", zorder=0)

    def draw_circles(self, ax: Axes, values: np.ndarray, mask: np.ndarray | None = None, **kwargs) -> EllipseCollection:
        """Draw the spots (``mask`` selects which) at their true radius, coloured by ``values``."""
        mask = np.ones(len(self.rows), bool) if mask is None else mask
        # An EllipseCollection in data units draws each spot at its true radius and scales to 10^5 spots,
        # unlike one Circle patch per spot.
        coll = EllipseCollection(
            widths=2 * self.radius[mask],
            heights=2 * self.radius[mask],
            angles=np.zeros(int(mask.sum())),
            units="xy",
            offsets=self.xy[mask],
            offset_transform=ax.transData,
            linewidths=0,
            **kwargs,
        )
        if values is not None:
            coll.set_array(np.asarray(values))
        ax.add_collection(coll, autolim=False)
        return coll

    def set_view(self, ax: Axes) -> None:
        """Limit ``ax`` to the drawn area, y pointing down as in the image, equal aspect and no ticks."""
        x0, x1, y0, y1 = self.limits
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])

    def draw(self, ax: Axes, values: np.ndarray, mask: np.ndarray | None = None, **kwargs) -> EllipseCollection:
        """Draw the background and the spots (``mask`` selects which) coloured by ``values``."""
        self.draw_background(ax)
        coll = self.draw_circles(ax, values, mask, **kwargs)
        self.set_view(ax)
        return coll


def placed_spots(
    sdata: SpatialData,
    table_key: str,
    rows_mask: np.ndarray,
    *,
    what: str,
    image_key: str | None = None,
    shapes_key: str | None = None,
) -> tuple[Spots, str]:
    """The shapes of the table rows selected by ``rows_mask`` (all of one section), placed in their image's pixels.

    Returns the spots that have a selected row (``spots.table_rows`` gives it) and the unit they are drawn in:
    ``"µm"``, or ``"px"`` when the coordinate system is not in microns (``spots.mpp`` is then 1).
    """
    from omx.pp import resolve_spots

    table = sdata.tables[table_key]
    _, region_key, _ = get_table_keys(table)
    region = table.obs[region_key].astype(str).to_numpy()
    regions = sorted(set(region[rows_mask]))
    if shapes_key is None:
        if len(regions) > 1:
            raise ValueError(f"The {what} span several shapes elements {regions}. Pass `shapes_key=`.")
        shapes_key = regions[0]
    elif shapes_key not in regions:
        raise KeyError(f"The {what} are annotated by {regions}, not {shapes_key!r}.")
    rows_mask = rows_mask & (region == shapes_key)
    unit = "µm"
    try:
        spots = resolve_spots(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
    except ValueError as err:  # the image is fine but not in microns: draw in pixels
        if "microns per pixel" not in str(err):
            raise
        spots = resolve_spots(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, mpp=1.0)
        unit = "px"
    keep = spots.table_rows >= 0
    keep[keep] = rows_mask[spots.table_rows[keep]]
    spots = spots.subset(keep)
    if spots.n_spots == 0:
        raise ValueError(f"No spot of {shapes_key!r} has a row among the {what} in table {table_key!r}.")
    return spots, unit


def canvas(
    sdata: SpatialData,
    table_key: str,
    rows_mask: np.ndarray,
    *,
    what: str,
    image_key: str | None = None,
    shapes_key: str | None = None,
    spot_size: float | None = None,
) -> Canvas:
    """Place the table rows selected by ``rows_mask`` (all of one section) over their image, in microns."""
    spots, _ = placed_spots(sdata, table_key, rows_mask, what=what, image_key=image_key, shapes_key=shapes_key)
    radius_px = np.full(spots.n_spots, spot_size / 2 / spots.mpp) if spot_size is not None else spots.radius_px
    return frame(spots, radius_px, padded_bounds(spots.centers, radius_px))


def padded_bounds(centers_px: np.ndarray, radius_px: np.ndarray) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` around circles, with a margin of one diameter of the largest."""
    c, pad = centers_px, 2 * float(radius_px.max())
    return (
        float((c[:, 0] - radius_px).min() - pad),
        float((c[:, 0] + radius_px).max() + pad),
        float((c[:, 1] - radius_px).min() - pad),
        float((c[:, 1] + radius_px).max() + pad),
    )


def frame(spots: Spots, radius_px: np.ndarray, bounds_px: tuple[float, float, float, float]) -> Canvas:
    """A canvas of ``spots`` showing ``bounds_px`` (level-0 pixels ``x0, x1, y0, y1``), everything in microns."""
    mpp = spots.mpp  # draw in microns (pixels times microns per pixel): spots and image share the frame
    background = _background(spots, bounds_px)
    if background is not None:
        background = (background[0], [e * mpp for e in background[1]])
    return Canvas(
        image_key=spots.image_key,
        rows=spots.table_rows,
        xy=spots.centers * mpp,
        radius=radius_px * mpp,
        background=background,
        limits=tuple(b * mpp for b in bounds_px),
    )


def _background(
    spots: Spots, bounds_px: tuple[float, float, float, float]
) -> tuple[np.ndarray, tuple[float, ...]] | None:
    """Read the image around ``bounds_px`` (level-0 pixels) at a low resolution.

    Returns ``(rgb, extent)`` with ``rgb`` ``(h, w, 3)`` uint8 and ``extent`` in level-0 pixels for ``imshow``.
    """
    x0, x1, y0, y1 = bounds_px
    level_idx = 0
    for i, s in enumerate(spots.level_scales):
        if max(x1 - x0, y1 - y0) / s >= _TARGET_PX:
            level_idx = i
    level, s = spots.levels[level_idx], spots.level_scales[level_idx]
    h, w = int(level.sizes["y"]), int(level.sizes["x"])
    lx0, lx1 = max(0, math.floor(x0 / s)), min(w, math.ceil(x1 / s))
    ly0, ly1 = max(0, math.floor(y0 / s)), min(h, math.ceil(y1 / s))
    if lx1 <= lx0 or ly1 <= ly0:
        return None
    step = max(1, max(lx1 - lx0, ly1 - ly0) // (2 * _TARGET_PX))
    block = np.asarray(level.data[:, ly0:ly1:step, lx0:lx1:step])
    if block.shape[0] >= 3:
        block = block[:3]
    else:
        block = np.repeat(block[:1], 3, axis=0)
    if block.dtype != np.uint8:
        block = block.astype(np.float64)
        hi = np.nanpercentile(block, 99.5) if block.size else 1.0
        block = np.clip(np.nan_to_num(block) / (hi or 1.0) * 255, 0, 255).astype(np.uint8)
    rgb = np.ascontiguousarray(block.transpose(1, 2, 0))
    hh, ww = rgb.shape[:2]
    extent = (lx0 * s, (lx0 + ww * step) * s, (ly0 + hh * step) * s, ly0 * s)  # left, right, bottom, top
    return rgb, extent


def robust_norm(*arrays: np.ndarray) -> Normalize:
    """One colour scale for all ``arrays``: their 1st to 99th percentile together."""
    both = np.concatenate([np.ravel(a)[np.isfinite(np.ravel(a))] for a in arrays])
    vmin, vmax = np.percentile(both, [1, 99]) if both.size else (0.0, 1.0)
    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return Normalize(vmin=float(vmin), vmax=float(vmax))
