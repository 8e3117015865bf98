"""Small shared helpers: logging, key resolution, input checks, device choice, normalisation."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from omx._schema import Key

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("omx")


def resolve_key(key: str | None, candidates: Iterable[str], *, kind: str, argument: str) -> str:
    """Return ``key`` if it is one of ``candidates``, or the only candidate when ``key`` is None.

    Raises a `KeyError` that names the candidates and the argument to pass otherwise.
    """
    candidates = list(candidates)
    if key is not None:
        if key not in candidates:
            raise KeyError(
                f"There is no {kind} {key!r} in the SpatialData object. "
                f"Available {kind}s: {candidates or 'none'}. Pass one of them as `{argument}=`."
            )
        return key
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise KeyError(f"The SpatialData object has no {kind}; add one or pass another object.")
    raise KeyError(
        f"Ambiguous {kind}: the SpatialData object has {len(candidates)} ({candidates}). Pass `{argument}=`."
    )


def resolve_table(sdata: SpatialData, table_key: str | None) -> tuple[str, AnnData]:
    """Return the key and the table; an omitted key resolves to the one table that omx did not make.

    Tables that omx makes (marked by ``uns[Key.TABLE_MARK]``) are candidates only when the object holds no other
    table; the rule every function with a ``table_key`` follows (``omx.tl``, ``omx.pl``).
    """
    candidates = list(sdata.tables.keys())
    if table_key is None:
        measured = [k for k in candidates if Key.TABLE_MARK not in sdata.tables[k].uns]
        candidates = measured or candidates
        table_key = default_bin_table(candidates)
        if table_key is None and len(candidates) > 1:
            raise KeyError(
                f"Ambiguous table: the SpatialData object has {len(candidates)} ({candidates}). Pass one of them as "
                "`table_key=`; tables of several samples read one by one are joined with "
                "`spatialdata.concatenate(sdatas, concatenate_tables=True)`."
            )
    table_key = resolve_key(table_key, candidates, kind="table", argument="table_key")
    return table_key, sdata.tables[table_key]


#: spatialdata-io's names of Visium HD bins: tables ``square_008um``, shapes ``<dataset>_square_008um``; and the bin
#: table used when none is named.
HD_BIN = re.compile(r"square_(\d{3})um$")
HD_DEFAULT_TABLE = "square_008um"


def default_bin_table(candidates: Sequence[str]) -> str | None:
    """Visium HD's 8 um bins when the candidates are spatialdata-io's bin tables (``square_002um``, ...), else None.

    8 um is Space Ranger's and spatialdata-io's default bin size; the choice is logged with the argument that
    changes it, so it is never silent.
    """
    if len(candidates) > 1 and HD_DEFAULT_TABLE in candidates and all(HD_BIN.fullmatch(k) for k in candidates):
        logger.info(
            f"Using Visium HD's {HD_DEFAULT_TABLE} bins (tables {sorted(candidates)}); pass `table_key=` for another "
            "bin size."
        )
        return HD_DEFAULT_TABLE
    return None


def check_counts(X: Any, *, name: str = "counts") -> None:
    """Raise a `ValueError` when a count matrix holds NaN, infinite or negative values."""
    data = X.data if sparse.issparse(X) else np.asarray(X)
    if data.size == 0:
        return
    if not np.all(np.isfinite(data)):
        n = int(np.sum(~np.isfinite(data)))
        raise ValueError(f"The {name} hold {n} NaN or infinite values. Remove or fill them before fitting.")
    if data.min() < 0:
        n = int(np.sum(data < 0))
        raise ValueError(
            f"The {name} hold {n} negative values. omx expects raw, non-negative counts; "
            "pass the raw counts (e.g. `layer='counts'`)."
        )


#: Entries (rows x chosen genes) made dense at once by `log_normalize`: 8 MB of float64 at a time.
_LOG_NORMALIZE_CHUNK = 2**20


def log_normalize(X: Any, *, target_sum: float = 1e4, columns: Any = None) -> np.ndarray:
    """Return dense ``log1p(counts / total * target_sum)`` in float32; spots with no counts give zeros.

    The total is taken over all columns of ``X``; ``columns`` (positions) selects the genes returned, so only
    those are made dense, a block of rows at a time (float64 arithmetic, float32 result).
    ``sc.pp.normalize_total`` and ``sc.pp.log1p`` give the same values up to float32 rounding but normalise every
    gene of the matrix first; ``benchmarks/libraries.py`` compares the two.
    """
    if sparse.issparse(X):
        total = np.asarray(X.sum(axis=1), dtype=np.float64).reshape(-1, 1)
        X = (X[:, columns] if columns is not None else X).tocsr()
    else:
        X = np.asarray(X)
        total = np.asarray(X.sum(axis=1), dtype=np.float64).reshape(-1, 1)
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    n_cols = X.shape[1] if sparse.issparse(X) or columns is None else len(np.arange(X.shape[1])[columns])
    out = np.empty((X.shape[0], n_cols), dtype=np.float32)
    step = max(1, _LOG_NORMALIZE_CHUNK // max(1, n_cols))
    for start in range(0, X.shape[0], step):
        block = X[start : start + step]
        if sparse.issparse(block):
            block = block.toarray()
        elif columns is not None:
            block = block[:, columns]
        block = block.astype(np.float64)  # a copy, worked on in place
        np.multiply(block, scale[start : start + step], out=block)
        out[start : start + step] = np.log1p(block, out=block)
    return out


def get_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for ``device``: ``"auto"`` is CUDA when present, else the CPU."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was asked for, but torch sees no CUDA device. Use device='auto' or 'cpu'."
        )
    return dev


def seed_everything(seed: int) -> None:
    """Seed numpy and torch (CPU and CUDA) and make torch pick deterministic kernels where it can."""
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def as_list(value: str | Sequence[str] | None) -> list[str] | None:
    """Turn a string or a sequence of strings into a list; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def progress(iterable: Iterable, *, show: bool, total: int | None = None, desc: str | None = None, unit: str = "it"):
    """Wrap ``iterable`` in a `tqdm.auto` progress bar when ``show`` is true."""
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)


def file_sha256(path) -> str:
    """A file's sha256 in hex, as pooch computes it for the downloads it checks (model files use it too)."""
    import pooch

    return pooch.file_hash(str(path), alg="sha256")
