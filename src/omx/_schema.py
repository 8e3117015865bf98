"""Every key omx writes into a SpatialData object, and the one writer that checks and writes them.

Nothing else in omx writes results into a table or adds an element: the front doors build their values and
hand them to :func:`write_results`, :func:`fill_column` or :func:`add_table`, which refuse to replace anything
that exists (a user's column, a layer, an earlier result) unless the caller passes ``overwrite=True``, and log
what they wrote.

Layout of ``table.uns["omx"][key]`` (one entry per result, ``key`` being the call's ``key_added``)::

    {
        "function": "fit_predict",          # the omx function that wrote it
        "version": "0.2.0",                 # omx version
        "params": {...},                    # the call's parameters, scanpy's uns[key]["params"]
        "model": {"class": "Ridge", "params": {...}},   # for model results
        "genes": [...],                     # modelled genes, where there are
        "written": ["layers/omx_pred", ...],            # every key this result wrote, for the ownership check
        "scores": {"section": [...], "gene": [...], "pearson": [...], ...},  # per-gene scores, long format
        "summary": {section: {gene_set: {metric: value}}},                    # summaries of those scores
    }

Per-gene scores have one layout wherever they come from (:func:`omx.tl.fit_predict`,
:func:`omx.tl.cross_validate`): one row per scored (section, gene), stored as a dict of equal-length lists;
:func:`scores_frame` reads it back and `omx.get.scores` returns it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("omx")


class Key:
    """Names of everything omx writes. Derived names are methods of the main key they belong to."""

    #: ``table.uns`` entry holding one dict per result (see the module docstring).
    UNS = "omx"
    #: ``table.uns`` marker of the tables omx makes (value ``"predictions"`` or ``"cells"``); an omitted
    #: ``table_key`` never resolves to them while the object holds another table.
    TABLE_MARK = "omx_table"
    #: ``sdata.attrs`` entry where omx records which coordinate systems are in microns.
    ATTRS = "omx"
    #: ``GeoDataFrame.attrs`` entry of the shapes elements omx makes (tissue, grids): the function, version and
    #: parameters of the call (spatialdata keeps it through ``write`` / ``read_zarr``).
    SHAPES_ATTRS = "omx"
    #: Default ``key_added`` of predicted expression: a layer of the measured table, or a new table.
    PRED = "omx_pred"
    #: Default ``key_added`` of out-of-fold predictions and scores of :func:`omx.tl.cross_validate`.
    CV = "omx_cv"
    #: Default ``key_added`` of cell-type proportions (``obsm``).
    PROPORTIONS = "omx_proportions"
    #: Default ``key_added`` of super-resolved expression (a new table annotating the fine units).
    SUPERRES = "omx_superres"
    #: ``obs`` column of a super-resolved table: the measured spot each fine unit lies in.
    SPOT = "omx_spot"
    #: Default name of the table of nuclei (one row per nucleus).
    CELLS = "omx_cells"
    #: ``obs`` column of the spots table with the nuclei counted in each spot.
    N_NUCLEI = "omx_n_nuclei"
    #: ``obs`` columns naming each spot's section and patient (as `omx.io` and `omx.datasets` write them).
    SECTION = "section"
    PATIENT = "patient"
    #: ``obsm`` entry with spot centres in microns, in the tables omx makes and in `omx.get.predictions`.
    SPATIAL = "spatial"
    #: Scale of every prediction omx writes.
    TARGET_SCALE = "log1p(counts / total * 1e4)"

    @staticmethod
    def variance(key: str) -> str:
        """Layer with the predictive variance of predictions ``key``."""
        return f"{key}_var"

    @staticmethod
    def cell_type(key: str) -> str:
        """``obs`` column with the most abundant cell type of proportions ``key``."""
        return "omx_cell_type" if key == Key.PROPORTIONS else f"{key}_cell_type"

    @staticmethod
    def image_type(key: str) -> str:
        """``obs`` column of the nuclei table with each nucleus's image-only cell type of proportions ``key``."""
        return "omx_image_type" if key == Key.PROPORTIONS else f"{key}_image_type"

    @staticmethod
    def image_type_confidence(key: str) -> str:
        """``obs`` column of the nuclei table with the nucleus classifier's probability of its image-only type."""
        return f"{Key.image_type(key)}_confidence"

    @staticmethod
    def quantiles(key: str) -> tuple[str, str]:
        """``obsm`` entries with the 5 % and 95 % posterior quantiles of proportions ``key``."""
        return f"{key}_q05", f"{key}_q95"

    @staticmethod
    def n_cells(key: str) -> str:
        """``obs`` column with the posterior mean number of cells per spot of proportions ``key``."""
        return f"{key}_n_cells"

    @staticmethod
    def signatures(key: str) -> str:
        """``varm`` entry with the cell-type signatures used for proportions ``key``."""
        return f"{key}_signatures"

    @staticmethod
    def embedding(encoder: str) -> str:
        """``obsm`` entry with the features of an encoder."""
        return f"X_omx_{encoder}"

    @staticmethod
    def bins(shapes_key: str, bin_um: float) -> str:
        """Shapes element of the square bins that `omx.tl.super_resolve` lays over the spots of ``shapes_key``."""
        return f"{shapes_key}_bins_{bin_um:g}um"

    @staticmethod
    def nuclei(image_key: str) -> str:
        """Labels element of the nuclei segmented in an image."""
        return f"{image_key}_nuclei"

    @staticmethod
    def nuclei_shapes(labels_key: str) -> str:
        """Shapes element with one circle per nucleus of a labels element."""
        return f"{labels_key}_shapes"

    @staticmethod
    def tissue(image_key: str) -> str:
        """Shapes element with the tissue polygons of an image (`omx.pp.detect_tissue`)."""
        return f"{image_key}_tissue"

    @staticmethod
    def grid(image_key: str, kind: str, size_um: float) -> str:
        """Shapes element with a grid of tiles over an image (`omx.pp.tile_grid`), e.g. ``"C4_he_square_16um"``."""
        return f"{image_key}_{kind}_{size_um:g}um".replace("+", "")


#: The slots of a table the writer writes, as ``"slot/name"`` in an entry's ``"written"`` list.
SLOTS = ("layers", "obsm", "obs", "varm")


def entries(table: AnnData) -> dict[str, Any]:
    """``table.uns["omx"]``: the results omx wrote into this table (empty when none)."""
    return table.uns.get(Key.UNS, {})


def get_entry(table: AnnData, key: str, *, where: str = "the table") -> dict[str, Any]:
    """The result ``key`` of a table; a clear `KeyError` naming the results there otherwise."""
    found = entries(table)
    if key not in found:
        raise KeyError(
            f"{where} holds no omx result {key!r} (results: {sorted(found) or 'none'}). Pass the `key_added` of "
            "the omx call that wrote it as `key=`."
        )
    return found[key]


def owned(table: AnnData) -> set[str]:
    """``"slot/name"`` of every key an omx result recorded writing into this table."""
    return {w for entry in entries(table).values() if isinstance(entry, Mapping) for w in entry.get("written", ())}


def _exists(table: AnnData, slot: str, name: str) -> bool:
    if slot == "obs":
        return name in table.obs.columns
    return name in getattr(table, slot)


def check_free(
    table: AnnData,
    *,
    key: str,
    overwrite: bool,
    where: str,
    **slots: Sequence[str],
) -> None:
    """Raise a `KeyError` naming every existing key a result would write, unless ``overwrite``.

    Parameters
    ----------
    table
        The table written into.
    key
        The result's entry in ``uns["omx"]``.
    overwrite
        Whether the caller asked to replace existing keys.
    where
        How to name the table in the message, e.g. ``"sdata.tables['table']"``.
    **slots
        Names per slot (``layers=[...]``, ``obsm=[...]``, ``obs=[...]``, ``varm=[...]``).
    """
    if overwrite:
        return
    taken = [f"uns[{Key.UNS!r}][{key!r}]"] if key in entries(table) else []
    for slot, names in slots.items():
        if slot not in SLOTS:
            raise ValueError(f"Unknown slot {slot!r}; use one of {SLOTS}.")
        taken += [f"{slot}[{name!r}]" for name in names if _exists(table, slot, name)]
    if taken:
        raise KeyError(
            f"{where} already holds {', '.join(taken)}, which this call would replace. Pass another `key_added=` "
            "or `overwrite=True` to replace them."
        )


def padded_rows(n_obs: int, rows: np.ndarray, values: np.ndarray, *, fill: Any = np.nan) -> np.ndarray:
    """An array of ``n_obs`` rows holding ``values`` at ``rows`` and ``fill`` elsewhere (dtype of ``values``)."""
    values = np.asarray(values)
    dtype = values.dtype if values.dtype != bool else object
    if np.issubdtype(dtype, np.integer) and isinstance(fill, float) and np.isnan(fill):
        dtype = np.float64
    out = np.full((n_obs, *values.shape[1:]), fill, dtype=dtype)
    out[rows] = values
    return out


def gene_layer(table: AnnData, rows: np.ndarray, genes: Sequence[str], values: np.ndarray) -> np.ndarray:
    """A float32 layer of the table's shape with ``values`` at ``rows`` x ``genes`` and NaN elsewhere."""
    cols = table.var_names.get_indexer(list(genes))
    if (cols < 0).any():
        missing = [g for g, c in zip(genes, cols, strict=True) if c < 0][:10]
        raise KeyError(f"Genes {missing} are not in the table's var_names; predictions must be of the table's genes.")
    layer = np.full(table.shape, np.nan, dtype=np.float32)
    layer[np.ix_(np.asarray(rows), cols)] = values
    return layer


def write_results(
    table: AnnData,
    *,
    key: str,
    entry: dict[str, Any],
    overwrite: bool,
    where: str,
    layers: Mapping[str, np.ndarray] | None = None,
    obsm: Mapping[str, Any] | None = None,
    obs: Mapping[str, Any] | None = None,
    varm: Mapping[str, Any] | None = None,
    n_rows: int | None = None,
) -> None:
    """Check every key a result touches, then write them all and its ``uns["omx"][key]`` entry, and log it.

    Values are whole slots (a layer of the table's shape, an ``obsm`` array or DataFrame of ``n_obs`` rows, an
    ``obs`` column, a ``varm`` array); nothing is written when any key is taken and ``overwrite`` is false.
    The entry records the keys written (``entry["written"]``), which makes them omx's in later checks.

    Parameters
    ----------
    table
        The table written into.
    key
        The result's name (the call's ``key_added``): its entry in ``uns["omx"]``.
    entry
        The result's description (see the module docstring); ``"written"`` is filled here.
    overwrite
        Replace existing keys.
    where
        How to name the table in messages, e.g. ``"sdata.tables['table']"``.
    layers, obsm, obs, varm
        What to write, by slot.
    n_rows
        Rows the result covers, for the log message (all rows when omitted).
    """
    slots = {"layers": layers or {}, "obsm": obsm or {}, "obs": obs or {}, "varm": varm or {}}
    check_free(table, key=key, overwrite=overwrite, where=where, **{s: list(v) for s, v in slots.items()})
    for name, value in slots["layers"].items():
        if tuple(np.shape(value)) != table.shape:
            raise ValueError(f"Layer {name!r} has shape {np.shape(value)}, the table {table.shape}.")
    for slot in ("obsm", "obs"):
        for name, value in slots[slot].items():
            if len(value) != table.n_obs:
                raise ValueError(f"{slot}[{name!r}] has {len(value)} rows, the table {table.n_obs}.")
    entry = {**entry, "written": [f"{slot}/{name}" for slot, values in slots.items() for name in values]}
    for name, value in slots["layers"].items():
        table.layers[name] = value
    for name, value in slots["obsm"].items():
        table.obsm[name] = value
    for name, value in slots["obs"].items():
        table.obs[name] = value
    for name, value in slots["varm"].items():
        table.varm[name] = value
    table.uns.setdefault(Key.UNS, {})[key] = entry
    written = ", ".join(f"{slot}[{name!r}]" for slot, values in slots.items() for name in values)
    rows = table.n_obs if n_rows is None else n_rows
    logger.info(
        "Added %s for %d rows to %s (described in uns[%r][%r])", written or "nothing", rows, where, Key.UNS, key
    )


def check_column_free(table: AnnData, column: str, *, key: str, overwrite: bool, where: str) -> None:
    """Raise the `KeyError` that `fill_column` would: the column is the user's, or ``uns["omx"][key]`` exists."""
    if column in table.obs.columns and f"obs/{column}" not in owned(table) and not overwrite:
        raise KeyError(
            f"{where}.obs[{column!r}] exists and was not written by omx. Rename it, or pass `overwrite=True` to "
            "replace it."
        )
    if key in entries(table) and not overwrite:
        raise KeyError(f"{where}.uns[{Key.UNS!r}][{key!r}] exists; pass another `key_added=` or `overwrite=True`.")


def fill_column(
    table: AnnData,
    column: str,
    rows: np.ndarray,
    values: np.ndarray,
    *,
    key: str,
    entry: dict,
    overwrite: bool,
    where: str,
) -> None:
    """Write ``values`` into ``rows`` of an ``obs`` column that several omx calls share (e.g. `Key.N_NUCLEI`).

    A missing column is created (NaN elsewhere); one that an omx result wrote keeps its other rows; a column
    that omx did not write (the user's) is refused unless ``overwrite``. ``entry`` is recorded as
    ``uns["omx"][key]`` and owns the column from then on.
    """
    check_column_free(table, column, key=key, overwrite=overwrite, where=where)
    slot = f"obs/{column}"
    exists = column in table.obs.columns
    col = (
        pd.to_numeric(table.obs[column], errors="coerce").to_numpy(dtype=float)
        if exists and slot in owned(table)
        else np.full(table.n_obs, np.nan)
    )
    col[rows] = values
    table.obs[column] = col
    table.uns.setdefault(Key.UNS, {})[key] = {**entry, "written": [slot]}
    logger.info("Added %s for %d rows to %s.obs[%r]", column, len(rows), where, column)


def check_free_elements(sdata: SpatialData, *, overwrite: bool, **elements: Sequence[str]) -> None:
    """Raise a `KeyError` naming every existing element (``images=``, ``labels=``, ``shapes=``, ``tables=``)."""
    if overwrite:
        return
    taken = [
        f"sdata.{kind}[{name!r}]" for kind, names in elements.items() for name in names if name in getattr(sdata, kind)
    ]
    if taken:
        raise KeyError(
            f"The SpatialData object already holds {', '.join(taken)}. Pass another `key_added=` or "
            "`overwrite=True` to replace them."
        )


def add_table(sdata: SpatialData, key: str, table: AnnData, *, overwrite: bool, what: str = "a new table") -> None:
    """Add ``table`` as ``sdata.tables[key]``, refusing to replace an existing table unless ``overwrite``."""
    check_free_elements(sdata, overwrite=overwrite, tables=[key])
    if key in sdata.tables:  # spatialdata refuses to replace a table in place when it is backed on disk
        del sdata.tables[key]
    sdata.tables[key] = table
    regions = table.uns.get("spatialdata_attrs", {}).get("region")
    logger.info("Added %d rows x %d columns to sdata.tables[%r] (%s annotating %s)", *table.shape, key, what, regions)


def model_entry(model: Any) -> dict[str, Any]:
    """``{"class": ..., "params": ...}`` of a model, for an entry's ``"model"``."""
    return {"class": type(model).__name__, "params": dict(model.init_params_)}


def base_entry(function: str, params: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The common fields of an entry: the function, omx's version and the call's parameters (JSON-like)."""
    from omx import __version__

    return {"function": function, "version": __version__, "params": jsonable(params), **extra}


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, numpy scalars as Python ones and other objects as their ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


# ---------------------------------------------------------------------------------------------- per-gene scores
def scores_columns(per_section: Mapping[str, pd.DataFrame], **extra: Mapping[str, Any]) -> dict[str, list]:
    """Per-gene scores of several sections in the one stored layout: a dict of equal-length lists.

    Parameters
    ----------
    per_section
        ``{section: omx.metrics.gene_scores(...)}`` (one row per gene, index ``"gene"``).
    **extra
        Further columns constant within a section, ``{column: {section: value}}`` (e.g. ``fold=``).
    """
    frames = []
    for section, scores in per_section.items():
        frame = scores.reset_index() if "gene" not in scores.columns else scores.copy()
        frame.insert(0, "section", str(section))
        for column, by_section in extra.items():
            frame.insert(1, column, by_section[section])
        frames.append(frame)
    if not frames:
        return {}
    return jsonable(pd.concat(frames, ignore_index=True).to_dict(orient="list"))


def scores_frame(entry: Mapping[str, Any], *, key: str = "") -> pd.DataFrame:
    """Per-gene scores of a result as a long DataFrame: one row per (section, gene), a column per metric."""
    stored = entry.get("scores")
    if not stored:
        raise KeyError(
            f"The omx result {key!r} holds no per-gene scores: the predicted sections had no measured expression "
            "to score them against."
        )
    frame = pd.DataFrame({k: np.asarray(v) for k, v in stored.items()})
    frame["section"] = frame["section"].astype(str)
    # a stored dict keeps no order through zarr: columns in a fixed order
    first = [c for c in ("section", "fold", "gene", "pearson", "spearman", "mse", "ccc") if c in frame]
    return frame[first + sorted(c for c in frame.columns if c not in first)]
