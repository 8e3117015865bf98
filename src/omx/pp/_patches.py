"""Cut patches of a fixed physical size around spots, tile by tile from the (dask) image."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._utils import progress
from omx.pp._spots import Spots, resolve_spots

_N_THREADS = max(1, min(8, os.cpu_count() or 1))
#: Value used to pad patches that reach past the image edge (white, like glass).
PAD_VALUE = 255
#: Side in output pixels of the tiles that patches are cut from (see `iter_patches`).
TILE_PX = 2048


def _as_spots(data: SpatialData | Spots, resolve_kwargs: dict) -> Spots:
    if isinstance(data, Spots):
        if resolve_kwargs:
            raise TypeError(f"{sorted(resolve_kwargs)} only apply to a SpatialData; the spots are already resolved.")
        return data
    return resolve_spots(data, **resolve_kwargs)


def _to_uint8(block: np.ndarray) -> np.ndarray:
    """``(c, y, x)`` block -> ``(y, x, 3)`` uint8.

    Levels come from `~omx.pp._spots.image_levels`, which decides each image's value scale once and hands back
    uint8; a block of another dtype (levels put together by hand) is only rounded and clipped to 0-255, never
    rescaled block by block.
    """
    block = block[:3]
    if block.dtype != np.uint8:
        block = np.clip(np.rint(np.nan_to_num(block.astype(np.float32), nan=255.0)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(block.transpose(1, 2, 0))


def _read_region(level, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Read rows [y0, y1) and columns [x0, x1) of a level as ``(y, x, 3)`` uint8, padding outside with white."""
    h, w = int(level.sizes["y"]), int(level.sizes["x"])
    out = np.full((y1 - y0, x1 - x0, 3), PAD_VALUE, dtype=np.uint8)
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if cy1 > cy0 and cx1 > cx0:
        block = np.asarray(level.data[:, cy0:cy1, cx0:cx1])  # one read per tile: chunk-sized tasks, no per-patch graph
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = _to_uint8(block)
    return out


def patch_geometry(spots: Spots, size_um: float | None, size_px: int) -> tuple[float, int, float]:
    """Return ``(size_um, level, factor)``: the physical size, the pyramid level to read and its resampling factor.

    The level is the coarsest one that is still at least as fine as the output resolution, so patches are
    only ever downsampled from it (or upsampled from level 0 when the output is finer than the scan).
    """
    if size_um is None:
        size_um = spots.diameter_um
    if size_um <= 0 or size_px <= 0:
        raise ValueError(f"Patch size must be positive, got size_um={size_um}, size_px={size_px}.")
    level0 = spots.levels[0]
    if level0 is not None:
        h, w = int(level0.sizes["y"]), int(level0.sizes["x"])
        side = size_um / spots.mpp  # the patch's side in level-0 pixels
        if h < side and w < side:
            raise ValueError(
                f"Image {spots.image_key!r} is {w} x {h} px ({w * spots.mpp:.3g} x {h * spots.mpp:.3g} um at "
                f"{spots.mpp:.3g} um/px), smaller in both dimensions than one patch ({size_um:.3g} um, {side:.0f} px "
                f"of this image, resampled to {size_px} px): every patch would be mostly white padding. Check that "
                "the image is the full-resolution scan (not a thumbnail) and its microns per pixel, or pass a "
                "smaller `size_um`."
            )
    mpp_out = size_um / size_px
    level = 0
    for i, s in enumerate(spots.level_scales):
        if spots.mpp * s <= mpp_out * 1.001:
            level = i
    factor = spots.mpp * spots.level_scales[level] / mpp_out  # output pixels per level pixel
    return float(size_um), level, float(factor)


def patch_corners(spots: Spots, level: int, factor: float, size_px: int) -> np.ndarray:
    """Top-left corners ``(n, 2)`` as ``(x, y)`` of the spots' patches, in pixels of ``level`` scaled by ``factor``."""
    centers_out = spots.centers / spots.level_scales[level] * factor
    return np.floor(centers_out - size_px / 2 + 0.5).astype(np.int64)


def patch_tiles(corners: np.ndarray, size_px: int, tile_px: int) -> tuple[np.ndarray, int]:
    """The tile ``(tx, ty)`` of each patch corner, and the tiles' step in output pixels.

    Tiles lie on one grid anchored at the image origin; tile ``(tx, ty)`` holds the patches whose top-left corner
    falls in its ``step x step`` square and spans output pixels ``[t * step, t * step + step + size_px)``.
    """
    step = max(tile_px, size_px)
    return np.floor_divide(corners, step), step


@doc_params()
def iter_patches(
    data: SpatialData | Spots,
    *,
    size_um: float | None = None,
    size_px: int = 224,
    batch_size: int = 256,
    tile_px: int = TILE_PX,
    show_progress_bar: bool = False,
    **resolve_kwargs,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield patches around spots in batches, reading and resampling the image one tile at a time.

    Parameters
    ----------
    {data_spots}
    {size_um}
    size_px
        Side of the patch in pixels: patches are resampled to ``size_um / size_px`` microns per pixel.
    batch_size
        Patches per yielded batch.
    tile_px
        Side in output pixels of the image tiles read and resampled at once (plus one patch of overlap);
        bounds memory.
    {show_progress_bar}
    {resolve_kwargs}

    Yields
    ------
    ``(positions, patches)``: positions of the spots in ``spots`` order, and uint8 patches
    ``(len(positions), size_px, size_px, 3)``. Spots near the edge are padded with white.

    Notes
    -----
    Tiles lie on a fixed grid of the image, so a spot's patch does not depend on which other spots are cut with
    it: a subset of spots, or chunks of them, give the same patches as the whole section.
    """
    spots = _as_spots(data, resolve_kwargs)
    size_um, level_i, factor = patch_geometry(spots, size_um, size_px)
    level = spots.levels[level_i]
    corners = patch_corners(spots, level_i, factor, size_px)
    tiles, step = patch_tiles(corners, size_px, tile_px)
    order = np.lexsort((tiles[:, 0], tiles[:, 1]))  # tile rows, then tiles along each row
    bounds = np.flatnonzero(np.any(np.diff(tiles[order], axis=0) != 0, axis=1)) + 1
    bar = progress(range(spots.n_spots), show=show_progress_bar, desc="patches", unit="spot")
    bar_update = getattr(bar, "update", None)

    buf_idx: list[np.ndarray] = []
    buf: list[np.ndarray] = []
    n_buf = 0
    for members in np.split(order, bounds):
        if not len(members):
            continue
        ox0, oy0 = tiles[members[0]] * step
        tile = _resampled(level, factor, oy0, oy0 + step + size_px, ox0, ox0 + step + size_px)
        rel = corners[members] - (ox0, oy0)
        for s in range(0, len(members), batch_size):
            part = members[s : s + batch_size]
            r = rel[s : s + batch_size]
            patches = np.empty((len(part), size_px, size_px, 3), dtype=np.uint8)
            for k, (x, y) in enumerate(r):
                patches[k] = tile[y : y + size_px, x : x + size_px]
            buf_idx.append(part)
            buf.append(patches)
            n_buf += len(part)
            while n_buf >= batch_size:
                idx, pat = np.concatenate(buf_idx), np.concatenate(buf)
                yield idx[:batch_size], pat[:batch_size]
                buf_idx, buf, n_buf = [idx[batch_size:]], [pat[batch_size:]], len(idx) - batch_size
            if bar_update is not None:
                bar_update(len(part))
    if n_buf:
        yield np.concatenate(buf_idx), np.concatenate(buf)
    if hasattr(bar, "close"):
        bar.close()


#: Rows of output pixels resampled by one thread; fixed, so results do not depend on the number of threads.
_STRIP_PX = 256


def _resampled(level, factor: float, oy0: int, oy1: int, ox0: int, ox1: int) -> np.ndarray:
    """The output-resolution region [oy0, oy1) x [ox0, ox1), resampled from ``level`` by ``factor``."""
    if abs(factor - 1.0) < 1e-6:
        return _read_region(level, oy0, oy1, ox0, ox1)
    # Output pixel u covers level coordinates [u / factor, (u + 1) / factor).
    sy0, sy1 = int(np.floor(oy0 / factor)) - 1, int(np.ceil(oy1 / factor)) + 1
    sx0, sx1 = int(np.floor(ox0 / factor)) - 1, int(np.ceil(ox1 / factor)) + 1
    src = Image.fromarray(_read_region(level, sy0, sy1, sx0, sx1))
    resample = Image.Resampling.BILINEAR if factor > 1 else Image.Resampling.BOX
    out = np.empty((oy1 - oy0, ox1 - ox0, 3), dtype=np.uint8)

    def resize_rows(r0: int) -> None:
        r1 = min(r0 + _STRIP_PX, oy1 - oy0)  # output rows, relative to oy0
        box = (ox0 / factor - sx0, (oy0 + r0) / factor - sy0, ox1 / factor - sx0, (oy0 + r1) / factor - sy0)
        out[r0:r1] = np.asarray(src.resize((ox1 - ox0, r1 - r0), resample=resample, box=box))

    # PIL releases the GIL while resampling: strips of rows resize in parallel threads.
    strips = range(0, oy1 - oy0, _STRIP_PX)
    if len(strips) == 1 or _N_THREADS == 1:
        for r0 in strips:
            resize_rows(r0)
    else:
        with ThreadPoolExecutor(min(_N_THREADS, len(strips))) as pool:
            list(pool.map(resize_rows, strips))
    return out


def extract_patches(
    data: SpatialData | Spots,
    *,
    size_um: float | None = None,
    size_px: int = 224,
    batch_size: int = 256,
    show_progress_bar: bool = False,
    **resolve_kwargs,
) -> np.ndarray:
    """Return the patches around all spots as one uint8 array ``(n_spots, size_px, size_px, 3)``.

    Same parameters as :func:`omx.pp.iter_patches`; use that one when the patches do not fit in memory.
    """
    spots = _as_spots(data, resolve_kwargs)
    out = np.empty((spots.n_spots, size_px, size_px, 3), dtype=np.uint8)
    for idx, patches in iter_patches(
        spots, size_um=size_um, size_px=size_px, batch_size=batch_size, show_progress_bar=show_progress_bar
    ):
        out[idx] = patches
    return out
