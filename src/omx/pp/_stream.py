"""Patches and features of many spots, chunk by chunk: locally, or as tasks on a dask.distributed cluster.

A section is cut into chunks of spots sorted by row. Each chunk reads one window of the image per pyramid
level it needs (the pixels all its patches touch, no more), cuts its patches with `iter_patches` and, when
encoding, turns them into features. The same chunk function runs in this process or on a dask.distributed
worker, so the results do not depend on where they were computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._utils import logger, progress
from omx.pp._patches import TILE_PX, _as_spots, iter_patches, patch_corners, patch_geometry, patch_tiles
from omx.pp._spots import Spots

#: Image bytes of the patches one chunk may hold at once; sets the default number of spots per chunk.
CHUNK_BYTES = 256 * 2**20
#: Bounds on the number of spots per chunk.
MIN_CHUNK_SPOTS, MAX_CHUNK_SPOTS = 256, 16384


def chunk_spots_for(size_px: int) -> int:
    """Spots per chunk such that one chunk's patches of ``size_px`` pixels take at most `CHUNK_BYTES`."""
    return int(np.clip(CHUNK_BYTES // (3 * size_px * size_px), MIN_CHUNK_SPOTS, MAX_CHUNK_SPOTS))


class _Window:
    """The pixels of one pyramid level that a chunk reads, indexed in the level's own coordinates.

    It stands in for the level (`sizes` and ``data[c, y, x]`` slicing) so that `iter_patches` cuts the same
    patches from it as from the whole image.
    """

    def __init__(self, block: np.ndarray, y0: int, x0: int, height: int, width: int):
        self.block, self.y0, self.x0 = block, y0, x0
        self.sizes = {"c": block.shape[0], "y": height, "x": width}

    @property
    def data(self) -> _Window:
        return self

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        c, ys, xs = key
        y0, y1, x0, x1 = ys.start - self.y0, ys.stop - self.y0, xs.start - self.x0, xs.stop - self.x0
        if y0 < 0 or x0 < 0 or y1 > self.block.shape[1] or x1 > self.block.shape[2]:
            raise IndexError(f"Rows {ys} and columns {xs} reach outside the chunk's window; this is a bug in omx.")
        return self.block[c, y0:y1, x0:x1]


@dataclass
class Chunk:
    """Spots of one chunk (positions in the section) and the window ``(y0, y1, x0, x1)`` of each level it reads."""

    positions: np.ndarray
    windows: dict[int, tuple[int, int, int, int]]


def plan_chunks(spots: Spots, sizes_um: Sequence[float], size_px: int, chunk_spots: int) -> list[Chunk]:
    """Cut the spots into chunks of about ``chunk_spots`` spots, with the windows their patches need.

    Chunks are runs of whole tiles (see `iter_patches`) of the smallest patches along one row of tiles, so each
    such tile is read and resampled once and a chunk's window is one strip of tiles; a tile with more than
    ``chunk_spots`` spots is split.
    """
    if chunk_spots < 1:
        raise ValueError(f"chunk_spots must be at least 1, got {chunk_spots}.")
    geometry = [patch_geometry(spots, s, size_px) for s in sizes_um]
    _, level, factor = min(geometry)
    tiles, _ = patch_tiles(patch_corners(spots, level, factor, size_px), size_px, TILE_PX)
    order = np.lexsort((spots.centers[:, 1], tiles[:, 0], tiles[:, 1]))
    starts = np.r_[0, np.flatnonzero(np.any(np.diff(tiles[order], axis=0) != 0, axis=1)) + 1]
    groups, current, n_current, row = [], [], 0, None
    for part in np.split(order, starts[1:]):
        for k in range(0, len(part), chunk_spots):
            piece = part[k : k + chunk_spots]
            new_row = tiles[piece[0], 1]
            if current and (n_current + len(piece) > chunk_spots or new_row != row):
                groups.append(np.concatenate(current))
                current, n_current = [], 0
            current.append(piece)
            n_current += len(piece)
            row = new_row
    if current:
        groups.append(np.concatenate(current))
    chunks = []
    for positions in groups:
        sub = spots.subset(positions)
        windows: dict[int, tuple[int, int, int, int]] = {}
        for _, level, factor in geometry:
            tiles, step = patch_tiles(patch_corners(sub, level, factor, size_px), size_px, TILE_PX)
            lo, hi = tiles.min(axis=0) * step, (tiles.max(axis=0) + 1) * step + size_px  # output pixels, (x, y)
            h, w = (int(spots.levels[level].sizes[d]) for d in ("y", "x"))
            # the level pixels `iter_patches` reads for these tiles, with the margin of its resampling
            x0, y0 = (min(n, max(0, int(np.floor(v / factor)) - 1)) for v, n in zip(lo, (w, h), strict=True))
            x1, y1 = (min(n, max(0, int(np.ceil(v / factor)) + 1)) for v, n in zip(hi, (w, h), strict=True))
            if level in windows:
                a = windows[level]
                y0, y1, x0, x1 = min(a[0], y0), max(a[1], y1), min(a[2], x0), max(a[3], x1)
            windows[level] = (y0, max(y0, y1), x0, max(x0, x1))
        chunks.append(Chunk(positions=positions, windows=windows))
    return chunks


def chunk_task(
    spots: Spots,
    blocks: dict[int, np.ndarray],
    windows: dict[int, tuple[int, int, int, int]],
    shapes: dict[int, tuple[int, int]],
    sizes_um: Sequence[float],
    size_px: int,
    encoder=None,
) -> np.ndarray:
    """Patches (``encoder=None``, one size) or concatenated features (one block per size) of one chunk.

    ``blocks`` hold the pixels of each level's window, so this runs wherever the blocks are, in this process
    or on a dask worker.
    """
    levels = [None] * len(spots.level_scales)
    for level, block in blocks.items():
        y0, _, x0, _ = windows[level]
        levels[level] = _Window(np.asarray(block), y0, x0, *shapes[level])
    spots = replace(spots, levels=levels)
    out = []
    for size_um in sizes_um:
        values = None
        for idx, patches in iter_patches(spots, size_um=size_um, size_px=size_px):
            x = patches if encoder is None else encoder.transform(patches)
            if values is None:
                values = np.empty((spots.n_spots, *x.shape[1:]), dtype=x.dtype)
            values[idx] = x
        out.append(values)
    return out[0] if encoder is None else np.concatenate(out, axis=1)


def active_client():
    """The dask.distributed client that is active (``with Client(...)`` or the default one), else None."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def iter_chunks(
    spots: Spots,
    *,
    sizes_um: Sequence[float],
    size_px: int,
    encoder=None,
    chunk_spots: int | None = None,
    show_progress_bar: bool = False,
    desc: str = "chunks",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(positions, values)`` chunk by chunk: patches, or features when an encoder is given.

    With an active dask.distributed client the chunks run as tasks on its workers (each reads its own image
    windows) and arrive in the order they finish; otherwise they run here, one after the other.
    """
    chunk_spots = chunk_spots or chunk_spots_for(size_px)
    chunks = plan_chunks(spots, sizes_um, size_px, chunk_spots)
    shapes = {i: (int(lv.sizes["y"]), int(lv.sizes["x"])) for i, lv in enumerate(spots.levels)}
    bare = replace(spots, levels=[None] * len(spots.levels))  # what a task needs besides its pixels

    def args(chunk: Chunk):
        sub = bare.subset(chunk.positions)
        lazy = {i: spots.levels[i].data[:, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in chunk.windows.items()}
        return sub, lazy, chunk.windows, shapes, list(sizes_um), size_px

    bar = progress(range(spots.n_spots), show=show_progress_bar, desc=desc, unit="spot")
    update = getattr(bar, "update", lambda n: None)
    client = active_client()
    if client is None:
        for chunk in chunks:
            sub, lazy, *rest = args(chunk)
            blocks = {i: np.asarray(b) for i, b in lazy.items()}
            yield chunk.positions, chunk_task(sub, blocks, *rest, encoder=encoder)
            update(len(chunk.positions))
    else:
        yield from _iter_distributed(client, chunks, args, encoder, update)
    if hasattr(bar, "close"):
        bar.close()


def collect(chunks: Iterator[tuple[np.ndarray, np.ndarray]], n: int, out: np.ndarray | None = None) -> np.ndarray:
    """Write ``(positions, values)`` chunks into one array of ``n`` rows (``out`` when given) and return it."""
    for positions, values in chunks:
        if out is None:
            out = np.empty((n, *values.shape[1:]), dtype=values.dtype)
        out[positions] = values
    return out


def _iter_distributed(client, chunks: list[Chunk], args, encoder, update) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import dask
    from distributed import as_completed

    logger.info("Running %d chunks on the dask.distributed cluster at %s", len(chunks), client.scheduler.address)
    shared = client.scatter(encoder, broadcast=True, hash=False) if encoder is not None else None
    tasks = [dask.delayed(chunk_task)(*args(chunk), encoder=shared) for chunk in chunks]
    # one graph for all chunks: windows that share image chunks share their reads
    futures = client.compute(tasks)
    index_of = {f.key: i for i, f in enumerate(futures)}
    running = as_completed(futures)
    del futures  # each result is dropped from the cluster once read
    for future in running:
        values = future.result()
        positions = chunks[index_of.pop(future.key)].positions
        del future
        yield positions, values
        update(len(positions))


@doc_params()
def encode(
    data: SpatialData | Spots,
    encoder,
    *,
    size_um: float | None = None,
    context: Sequence[float] = (1.0,),
    chunk_spots: int | None = None,
    out: np.ndarray | None = None,
    show_progress_bar: bool = False,
    **resolve_kwargs,
) -> np.ndarray:
    """Encode the patches around every spot, chunk by chunk, on a dask.distributed cluster when one is active.

    Parameters
    ----------
    {data_spots}
    encoder
        An `omx.encoders.Encoder` (e.g. ``HandcraftedEncoder()``); it is sent once to each worker.
    {size_um}
    context
        Patch sizes as multiples of ``size_um``; the features of each are concatenated, in this order.
    chunk_spots
        Spots per chunk (one task on a cluster); by default as many as fit 256 MiB of patches.
    out
        A numpy array (or `numpy.memmap`) of shape ``(n_spots, encoder.dim * len(context))`` to write the
        features into as they come.
    {show_progress_bar}
    {resolve_kwargs}

    Returns
    -------
    Features ``(n_spots, encoder.dim * len(context))`` in the order of the spots (``out`` when given).

    Notes
    -----
    Inside ``with distributed.Client(address):`` (or with a default client), each chunk is a task that reads its
    own windows of the image on a worker: give the workers access to the image (a zarr store on a shared
    file system, or an in-memory image, which dask sends with the tasks). Results equal those computed locally.
    """
    spots = _as_spots(data, resolve_kwargs)
    size_um = spots.diameter_um if size_um is None else float(size_um)
    dim = encoder.dim * len(context)
    if out is None:
        out = np.empty((spots.n_spots, dim), dtype=np.float32)
    elif tuple(out.shape) != (spots.n_spots, dim):
        raise ValueError(f"`out` must have shape {(spots.n_spots, dim)}, got {tuple(out.shape)}.")
    chunks = iter_chunks(
        spots,
        sizes_um=[size_um * c for c in context],
        size_px=encoder.patch_px,
        encoder=encoder,
        chunk_spots=chunk_spots,
        show_progress_bar=show_progress_bar,
        desc=f"{encoder.name} features",
    )
    return collect(chunks, spots.n_spots, out)
