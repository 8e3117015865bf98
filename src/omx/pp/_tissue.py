"""Tissue polygons from a low-resolution level of an H&E image, and regular grids of tiles over the tissue."""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key, base_entry, check_free_elements
from omx._settings import warn
from omx._utils import logger, resolve_key
from omx.pp._spots import (
    _coordinate_systems,
    _levels,
    geometries_in_pixels,
    image_levels,
    image_mpp,
    resolve_image,
    to_pixels,
)

#: The level read for tissue detection has at most this many pixels (4096 x 4096); coarser than
#: ``resolution_um`` when the image is larger, so memory stays bounded for any slide (about 25 bytes a pixel
#: read: ~0.15 GB for a 20 mm section at 8 um/px, ~0.4 GB at the cap).
_READ_MAX_PIXELS = 4096**2
#: Levels and averaging factors may be this much coarser than asked (pyramid factors are rarely exact).
_LEVEL_TOLERANCE = 1.02
#: A pixel whose channels are all at least this bright is glass, never tissue.
_WHITE = 235.0
#: A pixel whose brightest channel is darker than this is a pen mark, a slide edge or a scanner artefact.
_BLACK = 40.0
#: Least difference of the stain score (mean optical density + saturation) between the tissue and the glass
#: for the image to count as holding tissue; a blank or uniform image has almost none.
_MIN_CONTRAST = 0.1
#: Scale (um) over which the glass's own score may vary (illumination, tinted slides): its Gaussian sigma.
_GLASS_SIGMA_UM = 500.0
#: Tissue exceeds the local glass score by this many robust standard deviations of the glass ...
_GLASS_K = 5.0
#: ... and by at least this much.
_MIN_STEP = 0.05
#: Radius (pixels of the level read) of the closing that joins stained areas across small gaps.
_CLOSING_PX = 2
#: Hexagonal lattice: default centre-to-centre distance over spot diameter (Visium: 100 um / 55 um).
HEX_STRIDE_RATIO = 100.0 / 55.0
#: Largest lattice (tiles over the image, or over the bounding box of ``within``) that `tile_grid` builds.
MAX_TILES = 20_000_000
#: Tiles made at once (rows of the lattice are processed in blocks of about this many).
_BLOCK_TILES = 1_000_000


# ------------------------------------------------------------------------------------------------------- reading
def _read_low(levels, mpp: float, resolution_um: float) -> tuple[np.ndarray, float, float, float]:
    """Read one low-resolution view of an image's uint8 levels (`image_levels`) as float32 ``(3, y, x)`` RGB.

    The coarsest pyramid level at least as fine as the target resolution is read, averaged down in blocks of
    pixels (`dask.array.coarsen`, chunk by chunk) when it is still finer than the target: a single-scale image
    is never loaded whole. Returns ``(rgb, sx, sy, read_mpp)``: level-0 pixels per pixel read along x and y, and
    the microns per pixel read.
    """
    import dask.array as da

    level0 = levels[0]
    h0, w0 = int(level0.sizes["y"]), int(level0.sizes["x"])
    target = max(resolution_um, mpp * np.sqrt(h0 * w0 / _READ_MAX_PIXELS))
    best = 0
    for i, lv in enumerate(levels):
        if mpp * w0 / int(lv.sizes["x"]) <= target * _LEVEL_TOLERANCE:
            best = i
    level = levels[best]
    h, w = int(level.sizes["y"]), int(level.sizes["x"])
    level_mpp = mpp * w0 / w
    factor = max(1, min(h, w, int(target * _LEVEL_TOLERANCE / level_mpp)))
    data = da.asarray(level.data)[:3]
    if factor > 1:
        data = da.coarsen(np.mean, data.astype(np.float32), {1: factor, 2: factor}, trim_excess=True)
    rgb = np.array(data, dtype=np.float32)  # a copy: changed in place below, never the image's own memory
    sx, sy = factor * w0 / w, factor * h0 / h
    return rgb, sx, sy, level_mpp * factor


def _stain_score(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over R, G, B (``-log(I / 255)``) plus HSV saturation, per pixel.

    Dark stains (hematoxylin-rich, greyish) score by their optical density, pale ones (a faint eosin pink) by
    their saturation; glass has neither.
    """
    score = np.zeros(rgb.shape[1:], dtype=np.float32)
    for channel in rgb:  # one channel at a time: a few planes of memory, not a few copies of the image
        score -= np.log(np.maximum(channel, 1.0) / 255.0)
    score /= 3
    hi, lo = rgb.max(axis=0), rgb.min(axis=0)
    score += (hi - lo) / np.maximum(hi, 1.0)
    return score


def _first_split(values: np.ndarray, image_key: str) -> float:
    """A provisional threshold between glass and tissue (three-class Otsu, `skimage.filters.threshold_multiotsu`).

    The scores split into glass, paler and darker stain; the lower threshold is taken when the middle class is
    stained (its median differs from the lowest class by at least `_MIN_CONTRAST`), the upper one when the lower
    split only cut the glass in two.
    """
    from skimage.filters import threshold_multiotsu

    if values.size < 16 or np.ptp(values) < _MIN_CONTRAST:
        raise ValueError(_blank(image_key))
    t_low, t_high = threshold_multiotsu(values, classes=3)
    middle = values[(values > t_low) & (values <= t_high)]
    low = np.median(values[values <= t_low])
    return float(t_low if middle.size and np.median(middle) - low >= _MIN_CONTRAST else t_high)


def _blank(image_key: str) -> str:
    return (
        f"No tissue found in image {image_key!r}: the image looks blank or uniform (no region stands out from the "
        "glass by its stain). If it does hold tissue, pass `threshold=` (the stain score above which a pixel is "
        "tissue; clean glass scores about 0.05, tinted glass up to 0.4, stained tissue 0.3-1.5)."
    )


def _glass_level(score: np.ndarray, glass: np.ndarray, sigma_px: float) -> np.ndarray:
    """The glass's own score, smoothly varying over the slide: a Gaussian average of the glass pixels' scores.

    Computed on blocks of about ``sigma_px / 4`` pixels (normalised convolution: the average of the glass
    pixels only) and interpolated back; far from any glass it is the median glass score.
    """
    from scipy import ndimage

    f = max(1, int(sigma_px / 4))
    h, w = score.shape
    ph, pw = -h % f, -w % f
    weights = np.pad(glass.astype(np.float32), ((0, ph), (0, pw)))
    values = np.pad(np.where(glass, score, 0.0).astype(np.float32), ((0, ph), (0, pw)))
    shape = (weights.shape[0] // f, f, weights.shape[1] // f, f)
    num = ndimage.gaussian_filter(values.reshape(shape).sum(axis=(1, 3)), sigma_px / f, mode="nearest")
    den = ndimage.gaussian_filter(weights.reshape(shape).sum(axis=(1, 3)), sigma_px / f, mode="nearest")
    coarse = np.where(den > 1e-3 * f * f, num / np.maximum(den, 1e-12), np.median(score[glass])).astype(np.float32)
    return _upsample(coarse, h, w, f)


def _upsample(coarse: np.ndarray, h: int, w: int, f: int) -> np.ndarray:
    """Bilinear interpolation of blocks of ``f x f`` pixels back to ``(h, w)``, one axis at a time."""

    def weights(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n) + 0.5) / f - 0.5, 0, m - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, m - 1), (pos - lo).astype(np.float32)

    x0, x1, tx = weights(w, coarse.shape[1])
    rows = coarse[:, x0] * (1 - tx) + coarse[:, x1] * tx
    y0, y1, ty = weights(h, coarse.shape[0])
    return rows[y0] * (1 - ty)[:, None] + rows[y1] * ty[:, None]


def _auto_threshold(score: np.ndarray, valid: np.ndarray, read_mpp: float, image_key: str):
    """Tissue mask of the stain score, relative to the glass around it: ``(mask, threshold, contrast)``.

    A first split (`_first_split`) marks the glass; its score, averaged over `_GLASS_SIGMA_UM` (uneven
    illumination, a tinted slide), is subtracted from every pixel; a pixel is then tissue when it exceeds the
    glass by `_GLASS_K` robust standard deviations of the glass (and at least `_MIN_STEP`). Otsu's threshold
    alone sits deep inside a broad tissue distribution and loses pale tissue at the edges.
    """
    glass = (score <= _first_split(score[valid], image_key)) & valid
    if glass.sum() < 16:
        raise ValueError(_blank(image_key))
    relative = score - _glass_level(score, glass, _GLASS_SIGMA_UM / read_mpp)
    g = relative[glass]
    spread = 1.4826 * np.median(np.abs(g - np.median(g)))
    threshold = float(np.median(g) + max(_GLASS_K * spread, _MIN_STEP))
    mask = (relative > threshold) & valid
    if not mask.any() or mask.all():
        raise ValueError(_blank(image_key))
    contrast = float(np.median(relative[mask]) - np.median(relative[valid & ~mask]))
    if contrast < _MIN_CONTRAST:
        raise ValueError(_blank(image_key))
    return mask, threshold, contrast


def _mask_to_polygons(mask: np.ndarray, sx: float, sy: float, tolerance: float):
    """One shapely polygon (with its holes) per 4-connected piece of ``mask``, in level-0 pixels.

    Pixel ``(i, j)`` of the mask covers level-0 pixels ``[j sx, (j + 1) sx) x [i sy, (i + 1) sy)``. Contours are
    traced at half height (`skimage.measure.find_contours`, whose foreground is 4-connected as the pieces are),
    so each piece has one outer ring and one ring per hole; polygons are simplified by ``tolerance`` pixels.
    """
    import shapely
    from scipy import ndimage
    from skimage.measure import find_contours

    labels, _ = ndimage.label(mask)  # 4-connectivity
    polygons = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        piece = np.pad(labels[box] == i, 1).astype(np.float32)
        rings = []
        for ring in find_contours(piece, 0.5):
            if len(ring) < 4:
                continue
            x = (ring[:, 1] - 1 + box[1].start + 0.5) * sx
            y = (ring[:, 0] - 1 + box[0].start + 0.5) * sy
            rings.append(np.c_[x, y])
        if not rings:
            continue
        areas = [abs(shapely.area(shapely.Polygon(r))) for r in rings]
        outer = int(np.argmax(areas))
        poly = shapely.Polygon(rings[outer], [r for k, r in enumerate(rings) if k != outer])
        poly = shapely.simplify(shapely.make_valid(poly), tolerance, preserve_topology=True)
        parts = [g for g in shapely.get_parts(poly) if g.geom_type in ("Polygon", "MultiPolygon") and g.area > 0]
        if parts:
            polygons.append(shapely.union_all(parts))
    return polygons


@doc_params()
def detect_tissue(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    mpp: float | None = None,
    resolution_um: float = 8.0,
    min_area_um2: float = 10_000.0,
    hole_area_um2: float = 50_000.0,
    threshold: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> None:
    """Find the tissue of an H&E image and add it as polygons, one per piece of tissue.

    One low-resolution view of the image is read: the coarsest pyramid level at least as fine as
    ``resolution_um``, averaged down to about that resolution chunk by chunk (a single-scale image is never
    loaded whole; at most 4,096 x 4,096 pixels are read, coarser than ``resolution_um`` for larger images).
    Each pixel gets a stain score, its mean optical density over R, G and B (``-log(I / 255)``) plus its
    saturation, so dark (hematoxylin-rich) and pale (faint eosin) tissue both stand out from glass; the score is
    smoothed (Gaussian, one pixel). Three-class Otsu (`skimage.filters.threshold_multiotsu`) marks the glass
    first (the split between glass and the paler stain, so pale tissue does not count as glass when dark tissue
    abounds); the glass's own score, averaged over 500 um, is then taken off every pixel (uneven illumination,
    tinted slides), and a pixel is tissue when it exceeds the glass by 5 robust standard deviations of the glass
    (at least 0.05). Otsu's threshold alone lies deep inside the broad tissue distribution and loses pale tissue
    at the edges. Near-white pixels (every channel at least 235) are glass and near-black ones (every channel
    below 40: pen marks, slide edges) are never tissue. The mask is closed (2 pixels), pieces smaller than
    ``min_area_um2`` are dropped and holes smaller than ``hole_area_um2`` are filled (background that reaches
    the image's border is not a hole).

    Parameters
    ----------
    {sdata}
    image_key
        The H&E image; may be omitted when the object holds one image.
    {mpp}
    resolution_um
        Microns per pixel at which the tissue is found; outlines are accurate to about this much.
    min_area_um2
        Pieces of tissue smaller than this are dropped (default 0.01 mm^2, about one ST spot of 100 um, seven
        Visium spots: dust, debris and stray specks are smaller; real fragments worth a spot are not).
    hole_area_um2
        Holes in the tissue smaller than this are filled (default 0.05 mm^2, a gap about 250 um across): vessel
        lumens, fat cells and small tears count as tissue, larger holes stay holes.
    threshold
        Stain score above which a pixel is tissue, with no correction for the glass (clean glass scores about
        0.05, tinted glass up to 0.4, stained tissue 0.3-1.5); omitted, the glass-relative threshold described
        above. Pass it for an image with no glass in view, whose paler half would otherwise count as glass.
    key_added
        Name of the shapes element; ``"{image_key}_tissue"`` when omitted.
    {overwrite}

    Returns
    -------
    None. Adds ``sdata.shapes[key_added]``: one polygon (with its holes) per piece of tissue, largest first, index
    ``0 ... n - 1``, column ``area_um2``; coordinates are level-0 pixels of the image and the element has the same
    transformations as the image's finest level, so it lines up with the image in every coordinate system.
    ``attrs["omx"]`` records the call (function, version, parameters; ``"threshold"``, the threshold used, is
    relative to the glass when ``"glass_relative"`` is true; ``"contrast"``, the median score of tissue over glass).
    """
    import geopandas as gpd
    import pandas as pd
    from scipy import ndimage
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    image_key = resolve_image(sdata, image_key)
    image = sdata.images[image_key]
    levels = image_levels(image, image_key)
    level0 = levels[0]
    mpp = image_mpp(sdata, image, mpp)
    for name, value in (("resolution_um", resolution_um), ("min_area_um2", min_area_um2)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be positive, got {value}.")
    if not np.isfinite(hole_area_um2) or hole_area_um2 < 0:
        raise ValueError(f"hole_area_um2 must be 0 or more, got {hole_area_um2}.")
    key_added = key_added or Key.tissue(image_key)
    check_free_elements(sdata, overwrite=overwrite, shapes=[key_added])

    rgb, sx, sy, read_mpp = _read_low(levels, mpp, resolution_um)
    score = ndimage.gaussian_filter(_stain_score(rgb), sigma=1.0)
    black = rgb.max(axis=0) < _BLACK
    white = rgb.min(axis=0) >= _WHITE
    del rgb
    contrast = None
    glass_relative = threshold is None
    if glass_relative:
        mask, threshold, contrast = _auto_threshold(score, ~black, read_mpp, image_key)
    else:
        mask = score > threshold
    mask = closing(mask & ~black & ~white, disk(_CLOSING_PX))
    px_area = sx * sy * mpp**2  # um^2 per pixel read
    biggest = np.bincount(ndimage.label(mask)[0].ravel())[1:].max(initial=0) * px_area
    mask = remove_small_objects(mask, max_size=int(min_area_um2 / px_area), connectivity=1)
    if hole_area_um2 > 0:  # a frame of glass around the mask: background at the image's border is no hole
        framed = remove_small_holes(np.pad(mask, 1), max_size=int(hole_area_um2 / px_area), connectivity=2)
        mask = framed[1:-1, 1:-1]
    if not mask.any():
        raise ValueError(
            f"No tissue found in image {image_key!r}: every stained region is smaller than min_area_um2="
            f"{min_area_um2:g} um^2 (largest {biggest:.0f} um^2). Lower `min_area_um2` if these are tissue."
        )
    polygons = _mask_to_polygons(mask, sx, sy, tolerance=0.5 * min(sx, sy))
    areas = np.array([p.area for p in polygons]) * mpp**2
    order = np.argsort(-areas, kind="stable")
    gdf = gpd.GeoDataFrame(
        {"area_um2": areas[order]}, geometry=[polygons[i] for i in order], index=pd.RangeIndex(len(order))
    )
    shapes = ShapesModel.parse(gdf, transformations=copy.deepcopy(get_transformation(level0, get_all=True)))
    params = {
        "image_key": image_key, "mpp": mpp, "resolution_um": resolution_um, "read_mpp": read_mpp,
        "min_area_um2": min_area_um2, "hole_area_um2": hole_area_um2, "threshold": threshold,
        "glass_relative": glass_relative, "contrast": contrast,
    }  # fmt: skip
    shapes.attrs[Key.SHAPES_ATTRS] = base_entry("detect_tissue", params)
    sdata.shapes[key_added] = shapes
    logger.info(
        "Added %d piece(s) of tissue of image %r (%.3g mm^2 in all; stain score threshold %.3g%s at %.3g um/px) to "
        "sdata.shapes[%r]", len(gdf), image_key, areas.sum() / 1e6, threshold, " over the glass" * glass_relative,
        read_mpp, key_added,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- grids
def _within_geometry(sdata: SpatialData, key: str, level0, image_key: str):
    """Union of the shapes ``key`` (polygons, or circles buffered by their radius) in level-0 pixels, prepared."""
    import shapely

    shapes = sdata.shapes[key]
    common = [c for c in _coordinate_systems(level0) if c in _coordinate_systems(shapes)]
    if not common:
        raise ValueError(
            f"Shapes {key!r} share no coordinate system with image {image_key!r} (shapes: "
            f"{_coordinate_systems(shapes)}, image: {_coordinate_systems(level0)}); add a transformation."
        )
    affine = to_pixels(shapes, level0, common[0])
    geoms = shapes.geometry.to_numpy()
    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds <= {0, 4}:  # (multi)points: circles
        if "radius" not in shapes.columns:
            raise ValueError(f"Shapes {key!r} are points without a `radius` column; `within` needs areas.")
        geoms = shapely.buffer(geoms, shapes["radius"].to_numpy(dtype=float))
    elif not kinds <= {3, 6}:  # (multi)polygons
        raise ValueError(f"Shapes {key!r} are not polygons or circles; `within` needs areas.")
    geoms = geometries_in_pixels(shapely.make_valid(geoms), affine)
    union = shapely.union_all(geoms)
    shapely.prepare(union)
    return union


def _index_range(lo: float, hi: float, start: float, step: float) -> tuple[int, int]:
    """First and last ``k`` with ``lo <= start + k step <= hi`` (with a millionth of a step of slack)."""
    eps = 1e-6
    return int(np.ceil((lo - start) / step - eps)), int(np.floor((hi - start) / step + eps))


def _lattice_rows(kind: str, size_px: float, stride_px: float, bounds: tuple[float, float, float, float]):
    """Per lattice row: ``(row index, y, first col, last col, x offset)`` of the tiles whose centres lie in bounds.

    Tile ``(i, j)`` of the square lattice has its centre at ``(r + j stride, r + i stride)`` (``r`` half the size),
    so the first tile's corner is the image's origin; the hexagonal lattice has rows ``stride sqrt(3) / 2`` apart,
    odd rows shifted by half a stride.
    """
    x_lo, y_lo, x_hi, y_hi = bounds
    r = size_px / 2
    dy = stride_px * np.sqrt(3) / 2 if kind == "hex" else stride_px
    i0, i1 = _index_range(y_lo, y_hi, r, dy)
    rows = []
    for i in range(max(i0, 0), i1 + 1):
        offset = r + (0.5 * stride_px if kind == "hex" and i % 2 else 0.0)
        j0, j1 = _index_range(x_lo, x_hi, offset, stride_px)
        if j1 >= max(j0, 0):
            rows.append((i, r + i * dy, max(j0, 0), j1, offset))
    return rows


def lattice(kind: str, size_px: float, stride_px: float, bounds, region=None, *, over: str = "the image"):
    """``(array_row, array_col, x, y)`` of the tiles of a lattice whose centres lie in ``bounds`` (and ``region``).

    See `tile_grid` for the lattice; ``bounds`` is ``(x0, y0, x1, y1)`` in level-0 pixels, ``region`` a prepared
    shapely geometry in the same pixels. Built a block of rows at a time, so that a million tiles stay cheap.
    """
    import shapely

    rows = _lattice_rows(kind, size_px, stride_px, bounds)
    n_cols = np.array([j1 - j0 + 1 for _, _, j0, j1, _ in rows], dtype=np.int64)
    n_lattice = int(n_cols.sum())
    if n_lattice > MAX_TILES:
        raise ValueError(
            f"The grid would hold {n_lattice:,} tiles over {over} (more than {MAX_TILES:,}). Raise `size_um` "
            "(or `stride_um`), or restrict it with `within=` (e.g. the tissue of `omx.pp.detect_tissue`)."
        )
    parts = []
    start = 0
    while start < len(rows):  # blocks of rows of about _BLOCK_TILES tiles
        stop = start + 1 + int(np.searchsorted(np.cumsum(n_cols[start:]), _BLOCK_TILES))
        block = rows[start:stop]
        start = stop
        counts = np.array([j1 - j0 + 1 for _, _, j0, j1, _ in block])
        row_i = np.repeat([b[0] for b in block], counts)
        first = np.repeat([b[2] for b in block], counts)
        j = first + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        cx = np.repeat([b[4] for b in block], counts) + j * stride_px
        cy = np.repeat([b[1] for b in block], counts)
        if region is not None:
            keep = shapely.contains_xy(region, cx, cy)
            row_i, j, cx, cy = row_i[keep], j[keep], cx[keep], cy[keep]
        parts.append((row_i, j, cx, cy))
    row_i, j, cx, cy = (np.concatenate([p[k] for p in parts]) if parts else np.empty(0) for k in range(4))
    row_i, j = row_i.astype(np.int64), j.astype(np.int64)
    return row_i, (2 * j + row_i % 2 if kind == "hex" else j), cx.astype(float), cy.astype(float)


def grid_shapes(kind: str, array_row, array_col, cx, cy, size_px: float, level0):
    """The shapes element of a lattice's tiles: circles (hex) or squares, in level-0 pixels of ``level0``."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    n, r = len(cx), size_px / 2
    columns = {"array_row": array_row, "array_col": array_col}
    if kind == "hex":
        geometry = shapely.points(cx, cy)
        columns["radius"] = np.full(n, r)
    else:
        geometry = shapely.box(cx - r, cy - r, cx + r, cy + r)
    gdf = gpd.GeoDataFrame(columns, geometry=geometry, index=pd.RangeIndex(n))
    return ShapesModel.parse(gdf, transformations=copy.deepcopy(get_transformation(level0, get_all=True)))


@doc_params()
def tile_grid(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    size_um: float = 55.0,
    stride_um: float | None = None,
    kind: Literal["hex", "square"] = "hex",
    within: str | None = None,
    mpp: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> None:
    """Add a regular grid of tiles over an image, or over its tissue, as spots for the rest of omx.

    ``kind="hex"`` gives circles of diameter ``size_um`` on a hexagonal lattice (Visium: 55 um spots 100 um
    apart), ``kind="square"`` square bins of side ``size_um`` (Visium HD: contiguous 8 or 16 um bins). The
    lattice is anchored at the image's origin: the square tile ``(i, j)`` covers level-0 pixels
    ``[j s, j s + size) x [i s, i s + size)`` (``s`` the stride, all in pixels), and the hexagonal one has its
    centre at ``(size / 2 + (j + (i mod 2) / 2) s, size / 2 + i s sqrt(3) / 2)``; tiles that do not fit whole
    inside the image are left out, so a square grid over a ``W x H`` um image has
    ``(floor((W - size) / s) + 1) (floor((H - size) / s) + 1)`` tiles. With ``within``, only the tiles whose
    centre lies inside those shapes are kept. The grid is then ready for `omx.pp.resolve_spots` and
    `omx.tl.predict_expression` (``shapes_key=key_added``).

    The lattice is built with numpy, a block of rows at a time, and its geometries with shapely's vectorised
    constructors; a million tiles take a few seconds.

    Parameters
    ----------
    {sdata}
    image_key
        The H&E image; may be omitted when the object holds one image.
    size_um
        Diameter of the circles (``"hex"``) or side of the squares (``"square"``), in microns.
    stride_um
        Centre-to-centre distance of neighbouring tiles, in microns. Omitted: ``size_um * 100 / 55`` for
        ``"hex"`` (Visium's spacing, 100 um for 55 um spots) and ``size_um`` for ``"square"`` (contiguous bins).
        Squares closer than their size overlap (allowed, with a warning: sliding windows).
    kind
        ``"hex"`` (circles on a hexagonal lattice) or ``"square"`` (square bins on a square lattice).
    within
        A shapes element (polygons, or circles) to restrict the grid to, e.g. the output of
        `omx.pp.detect_tissue`; ``"tissue"`` names that output, ``"{image_key}_tissue"``. Omitted: the image's
        tissue when `omx.pp.detect_tissue` has run, else the whole image (the log says which).
    {mpp}
    key_added
        Name of the shapes element; ``"{image_key}_{kind}_{size_um}um"`` when omitted (e.g.
        ``"C4_he_square_16um"``).
    {overwrite}

    Returns
    -------
    None. Adds ``sdata.shapes[key_added]``: one tile per row, index ``0 ... n - 1`` in lattice order (row by row),
    in level-0 pixels of the image with the transformations of its finest level; circles (points with a
    ``radius`` column) or square polygons, and integer columns ``array_row`` and ``array_col`` (the lattice
    indices; on the hexagonal lattice ``array_col = 2 j + (i mod 2)``, Visium's convention, so
    ``array_row + array_col`` is even). ``attrs["omx"]`` records the call (function, version, parameters).
    """
    import shapely

    if kind not in ("hex", "square"):
        raise ValueError(f"kind must be 'hex' or 'square', got {kind!r}.")
    if stride_um is None:
        stride_um = size_um * HEX_STRIDE_RATIO if kind == "hex" else size_um
    for name, value in (("size_um", size_um), ("stride_um", stride_um)):
        if not isinstance(value, int | float | np.number) or not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number of microns, got {value!r}.")
    if kind == "square" and stride_um < size_um:
        warn(
            f"stride_um={stride_um:g} is smaller than size_um={size_um:g}: the square bins overlap (sliding "
            "windows), so a pixel belongs to several bins. Pass stride_um >= size_um for contiguous bins."
        )
    image_key = resolve_image(sdata, image_key)
    image = sdata.images[image_key]
    level0 = _levels(image)[0]
    mpp = image_mpp(sdata, image, mpp)
    key_added = key_added or Key.grid(image_key, kind, size_um)
    check_free_elements(sdata, overwrite=overwrite, shapes=[key_added])

    h, w = int(level0.sizes["y"]), int(level0.sizes["x"])
    size_px, stride_px = size_um / mpp, stride_um / mpp
    r = size_px / 2
    bounds = (r, r, w - r, h - r)  # tile centres whose tile fits in the image
    tissue_key = Key.tissue(image_key)
    if within == "tissue":
        if tissue_key not in sdata.shapes:
            raise KeyError(
                f"within='tissue' names sdata.shapes[{tissue_key!r}], which does not exist; run "
                f"`omx.pp.detect_tissue(sdata, image_key={image_key!r})` first."
            )
        within = tissue_key
    elif within is None and tissue_key in sdata.shapes:
        within = tissue_key
    region = None
    if within is not None:
        within = resolve_key(within, sdata.shapes.keys(), kind="shapes element", argument="within")
        region = _within_geometry(sdata, within, level0, image_key)
        if region.is_empty:
            raise ValueError(f"Shapes {within!r} are empty; no tile can lie inside them.")
        bx0, by0, bx1, by1 = shapely.bounds(region)
        bounds = (max(bounds[0], bx0), max(bounds[1], by0), min(bounds[2], bx1), min(bounds[3], by1))

    over = "the image" if within is None else f"the bounding box of {within!r}"
    row_i, col_i, cx, cy = lattice(kind, size_px, stride_px, bounds, region, over=over)
    n = len(cx)
    if n == 0:
        where = f"inside {within!r}" if within is not None else "inside the image"
        raise ValueError(
            f"No tile of {size_um:g} um fits {where} (image {w} x {h} px at {mpp:.3g} um/px). Lower `size_um`, "
            "or check `within`."
        )
    shapes = grid_shapes(kind, row_i, col_i, cx, cy, size_px, level0)
    params = {
        "image_key": image_key, "kind": kind, "size_um": float(size_um), "stride_um": float(stride_um),
        "within": within, "mpp": mpp,
    }  # fmt: skip
    shapes.attrs[Key.SHAPES_ATTRS] = base_entry("tile_grid", params)
    sdata.shapes[key_added] = shapes
    logger.info(
        "Added %d %s of %g um (stride %g um) over %s of image %r to sdata.shapes[%r]",
        n, "circles" if kind == "hex" else "square bins", size_um, stride_um,
        f"shapes {within!r}" if within is not None else
        f"the whole image (no sdata.shapes[{tissue_key!r}]; `omx.pp.detect_tissue` makes one)", image_key, key_added,
    )  # fmt: skip
