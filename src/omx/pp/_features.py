"""Encode once: features kept where later calls find them, keyed by encoder and patch geometry.

Features of spots that a table annotates go to ``table.obsm["X_omx_<encoder>"]``, described by
``uns["omx"]["X_omx_<encoder>"]`` (the encoder's parameters, the patch geometry and, per shapes element, the image
the patches came from). Features of spots without a table go to a zarr feature store (``omx.settings.feature_store``
or ``store=``): one array per image, spots, encoder and geometry, named by a digest of them. `omx.tl` looks in both
before encoding, so a foundation model runs once per slide, not once per call or fold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from omx._schema import Key, base_entry, check_free, entries, jsonable
from omx._utils import logger
from omx.pp._spots import Spots

#: Encoder parameters that change speed, not features: ignored when matching cached features.
RUNTIME_PARAMS = ("batch_size", "amp", "device", "devices")
#: Encoder classes whose parameters identify their features (a bare `TorchEncoder` names only its module's class).
IDENTIFIABLE = ("HandcraftedEncoder", "FoundationEncoder", "TimmEncoder")


def encoder_identity(encoder) -> dict[str, Any] | None:
    """The parameters that determine an encoder's features, or None when they cannot be told from its parameters."""
    params = encoder.get_params()
    if params.get("class") not in IDENTIFIABLE:
        return None
    return jsonable({k: v for k, v in params.items() if k not in RUNTIME_PARAMS})


def geometry(encoder, size_um: float, context: Sequence[float]) -> dict[str, Any]:
    """The patch geometry of features: encoder, patch side in microns, context factors, pixels per patch."""
    return {
        "encoder": encoder_identity(encoder),
        "size_um": round(float(size_um), 6),
        "context": [float(c) for c in context],
        "patch_px": int(encoder.patch_px),
    }


def _same(entry: dict[str, Any], geo: dict[str, Any]) -> bool:
    return entry.get("function") == "encode" and all(entry.get(k) == v for k, v in geo.items())


def find_in_table(table: AnnData | None, spots: Spots, geo: dict[str, Any]) -> np.ndarray | None:
    """Features of `spots` written by `omx.pp.encode` into `table` with geometry `geo`, or None."""
    if table is None or geo["encoder"] is None:
        return None
    rows = spots.table_rows
    if len(rows) == 0 or (rows < 0).any():
        return None
    for key, entry in entries(table).items():
        if key not in table.obsm or not _same(entry, geo):
            continue
        if entry.get("regions", {}).get(spots.shapes_key) != spots.image_key:
            continue
        values = np.asarray(table.obsm[key][rows], dtype=np.float32)
        if np.isfinite(values).all():
            logger.debug("Reusing table.obsm[%r] for %d spots of %r", key, len(rows), spots.shapes_key)
            return values
    return None


def check_table_key(
    table: AnnData, spots: Spots, geo: dict[str, Any], *, key: str, overwrite: bool, where: str
) -> dict[str, Any] | None:
    """Check that the features of `spots` may go to ``table.obsm[key]``; return the entry whose rows stay.

    A key that holds features of the same geometry gains these rows (its entry is returned); a shapes element
    that is already there, or a key of another geometry or not written by omx, is refused unless `overwrite`.
    """
    rows = spots.table_rows
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum())} spots of {spots.shapes_key!r} have no row in the table; encode them into a "
            "feature store (`store=` or omx.settings.feature_store) instead."
        )
    old = entries(table).get(key)
    if old is None or key not in table.obsm or not _same(old, geo):
        check_free(table, key=key, overwrite=overwrite, where=where, obsm=[key])
        return None
    if spots.shapes_key in old.get("regions", {}) and not overwrite:
        raise KeyError(
            f"{where}.obsm[{key!r}] already holds these features of {spots.shapes_key!r}; pass `overwrite=True` to "
            "encode them again."
        )
    return old


def write_to_table(
    table: AnnData,
    spots: Spots,
    features: np.ndarray,
    geo: dict[str, Any],
    *,
    key: str,
    params: dict[str, Any],
    overwrite: bool,
    where: str,
) -> None:
    """Write the features of `spots` into ``table.obsm[key]`` (checked by `check_table_key`).

    Rows of other shapes elements that the key holds with the same geometry are kept.
    """
    old = check_table_key(table, spots, geo, key=key, overwrite=overwrite, where=where)
    rows = spots.table_rows
    n, d = table.n_obs, features.shape[1]
    if old is not None and np.shape(table.obsm[key]) == (n, d):
        values = np.asarray(table.obsm[key], dtype=np.float32).copy()
    else:
        values = np.full((n, d), np.nan, dtype=np.float32)
    values[rows] = features
    regions = {**(old.get("regions", {}) if old is not None else {}), spots.shapes_key: spots.image_key}
    table.obsm[key] = values
    table.uns.setdefault(Key.UNS, {})[key] = base_entry(
        "encode", params, **geo, regions=regions, written=[f"obsm/{key}"]
    )
    logger.info("Added %d spots x %d features to %s.obsm[%r]", len(rows), d, where, key)


def store_name(spots: Spots, geo: dict[str, Any]) -> str:
    """The feature store's array name for `spots` and `geo`: a digest of image, spots and geometry."""
    level0 = spots.levels[0]
    description = {
        "image_key": spots.image_key,
        "image_shape": [int(level0.sizes[d]) for d in ("c", "y", "x")],
        "shapes_key": spots.shapes_key,
        "centers": hashlib.sha1(np.ascontiguousarray(spots.centers, dtype=np.float64).tobytes()).hexdigest(),
        "mpp": round(float(spots.mpp), 9),
        **geo,
    }
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def find_in_store(store: str | Path | None, spots: Spots, geo: dict[str, Any]) -> np.ndarray | None:
    """Features of `spots` with geometry `geo` in the zarr feature store at `store`, or None."""
    if store is None or geo["encoder"] is None or not Path(store).exists():
        return None
    import zarr

    name = store_name(spots, geo)
    try:
        array = zarr.open_array(str(Path(store) / name), mode="r")
    except (
        FileNotFoundError,
        KeyError,
        ValueError,
        zarr.errors.ArrayNotFoundError,
        zarr.errors.NodeTypeValidationError,
    ):
        return None
    if not array.attrs.get("complete", False) or array.shape[0] != spots.n_spots:
        return None
    logger.debug("Reusing features %s/%s for %d spots of %r", store, name, spots.n_spots, spots.shapes_key)
    return np.asarray(array[:], dtype=np.float32)


def create_in_store(store: str | Path, spots: Spots, n_features: int, geo: dict[str, Any], *, chunk_rows: int = 65536):
    """An empty float32 array ``(n_spots, n_features)`` for the features of `spots` in the feature store.

    Its attributes describe the spots and geometry; it is not found by `find_in_store` until `mark_complete`.
    """
    import zarr

    path = Path(store) / store_name(spots, geo)
    array = zarr.create_array(
        str(path), shape=(spots.n_spots, n_features), chunks=(max(1, min(spots.n_spots, chunk_rows)), n_features),
        dtype="f4", overwrite=True,
    )  # fmt: skip
    array.attrs.update(
        jsonable({"image_key": spots.image_key, "shapes_key": spots.shapes_key, "n_spots": spots.n_spots, **geo})
    )
    return array


def mark_complete(array, path: str | Path) -> None:
    """Mark the feature-store array at ``path`` as fully written (last: an interrupted write is never read back)."""
    array.attrs["complete"] = True
    logger.info("Added %d spots x %d features to the feature store %s", *array.shape, path)


def write_to_store(store: str | Path, spots: Spots, features: np.ndarray, geo: dict[str, Any]) -> str:
    """Write the features of `spots` into the zarr feature store at `store`; returns the array's path."""
    path = Path(store) / store_name(spots, geo)
    array = create_in_store(store, spots, features.shape[1], geo)
    array[:] = features
    mark_complete(array, path)
    return str(path)
