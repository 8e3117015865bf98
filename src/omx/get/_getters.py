"""Read omx's results back: predictions as AnnData, per-gene scores and proportions as tidy DataFrames."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key, entries, get_entry, scores_frame
from omx._utils import as_list, log_normalize, resolve_table
from omx.pp._spots import section_column


def _sections_mask(table: AnnData, section: str | Sequence[str] | None, section_key: str) -> np.ndarray:
    if section is None:
        return np.ones(table.n_obs, dtype=bool)
    section_key = section_column(table, section_key)
    wanted = as_list(section)
    labels = table.obs[section_key].astype(str)
    unknown = sorted(set(wanted) - set(labels))
    if unknown:
        raise KeyError(f"Sections {unknown} are not values of obs[{section_key!r}] ({sorted(set(labels))}).")
    return labels.isin(wanted).to_numpy()


def _sources(data: SpatialData | AnnData, key: str, table_key: str | None, slot: str) -> list[tuple[str, AnnData]]:
    """The tables holding result ``key``: the measured table (in ``slot``) and/or omx's own table ``key``."""
    if isinstance(data, AnnData):
        if key in entries(data):
            return [("the table", data)]
        raise KeyError(f"The table holds no omx result {key!r} (results: {sorted(entries(data)) or 'none'}).")
    if not isinstance(data, SpatialData):
        raise TypeError(f"Pass a SpatialData object or an AnnData table, got {type(data).__name__}.")
    found = []
    try:
        name, table = resolve_table(data, table_key)
    except KeyError:
        name, table = None, None
    if table is not None and key in entries(table) and (slot == "uns" or key in getattr(table, slot)):
        found.append((f"sdata.tables[{name!r}]", table))
    own = data.tables.get(key)
    if own is not None and key in entries(own) and (table is None or own is not table):
        found.append((f"sdata.tables[{key!r}]", own))
    if not found:
        where = {name: sorted(entries(t)) for name, t in data.tables.items() if entries(t)}
        raise KeyError(
            f"No omx result {key!r} in this SpatialData object (omx results per table: {where or 'none'}). Pass "
            "the `key_added` of the omx call that wrote it as `key=` (and `table_key=` if there are several tables)."
        )
    return found


@doc_params()
def predictions(
    data: SpatialData | AnnData,
    key: str = Key.PRED,
    *,
    table_key: str | None = None,
    section: str | Sequence[str] | None = None,
    section_key: str = Key.SECTION,
    observed: bool = True,
) -> AnnData:
    """Predicted expression as an AnnData of the predicted spots and genes only, ready for scanpy.

    Parameters
    ----------
    {data_results}
    key
        The ``key_added`` of :func:`omx.tl.fit_predict`, :func:`omx.tl.predict_expression` or
        :func:`omx.tl.cross_validate`.
    {table_key_results}
    {section_results}
    {section_key}
    observed
        Add the measured expression of the same spots and genes as ``layers["observed"]`` (on the same scale),
        where the spots are measured.

    Returns
    -------
    AnnData of spots x genes with

    - ``X``: predictions on the scale log1p(counts / total x 1e4), float32, never negative, no NaN;
    - ``obs``: the spots' rows of the table they come from (section, patient, ...), and ``"omx_source"``, the
      table each comes from;
    - ``var``: per-gene scores (``pearson``, ``spearman``, ``mse``, ``ccc``, ...) averaged over the scored
      sections (or of ``section``), where the predicted sections were measured; ``n_sections_scored``;
    - ``obsm["spatial"]``: spot centres in microns;
    - ``layers["variance"]``: the predictive variance, for models that give one;
    - ``layers["observed"]``: measured expression, with ``observed=True`` and measured spots (NaN elsewhere);
    - ``uns["omx"][key]``: the result's description (model, parameters, genes).

    Examples
    --------
    >>> adata = omx.get.predictions(sdata, "omx_pred")  # doctest: +SKIP
    >>> sc.pp.pca(adata); sc.pp.neighbors(adata); sc.tl.leiden(adata)  # doctest: +SKIP
    """
    parts = []
    for where, table in _sources(data, key, table_key, "layers"):
        entry = entries(table)[key]
        genes = [str(g) for g in entry.get("genes", [])]  # a list, or an array after a zarr round trip
        own_table = table.uns.get(Key.TABLE_MARK) == "predictions" and key not in table.layers
        cols = table.var_names.get_indexer(genes) if genes else np.arange(table.n_vars)
        if (cols < 0).any():
            raise KeyError(f"{where} lacks genes of result {key!r}; was the table changed after prediction?")
        values = table.X if own_table else table.layers[key]
        values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=np.float32)[:, cols]
        keep = np.isfinite(values).all(axis=1) & _sections_mask(table, section, section_key)
        if not keep.any():
            continue
        rows = np.flatnonzero(keep)
        adata = AnnData(X=values[rows], obs=table.obs.iloc[rows].copy(), var=pd.DataFrame(index=table.var_names[cols]))
        adata.obs["omx_source"] = where
        if Key.SPATIAL in table.obsm:
            adata.obsm[Key.SPATIAL] = np.asarray(table.obsm[Key.SPATIAL], dtype=np.float64)[rows, :2]
        var_key = Key.variance(key)
        if var_key in table.layers:
            var = np.asarray(table.layers[var_key], dtype=np.float32)[np.ix_(rows, cols)]
            adata.layers["variance"] = var
        if observed and not own_table:
            layer = (entry.get("params") or {}).get("layer")
            counts = table.layers[layer] if layer else table.X
            if counts is not None:
                adata.layers["observed"] = log_normalize(counts[rows], columns=cols)
        parts.append(adata)
        description = entry
    if not parts:
        raise ValueError(f"Result {key!r} holds no predictions for section(s) {section!r}.")
    out = parts[0] if len(parts) == 1 else _concat(parts)
    out.X = np.maximum(out.X, 0)
    _add_scores(out, description, key, section)
    out.uns[Key.UNS] = {key: description}
    return out


def _concat(parts: list[AnnData]) -> AnnData:
    import anndata as ad

    for part in parts:
        if "observed" in part.layers:
            continue
        part.layers["observed"] = np.full(part.shape, np.nan, dtype=np.float32)
    out = ad.concat(parts, join="inner", merge="same")
    return out


def _add_scores(adata: AnnData, entry: dict, key: str, section) -> None:
    if not entry.get("scores"):
        return
    frame = scores_frame(entry, key=key)
    if section is not None:
        frame = frame[frame["section"].isin(as_list(section))]
        if frame.empty:
            return
    numeric = frame.drop(columns=[c for c in ("section", "fold") if c in frame]).groupby("gene", sort=False)
    per_gene = numeric.mean(numeric_only=True)
    per_gene["n_sections_scored"] = frame.groupby("gene", sort=False)["section"].nunique()
    per_gene = per_gene.reindex(adata.var_names)
    for column in per_gene.columns:
        adata.var[column] = per_gene[column].to_numpy()


@doc_params()
def scores(
    data: SpatialData | AnnData,
    key: str = Key.PRED,
    *,
    table_key: str | None = None,
    section: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-gene scores of a result as a tidy DataFrame: one row per scored section and gene.

    Parameters
    ----------
    {data_results}
    key
        The ``key_added`` of :func:`omx.tl.fit_predict` or :func:`omx.tl.cross_validate`.
    {table_key_results}
    {section_results}

    Returns
    -------
    Columns ``section`` (the scored section), ``fold`` (for cross-validation), ``gene`` and one column per metric
    (``pearson``, ``spearman``, ``mse``, ``ccc``, ``mean_true``, ...).
    """
    where, table = _sources(data, key, table_key, "uns")[0]
    frame = scores_frame(get_entry(table, key, where=where), key=key)
    if section is not None:
        wanted = as_list(section)
        unknown = sorted(set(wanted) - set(frame["section"]))
        if unknown:
            raise KeyError(f"No scores for sections {unknown}; scored sections: {sorted(set(frame['section']))}.")
        frame = frame[frame["section"].isin(wanted)].reset_index(drop=True)
    return frame


@doc_params()
def proportions(
    data: SpatialData | AnnData,
    key: str = Key.PROPORTIONS,
    *,
    table_key: str | None = None,
    section: str | Sequence[str] | None = None,
    section_key: str = Key.SECTION,
    wide: bool = False,
) -> pd.DataFrame:
    """Cell-type proportions of a result as a tidy DataFrame: one row per spot and cell type.

    Parameters
    ----------
    {data_results}
    key
        The ``key_added`` of :func:`omx.tl.deconvolve` or :func:`omx.tl.predict_proportions`.
    {table_key_results}
    {section_results}
    {section_key}
    wide
        Return one row per spot and one column per cell type instead.

    Returns
    -------
    Columns ``spot`` (obs name), ``section`` (where known), ``cell_type``, ``proportion`` and, for deconvolution,
    ``q05`` and ``q95`` (the 90 % credible interval). Spots without proportions are left out.
    """
    frames = []
    for where, table in _sources(data, key, table_key, "obsm"):
        if key not in table.obsm:
            raise KeyError(f"{where}.obsm has no {key!r}; omx result {key!r} holds no proportions.")
        props = table.obsm[key]
        if not isinstance(props, pd.DataFrame):
            props = pd.DataFrame(np.asarray(props), index=table.obs_names)
        keep = np.isfinite(props.to_numpy(dtype=float)).all(axis=1) & _sections_mask(table, section, section_key)
        props = props.loc[keep]
        props.index.name = "spot"
        props.columns = [str(c) for c in props.columns]
        section_of = table.obs[section_key].astype(str)[keep] if section_key in table.obs else None
        if wide:
            if section_of is not None:
                props.insert(0, "section", section_of.to_numpy())
            frames.append(props)
            continue
        long = props.reset_index().melt(id_vars="spot", var_name="cell_type", value_name="proportion")
        for name, bound in zip(("q05", "q95"), Key.quantiles(key), strict=True):
            if bound in table.obsm:
                q = pd.DataFrame(table.obsm[bound]).loc[keep]
                q.index.name = "spot"
                q.columns = [str(c) for c in q.columns]
                long[name] = (
                    q.reset_index().melt(id_vars="spot", var_name="cell_type", value_name=name)[name].to_numpy()
                )
        if section_of is not None:
            long.insert(1, "section", section_of.reindex(long["spot"]).to_numpy())
        frames.append(long)
    out = pd.concat(frames) if len(frames) > 1 else frames[0]
    return out if wide else out.reset_index(drop=True)
