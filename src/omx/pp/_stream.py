"""Patches and features of many spots, chunk by chunk: locally, or as tasks on a dask.distributed cluster.

A section is cut into chunks of spots sorted by row. Each chunk reads one window of the image per pyramid
level it needs (the pixels all its patches touch, no more), cuts its patches with `iter_patches` and, when
encoding, turns them into features. The same chunk function runs in this process or on a dask.distributed
worker, so the results do not depend on where they were computed.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import numpy as np
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key
from omx._utils import logger, progress
from omx.pp._patches import TILE_PX, _as_spots, iter_patches, patch_corners, patch_geometry, patch_tiles
from omx.pp._spots import Spots

#: Patch sizes, as multiples of the spot size, whose features feature models concatenate (encoders without a
#: native resolution).
DEFAULT_CONTEXT = (1.0, 2.0, 3.0)
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


def chunk_patches(
    spots: Spots,
    blocks: dict[int, np.ndarray],
    windows: dict[int, tuple[int, int, int, int]],
    shapes: dict[int, tuple[int, int]],
    sizes_um: Sequence[float],
    size_px: int,
) -> list[np.ndarray]:
    """The patches of one chunk, one ``(n, size_px, size_px, 3)`` array per size.

    ``blocks`` hold the pixels of each level's window, so this runs wherever the blocks are: in this process, in
    a background thread, or on a dask worker.
    """
    levels = [None] * len(spots.level_scales)
    for level, block in blocks.items():
        y0, _, x0, _ = windows[level]
        levels[level] = _Window(np.asarray(block), y0, x0, *shapes[level])
    spots = replace(spots, levels=levels)
    out = []
    for size_um in sizes_um:
        patches = np.empty((spots.n_spots, size_px, size_px, 3), dtype=np.uint8)
        for idx, part in iter_patches(spots, size_um=size_um, size_px=size_px):
            patches[idx] = part
        out.append(patches)
    return out


def encode_patches(patches: list[np.ndarray], encoder=None) -> np.ndarray:
    """Patches of one size (``encoder=None``) or the concatenated features of each size."""
    if encoder is None:
        return patches[0]
    return np.concatenate([encoder.transform(p) for p in patches], axis=1)


def chunk_task(spots, blocks, windows, shapes, sizes_um, size_px, encoder=None) -> np.ndarray:
    """Patches (``encoder=None``, one size) or concatenated features (one block per size) of one chunk."""
    return encode_patches(chunk_patches(spots, blocks, windows, shapes, sizes_um, size_px), encoder)


def default_workers(encoder) -> int:
    """Background threads that cut patches while `encoder` encodes: several for a GPU encoder, else one."""
    device = getattr(encoder, "device", None)
    if getattr(device, "type", None) == "cuda":
        return int(min(8, max(1, (os.cpu_count() or 2) - 1)))
    return 1


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
    num_workers: int | None = None,
    show_progress_bar: bool = False,
    desc: str = "chunks",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(positions, values)`` chunk by chunk: patches, or features when an encoder is given.

    With an active dask.distributed client the chunks run as tasks on its workers (each reads its own image
    windows) and arrive in the order they finish. Otherwise ``num_workers`` background threads (see
    `default_workers`; 0 for none) read and cut the patches of the next chunks while this thread encodes the
    current one, so a GPU encoder does not wait for the image; chunks arrive in order.
    """
    chunk_spots = chunk_spots or max(MIN_CHUNK_SPOTS, chunk_spots_for(size_px) // len(sizes_um))
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
        workers = default_workers(encoder) if num_workers is None else int(num_workers)

        def cut(chunk: Chunk) -> list[np.ndarray]:
            sub, lazy, *rest = args(chunk)
            return chunk_patches(sub, {i: np.asarray(b) for i, b in lazy.items()}, *rest)

        for chunk, patches in _prefetched(chunks, cut, workers):
            yield chunk.positions, encode_patches(patches, encoder)
            update(len(chunk.positions))
    else:
        yield from _iter_distributed(client, chunks, args, encoder, update)
    if hasattr(bar, "close"):
        bar.close()


def _prefetched(chunks: list[Chunk], cut, workers: int) -> Iterator[tuple[Chunk, list[np.ndarray]]]:
    """``(chunk, cut(chunk))`` in order; with workers, up to ``workers + 1`` chunks are cut ahead in threads."""
    if workers < 1:
        for chunk in chunks:
            yield chunk, cut(chunk)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="omx-patches") as pool:
        pending: deque = deque()
        todo = iter(chunks)
        for chunk in islice(todo, workers + 1):
            pending.append((chunk, pool.submit(cut, chunk)))
        while pending:
            chunk, future = pending.popleft()
            patches = future.result()
            for nxt in islice(todo, 1):
                pending.append((nxt, pool.submit(cut, nxt)))
            yield chunk, patches


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


def patch_settings(encoder, diameter_um: float, size_um: float | None, context: Sequence[float] | None):
    """``(size_um, context)`` with the defaults filled in for `encoder`.

    An encoder with a native resolution (``encoder.mpp``, e.g. a foundation model) sees patches of
    ``patch_px * mpp`` microns (224 px at 0.5 um/px: 112 um), one size; other encoders see patches of the spot's
    diameter and twice and three times that (`DEFAULT_CONTEXT`).
    """
    native = getattr(encoder, "mpp", None) if encoder is not None else None
    if size_um is None:
        size_um = encoder.patch_px * native if native else diameter_um
    if context is None:
        context = (1.0,) if native else DEFAULT_CONTEXT
    context = tuple(float(c) for c in context)
    if not context or not all(np.isfinite(c) and c > 0 for c in context):
        raise ValueError(f"context must hold positive multiples of size_um (e.g. (1, 2, 3)), got {context}.")
    if size_um is not None and (not np.isfinite(float(size_um)) or float(size_um) <= 0):
        raise ValueError(f"size_um must be a positive number of microns, got {size_um}.")
    return float(size_um), context


@doc_params()
def encode(
    data: SpatialData | Spots,
    encoder: Any = "handcrafted",
    *,
    size_um: float | None = None,
    context: Sequence[float] | None = None,
    key_added: str | None = None,
    store: str | os.PathLike | None = None,
    inplace: bool = True,
    overwrite: bool = False,
    chunk_spots: int | None = None,
    num_workers: int | None = None,
    out: np.ndarray | None = None,
    show_progress_bar: bool = True,
    **resolve_kwargs,
) -> np.ndarray | None:
    """Encode the patches around every spot once, and keep the features where `omx.tl` finds them again.

    Chunks of spots are cut in background threads while the encoder works (on a GPU it does not wait for the
    image), or run as tasks on a dask.distributed cluster when one is active.

    Parameters
    ----------
    {data_spots}
    encoder
        An `omx.encoders.Encoder` (e.g. ``get_encoder("uni", weights="uni.bin")``) or the name of one that needs no
        weights (``"handcrafted"``).
    size_um
        Side of the patch around each spot, in microns. By default ``patch_px * mpp`` for an encoder with a native
        resolution (foundation models: 112 um), else the spot diameter.
    context
        Patch sizes as multiples of ``size_um``; the features of each are concatenated, in this order. By default
        ``(1,)`` for an encoder with a native resolution, else ``(1, 2, 3)``, as `omx.tl` uses them.
    key_added
        The ``obsm`` key (and ``uns["omx"]`` entry) of the features; ``"X_omx_<encoder name>"`` by default.
    store
        A zarr feature store (a folder) for spots that no table annotates; ``omx.settings.feature_store`` by
        default.
    inplace
        Write the features (see Returns) and return None; otherwise return them and write nothing.
    {overwrite}
    chunk_spots
        Spots per chunk (one task on a cluster); by default as many as fit 256 MiB of patches.
    num_workers
        Threads that cut patches ahead of the encoder; by default several for an encoder on a GPU, else one; 0
        cuts them in this thread.
    out
        A numpy array (or `numpy.memmap`) of shape ``(n_spots, encoder.dim * len(context))`` to write the
        features into as they come.
    {show_progress_bar}
    {resolve_kwargs}

    Returns
    -------
    With a SpatialData and ``inplace=True``, None, and the features ``float32 (n_spots, dim * len(context))`` go to

    - ``table.obsm[key_added]`` of the table annotating the spots (NaN in the rows of other shapes elements
      until they are encoded too), described by ``table.uns["omx"][key_added]`` (encoder, patch geometry and,
      per shapes element, its image); or
    - the feature store, when no table annotates the spots.

    Otherwise the features, in the order of the spots (``out`` when given); resolved `Spots` with a ``store``
    also write them there.

    Notes
    -----
    Inside ``with distributed.Client(address):`` (or with a default client), each chunk is a task that reads its
    own windows of the image on a worker: give the workers access to the image (a zarr store on a shared
    file system, or an in-memory image, which dask sends with the tasks). Results equal those computed locally.
    """
    from omx._settings import settings
    from omx.encoders import get_encoder
    from omx.pp._features import check_table_key, find_in_store, geometry, write_to_store, write_to_table

    encoder = get_encoder(encoder)
    spots = _as_spots(data, resolve_kwargs)
    size_um, context = patch_settings(encoder, spots.diameter_um, size_um, context)
    store = settings.feature_store if store is None else store
    writing = isinstance(data, SpatialData) and inplace
    table = data.tables[spots.table_key] if writing and spots.table_key is not None else None
    to_table = table is not None and bool((spots.table_rows >= 0).all())
    key = key_added or Key.embedding(encoder.name)
    where = f"sdata.tables[{spots.table_key!r}]"
    if writing and not to_table and store is None:
        raise ValueError(
            f"No table annotates every spot of {spots.shapes_key!r}, so the features need a feature store: pass "
            "`store='features.zarr'` or set `omx.settings.feature_store`, or `inplace=False` to get them back."
        )
    geo = geometry(encoder, size_um, context)
    if to_table:  # before the work: a taken key fails now, not after an hour of encoding
        check_table_key(table, spots, geo, key=key, overwrite=overwrite, where=where)
    dim = encoder.dim * len(context)
    if out is None:
        out = np.empty((spots.n_spots, dim), dtype=np.float32)
    elif tuple(out.shape) != (spots.n_spots, dim):
        raise ValueError(f"`out` must have shape {(spots.n_spots, dim)}, got {tuple(out.shape)}.")
    cached = find_in_store(store, spots, geo) if not to_table else None
    if cached is not None:
        out[:] = cached
        features = out
    else:
        chunks = iter_chunks(
            spots,
            sizes_um=[size_um * c for c in context],
            size_px=encoder.patch_px,
            encoder=encoder,
            chunk_spots=chunk_spots,
            num_workers=num_workers,
            show_progress_bar=show_progress_bar,
            desc=f"{encoder.name} features",
        )
        features = collect(chunks, spots.n_spots, out)
    params = {"image_key": spots.image_key, "shapes_key": spots.shapes_key, "mpp": spots.mpp}
    if to_table:
        write_to_table(table, spots, features, geo, key=key, params=params, overwrite=overwrite, where=where)
    elif store is not None and (writing or not isinstance(data, SpatialData)) and cached is None:
        write_to_store(store, spots, features, geo)
    return None if writing else features
