"""Nuclei from the hematoxylin channel of an H&E image, segmented chunk by chunk with overlap."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key, add_table, base_entry, check_column_free, check_free_elements, entries, fill_column
from omx._settings import warn
from omx._utils import default_bin_table, logger, progress, resolve_key
from omx.pp._patches import _read_region, _to_uint8
from omx.pp._spots import (
    _coordinate_systems,
    annotated_shapes,
    image_levels,
    image_mpp,
    resolve_image,
    resolve_spots,
    table_regions,
)

#: Name of the table of single cells (nuclei) that omx writes.
#: Longest side (pixels) of the pyramid level read to choose the global hematoxylin threshold.
_THRESHOLD_LEVEL_PX = 4096
#: Typical nucleus radius in microns, which sets the smoothing and the watershed seed spacing.
_NUCLEUS_RADIUS_UM = 3.0


def _hed(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical densities (``skimage.color.rgb2hed``) of a ``(y, x, 3)`` uint8 block."""
    from skimage.color import rgb2hed

    hed = rgb2hed(rgb)
    return hed[..., 0].astype(np.float32), hed[..., 1].astype(np.float32)


def _overview(levels) -> tuple[np.ndarray, float]:
    """A low-resolution ``(y, x, 3)`` uint8 view of the image and its level-0 pixels per pixel.

    The coarsest level with a side of at least 4096 px (or the finest), strided when a single-scale image is larger.
    """
    level = levels[0]
    for lv in levels:
        if max(int(lv.sizes["y"]), int(lv.sizes["x"])) >= _THRESHOLD_LEVEL_PX:
            level = lv
    scale = float(levels[0].sizes["x"]) / float(level.sizes["x"])
    h, w = int(level.sizes["y"]), int(level.sizes["x"])
    if h * w > _THRESHOLD_LEVEL_PX**2:  # a single-scale huge image: subsample rows and columns instead
        step = int(np.ceil(np.sqrt(h * w) / _THRESHOLD_LEVEL_PX))
        return _to_uint8(np.asarray(level.data[:3, ::step, ::step])), scale * step
    return _read_region(level, 0, h, 0, w), scale


def _tissue_of(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not glass: summed optical density over 0.3 (glass is near white, density close to 0)."""
    return -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0).sum(axis=2) > 0.3


def _global_threshold(rgb: np.ndarray, read_mpp: float) -> float:
    """Otsu threshold of the hematoxylin density over the tissue pixels of a low-resolution view (`_overview`).

    A low-resolution level blurs nuclei into their surroundings, so the threshold is taken between the two
    Otsu classes of the tissue pixels (not the background glass) and is the same for every chunk: chunks of
    pure stroma or pure tumour do not get a threshold of their own that splits them in two.
    """
    from skimage.filters import threshold_otsu

    hem, _ = _hed(rgb)
    tissue = _tissue_of(rgb)
    if tissue.sum() < 100:
        raise ValueError("The image holds no tissue (it is almost white); no nuclei can be found.")
    values = hem[tissue]
    thr = float(threshold_otsu(values))
    logger.debug("Hematoxylin threshold %.4f from a level at %.2f um/px", thr, read_mpp)
    return thr


def _neighbour_correlation(rgb: np.ndarray) -> float:
    """Correlation of the grey value of each pixel with its right and lower neighbours: ~0 for pixel noise."""
    grey = rgb.astype(np.float32).mean(axis=2)
    pairs = [(grey[:, :-1], grey[:, 1:]), (grey[:-1], grey[1:])]
    a = np.concatenate([p[0].ravel() for p in pairs])
    b = np.concatenate([p[1].ravel() for p in pairs])
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 1.0
    return float(np.corrcoef(a, b)[0, 1])


#: Below this correlation of neighbouring pixels (`_neighbour_correlation`) the image looks like pixel noise; a
#: scan of tissue, at any resolution, is far smoother (the toy image and the her2st sample: 0.94-0.97).
_MIN_NEIGHBOUR_CORRELATION = 0.3
#: Above this fraction of the tissue area covered by nuclei the "nuclei" are the stain itself, not nuclei
#: (the toy image: 0.12 of its area, the her2st sample: 0.05).
_MAX_NUCLEAR_FRACTION = 0.6


def _check_plausible(image_key: str, rgb: np.ndarray, read_mpp: float, nuclei_um2: float, threshold: float) -> None:
    """Warn when the image or the nuclei found in it do not look like an H&E scan of tissue."""
    corr = _neighbour_correlation(rgb)
    tissue_um2 = float(_tissue_of(rgb).sum()) * read_mpp**2
    fraction = nuclei_um2 / tissue_um2 if tissue_um2 > 0 else np.inf
    if corr < _MIN_NEIGHBOUR_CORRELATION:
        why = (
            f"neighbouring pixels are nearly uncorrelated (correlation {corr:.2f}; a scan of tissue is above 0.8), "
            "as in random noise"
        )
    elif fraction > _MAX_NUCLEAR_FRACTION:
        why = f"the nuclei cover {fraction:.0%} of the stained area (H&E tissue: about 5-40 %)"
    else:
        return
    warn(
        f"The nuclei found in image {image_key!r} look like noise: {why}. Check that it is an H&E scan of tissue "
        f"(not a fluorescence, mask or synthetic image), that `mpp` is right, and that the hematoxylin threshold "
        f"({threshold:.3g}) suits it (pass `threshold=`)."
    )


def _segment_block(
    rgb: np.ndarray, threshold: float, mpp: float, min_area_px: float, max_area_px: float
) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment one block: labels ``(y, x)`` int32 and a table of per-nucleus properties (block coordinates)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.measure import regionprops_table
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    hem, eos = _hed(rgb)
    smooth = ndimage.gaussian_filter(hem, sigma=max(0.5, 0.5 / mpp))
    mask = smooth > threshold
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    mask = remove_small_objects(mask, max_size=max(1, int(min_area_px) - 1))
    if not mask.any():
        return np.zeros(mask.shape, np.int32), pd.DataFrame()
    dist = ndimage.distance_transform_edt(mask)
    dist = ndimage.gaussian_filter(dist, sigma=1.0)
    radius_px = _NUCLEUS_RADIUS_UM / mpp
    comp, _ = ndimage.label(mask)
    peaks = peak_local_max(
        dist, min_distance=max(2, int(round(0.7 * radius_px))), threshold_abs=0.5, labels=comp, exclude_border=False
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # components too small or flat to hold a peak still are one nucleus each
    missing = np.setdiff1d(np.unique(comp[mask]), np.unique(comp[tuple(peaks.T)]) if len(peaks) else [])
    if len(missing):
        com = ndimage.center_of_mass(mask, comp, missing)
        for i, (y, x) in enumerate(com):
            yy, xx = int(round(y)), int(round(x))
            if comp[yy, xx] in missing:
                markers[yy, xx] = len(peaks) + 1 + i
            else:  # a ring-like component: seed at any of its pixels
                ys, xs = np.nonzero(comp == missing[i])
                markers[ys[0], xs[0]] = len(peaks) + 1 + i
    labels = watershed(-dist, markers, mask=mask).astype(np.int32)
    props = pd.DataFrame(
        regionprops_table(
            labels,
            intensity_image=np.stack([hem, eos], axis=-1),
            properties=("label", "centroid", "area", "eccentricity", "solidity", "intensity_mean"),
        )
    )
    props = props.rename(
        columns={
            "centroid-0": "y",
            "centroid-1": "x",
            "intensity_mean-0": "hematoxylin",
            "intensity_mean-1": "eosin",
        }
    )
    keep = (props["area"] >= min_area_px) & (props["area"] <= max_area_px)
    drop = props["label"].to_numpy()[~keep.to_numpy()]
    if len(drop):
        labels[np.isin(labels, drop)] = 0
    return labels, props[keep].reset_index(drop=True)


def _labels_array(labels_store: str | os.PathLike | None, shape: tuple[int, int], chunk_px: int):
    """An empty int32 zarr array on disk for the labels: at ``labels_store``, or in a temporary directory.

    The temporary directory (``tempfile.mkdtemp``, so under ``$TMPDIR``) is removed when Python exits.
    """
    import zarr

    if labels_store is None:
        tmp = tempfile.mkdtemp(prefix="omx_nuclei_")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        path = Path(tmp) / "labels.zarr"
    else:
        path = Path(labels_store)
    chunks = (min(chunk_px, shape[0]), min(chunk_px, shape[1]))
    return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype="int32", fill_value=0)


def _pick_spots(sdata: SpatialData, image_key: str, shapes_key: str | None, table_key: str | None, mpp):
    """Spots of the image (None when no shapes element shares its coordinate system)."""
    if shapes_key is None:
        systems = set(_coordinate_systems(sdata.images[image_key]))
        candidates = [
            k
            for k, s in sdata.shapes.items()
            if not k.endswith("_nuclei_shapes") and set(_coordinate_systems(s)) & systems
        ]
        if not candidates:
            return None
        # shapes that a measured table annotates are the spots (Xenium: its cells, not its nuclei); among Visium
        # HD's bin tables, the default bin size
        measured = {
            t: [k for k in annotated_shapes(sdata, sdata.tables[t]) if k in candidates]
            for t in sdata.tables
            if Key.TABLE_MARK not in sdata.tables[t].uns
        }
        measured = {t: ks for t, ks in measured.items() if ks}
        table_key = default_bin_table(list(measured)) or (next(iter(measured)) if len(measured) == 1 else None)
        if table_key is not None and len(measured[table_key]) == 1:
            candidates = measured[table_key]
        shapes_key = resolve_key(None, candidates, kind="shapes element", argument="shapes_key")
    if table_key is None:
        tables = [k for k in sdata.tables if shapes_key in annotated_shapes(sdata, sdata.tables[k])]
        table_key = tables[0] if len(tables) == 1 else None
    return resolve_spots(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, mpp=mpp)


@doc_params()
def segment_nuclei(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    mpp: float | None = None,
    chunk_px: int = 2048,
    overlap_px: int = 64,
    min_area_um2: float = 8.0,
    max_area_um2: float = 400.0,
    threshold: float | None = None,
    key_added: str | None = None,
    cells_key: str = Key.CELLS,
    labels_store: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> None:
    """Segment nuclei in an H&E image, chunk by chunk, and measure their morphology.

    The hematoxylin density comes from colour deconvolution (`skimage.color.rgb2hed`); it is smoothed,
    thresholded (one Otsu threshold for the whole image, taken over the tissue pixels of a low-resolution level),
    and touching nuclei are split by a watershed on the distance transform. The full-resolution image is read
    one chunk at a time with ``overlap_px`` of context on each side; a nucleus is kept only by the chunk that
    holds its centroid, so nuclei on chunk borders are neither lost nor counted twice.

    Memory does not grow with the image's pixels: it is bounded by the larger of the threshold step (at most
    4,096 x 4,096 pixels of a low-resolution level or a subsample: ~1.3-1.5 GB) and one chunk at a time (about
    60 bytes per pixel of ``(chunk_px + 2 overlap_px)^2``: ~0.3 GB at 2048, plus the image chunks that the read
    touches), plus the table of nuclei (`benchmarks/nuclei_scale.py`: 1.3-1.5 GB in all from 10,000 to
    30,000 pixels square, ~1 million nuclei at the largest). The labels never sit in memory whole: each
    chunk's nuclei are written to an int32 zarr array on disk (chunks of ``chunk_px``), reading back the
    neighbouring region first so that pixels a nucleus of an earlier chunk took stay its own. The array lives at
    ``labels_store``, or in a temporary directory (``tempfile.mkdtemp(prefix="omx_nuclei_")``, under
    ``$TMPDIR``) that is removed when Python exits; ``sdata.labels[key_added]`` reads it lazily
    (`dask.array.from_zarr`), and ``sdata.write`` (or ``sdata.write_element(key_added)`` for an object
    already on disk) copies the labels into the object's own store.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image.
    image_key
        The H&E image; may be omitted when there is one.
    shapes_key
        The spots whose nuclei are counted; omitted, the one shapes element that shares the image's coordinate
        system (none: nuclei are not assigned to spots).
    {table_key_spots}
    {mpp}
    chunk_px
        Side of the square chunk of the full-resolution image processed at once.
    overlap_px
        Context read around each chunk; should exceed the largest nucleus diameter in pixels.
    min_area_um2
        Smaller objects are dropped (debris, noise).
    max_area_um2
        Larger objects are dropped (stained clumps, folds).
    threshold
        Hematoxylin density above which a pixel belongs to a nucleus; omitted, the Otsu threshold described above.
    key_added
        Name of the labels element; ``"{image_key}_nuclei"`` when omitted. The circles are ``key_added + "_shapes"``.
    cells_key
        Name of the table of nuclei. A table of the same name that annotates other images' nuclei is extended.
    labels_store
        Path of a new zarr array for the labels (it must not exist); a temporary directory when omitted.
    overwrite
        Replace existing labels, shapes and table rows of this image's nuclei.
    {show_progress_bar}

    Returns
    -------
    None. Writes:

    - ``sdata.labels[key_added]``: int32 labels of the nuclei (0 = background), with the transformations of the
      image's finest level, backed by the zarr array described above; label ``i`` is the nucleus of shapes
      index ``i``.
    - ``sdata.shapes[key_added + "_shapes"]``: one circle per nucleus at its centroid, radius ``sqrt(area / pi)``,
      in the image's coordinate systems.
    - ``sdata.tables[cells_key]``: one row per nucleus annotating those shapes, with obs ``area_um2``,
      ``eccentricity``, ``solidity``, ``hematoxylin`` and ``eosin`` (mean stain densities), ``image``,
      ``spot_index`` (the position of the spot the centroid falls in, -1 outside every spot) and ``spot_id``
      (that spot's shapes index, as a string, or ``""``); ``obsm["spatial"]`` holds centroids in microns.
    - ``sdata.tables[table_key].obs["omx_n_nuclei"]``: nuclei per spot for this image's spots (NaN for other rows).
    """
    import dask.array as da
    import geopandas as gpd
    from scipy.spatial import cKDTree
    from shapely import points
    from spatialdata.models import Labels2DModel, ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    image_key = resolve_image(sdata, image_key)
    image = sdata.images[image_key]
    spots = _pick_spots(sdata, image_key, shapes_key, table_key, mpp)
    levels = spots.levels if spots is not None else image_levels(image, image_key)  # read and scaled once
    level0 = levels[0]
    mpp = spots.mpp if mpp is None and spots is not None else image_mpp(sdata, image, mpp)
    key_added = key_added or Key.nuclei(image_key)
    shapes_added = Key.nuclei_shapes(key_added)
    if chunk_px < 64 or overlap_px < 0:
        raise ValueError(f"chunk_px must be >= 64 and overlap_px >= 0, got {chunk_px} and {overlap_px}.")
    check_free_elements(sdata, overwrite=overwrite, labels=[key_added], shapes=[shapes_added])
    if spots is not None and spots.table_key is not None:  # the count column too, before anything is written
        check_column_free(
            sdata.tables[spots.table_key], Key.N_NUCLEI, key=key_added, overwrite=overwrite,
            where=f"sdata.tables[{spots.table_key!r}]",
        )  # fmt: skip
    if labels_store is not None and Path(labels_store).exists():
        raise FileExistsError(f"labels_store {str(labels_store)!r} exists; pass a path that does not exist yet.")
    old_cells = sdata.tables.get(cells_key)
    if old_cells is not None:
        regions = table_regions(old_cells)[0]
        if shapes_added in regions and not overwrite:
            raise KeyError(
                f"sdata.tables[{cells_key!r}] already holds nuclei of {shapes_added!r}; pass `overwrite=True`."
            )

    overview, overview_scale = _overview(levels)
    if threshold is None:
        threshold = _global_threshold(overview, mpp * overview_scale)
    h, w = int(level0.sizes["y"]), int(level0.sizes["x"])
    min_area_px, max_area_px = min_area_um2 / mpp**2, max_area_um2 / mpp**2
    labels = _labels_array(labels_store, (h, w), chunk_px)
    tiles = [(y0, x0) for y0 in range(0, h, chunk_px) for x0 in range(0, w, chunk_px)]
    parts = []
    n_next = 1
    for y0, x0 in progress(tiles, show=show_progress_bar, desc="nuclei", unit="chunk"):
        y1, x1 = min(y0 + chunk_px, h), min(x0 + chunk_px, w)
        ry0, ry1, rx0, rx1 = (
            max(0, y0 - overlap_px),
            min(h, y1 + overlap_px),
            max(0, x0 - overlap_px),
            min(w, x1 + overlap_px),
        )
        rgb = _read_region(level0, ry0, ry1, rx0, rx1)
        if (rgb.astype(np.int16).sum(axis=2) < 700).mean() < 1e-4:  # glass only
            continue
        block, props = _segment_block(rgb, threshold, mpp, min_area_px, max_area_px)
        if props.empty:
            continue
        cy, cx = props["y"].to_numpy() + ry0, props["x"].to_numpy() + rx0
        own = (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
        props = props[own].copy()
        if props.empty:
            continue
        new_ids = np.arange(n_next, n_next + len(props), dtype=np.int32)
        lut = np.zeros(int(block.max()) + 1, dtype=np.int32)
        lut[props["label"].to_numpy()] = new_ids
        relabelled = lut[block]
        target = labels[ry0:ry1, rx0:rx1]
        free = (relabelled > 0) & (target == 0)  # pixels a neighbouring chunk's nucleus already took stay its own
        target[free] = relabelled[free]
        labels[ry0:ry1, rx0:rx1] = target
        props["y"] += ry0
        props["x"] += rx0
        props["label"] = new_ids
        parts.append(props)
        n_next += len(props)
    if not parts:
        raise ValueError(
            f"No nuclei were found in image {image_key!r} (hematoxylin threshold {threshold:.3g}, "
            f"areas {min_area_um2}-{max_area_um2} um^2). Check that it is an H&E image, that `mpp` ({mpp:.3g} um/px) "
            "is right, or pass a lower `threshold=`."
        )
    props = pd.concat(parts, ignore_index=True)
    n = len(props)
    _check_plausible(image_key, overview, mpp * overview_scale, float(props["area"].sum()) * mpp**2, threshold)

    # where each nucleus falls: the nearest spot centre within its radius
    spot_index = np.full(n, -1, dtype=np.int64)
    xy = props[["x", "y"]].to_numpy()
    if spots is not None and spots.n_spots:
        dist, nearest = cKDTree(spots.centers).query(xy)
        inside = dist <= spots.radius_px[nearest]
        spot_index[inside] = nearest[inside]

    transformations = get_transformation(level0, get_all=True)
    lab = da.from_zarr(labels)
    sdata.labels[key_added] = Labels2DModel.parse(lab, dims=("y", "x"), transformations=transformations)
    index = pd.Index(props["label"].to_numpy(), name=None)
    gdf = gpd.GeoDataFrame({"radius": np.sqrt(props["area"].to_numpy() / np.pi)}, geometry=points(xy), index=index)
    sdata.shapes[shapes_added] = ShapesModel.parse(gdf, transformations=transformations)

    obs = pd.DataFrame(
        {
            "region": shapes_added,
            "cell_id": props["label"].to_numpy(),
            "image": image_key,
            "area_um2": props["area"].to_numpy() * mpp**2,
            "eccentricity": props["eccentricity"].to_numpy(),
            "solidity": props["solidity"].to_numpy(),
            "hematoxylin": props["hematoxylin"].to_numpy(),
            "eosin": props["eosin"].to_numpy(),
            "spot_index": spot_index,
            "spot_id": [str(spots.index[i]) if i >= 0 else "" for i in spot_index] if spots is not None else "",
        },
        index=[f"{key_added}_{i}" for i in props["label"]],
    )
    if spots is not None:
        obs["spots_key"] = spots.shapes_key
    cells = AnnData(obs=obs)
    cells.obsm["spatial"] = xy * mpp
    if old_cells is not None:
        import anndata as ad

        keep_old = old_cells[old_cells.obs["region"].astype(str) != shapes_added]
        old_regions = [r for r in table_regions(old_cells)[0] if r != shapes_added]
        cells = ad.concat([AnnData(obs=keep_old.obs, obsm=dict(keep_old.obsm)), cells], join="outer")
        regions = [*old_regions, shapes_added]
    else:
        regions = [shapes_added]
    cells.obs["region"] = pd.Categorical(cells.obs["region"].astype(str), categories=regions)
    params = {"image_key": image_key, "threshold": float(threshold), "mpp": mpp, "chunk_px": chunk_px}
    earlier = entries(old_cells) if old_cells is not None else {}
    cells.uns[Key.UNS] = {**earlier, key_added: base_entry("segment_nuclei", params)}
    cells.uns[Key.TABLE_MARK] = "cells"
    cells = TableModel.parse(cells, region=regions, region_key="region", instance_key="cell_id")
    add_table(sdata, cells_key, cells, overwrite=True, what="nuclei")  # checked above: only this image's are replaced
    logger.info(
        "Added %d nuclei of %r: labels sdata.labels[%r], circles sdata.shapes[%r], table sdata.tables[%r]",
        n, image_key, key_added, shapes_added, cells_key,
    )  # fmt: skip

    if spots is not None and spots.table_key is not None:
        table = sdata.tables[spots.table_key]
        counts = np.bincount(spot_index[spot_index >= 0], minlength=spots.n_spots)
        has_row = spots.table_rows >= 0
        params = {"image_key": image_key, "shapes_key": spots.shapes_key, "labels": key_added}
        entry = base_entry("segment_nuclei", params)
        fill_column(
            table, Key.N_NUCLEI, spots.table_rows[has_row], counts[has_row], key=key_added, entry=entry,
            overwrite=overwrite, where=f"sdata.tables[{spots.table_key!r}]",
        )  # fmt: skip
        logger.info(
            "Nuclei per shape of %r: median %g over %d", spots.shapes_key,
            float(np.median(counts[has_row])) if has_row.any() else 0.0, int(has_row.sum()),
        )  # fmt: skip
