"""Front doors for cell types: Bayesian deconvolution of spots, cell types per nucleus, proportions from H&E."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

import omx
from omx._settings import warn
from omx._utils import OMX_TABLE, as_list, logger
from omx.pp._nuclei import CELLS_KEY
from omx.pp._spots import table_regions
from omx.tl._core import (
    DEFAULT_CONTEXT,
    as_dense,
    check_key_free,
    counts,
    model_inputs,
    resolve_sections,
    resolve_table,
    split_sections,
)

#: Pseudo-proportion added before the centred log-ratio transform of proportions.
_CLR_EPS = 1e-3


def _cell_type_key(key_added: str) -> str:
    return "omx_cell_type" if key_added == "omx_proportions" else f"{key_added}_cell_type"


def _section_rows(table: AnnData, sections: Sequence[str] | None, section_key: str) -> np.ndarray:
    if sections is None:
        return np.arange(table.n_obs)
    if section_key not in table.obs:
        raise KeyError(f"The table has no obs column {section_key!r}; pass `section_key=` naming the sections.")
    labels = table.obs[section_key].astype(str)
    known = set(labels)
    missing = [s for s in sections if s not in known]
    if missing:
        raise KeyError(f"Sections {missing} are not values of table.obs[{section_key!r}] ({sorted(known)}).")
    return np.flatnonzero(labels.isin(sections).to_numpy())


def _write_frame(table: AnnData, key: str, rows: np.ndarray, values: np.ndarray, types: list[str]) -> None:
    """Write ``values`` into rows of ``table.obsm[key]``, keeping other rows of an existing frame of the same types."""
    old = table.obsm.get(key)
    if isinstance(old, pd.DataFrame) and list(old.columns) == types:
        frame = old.copy()
    else:
        frame = pd.DataFrame(np.nan, index=table.obs_names, columns=types)
    frame.iloc[rows] = values
    table.obsm[key] = frame


def deconvolve(
    sdata: SpatialData,
    reference: AnnData,
    *,
    labels_key: str | None = None,
    table_key: str | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    section_key: str = "section",
    sections: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_cells_key: str | None = "omx_n_nuclei",
    min_cells_per_type: int = 10,
    min_shared_genes: int = 50,
    alpha: float = 1.0,
    platform_sd: float = 0.5,
    n_steps: int = 3000,
    seed: int = 0,
    device: str = "auto",
    key_added: str = "omx_proportions",
    overwrite: bool = False,
    show_progress_bar: bool = True,
):
    """Cell-type proportions of every spot from its counts and a single-cell reference, with a Bayesian model.

    Counts are negative binomial around the library-scaled mixture of cell-type signatures, with a per-gene
    platform effect between reference and spots, a Dirichlet prior on the proportions, and the number of
    nuclei in each spot (:func:`omx.pp.segment_nuclei`) as the prior on its number of cells; the model is fitted
    by stochastic variational inference in Pyro (:class:`omx.models._deconv.DeconvolutionModel`).

    Parameters
    ----------
    sdata
        SpatialData with a table of raw spot counts.
    reference
        Single cells (raw counts, cell types in ``obs[labels_key]``), or signatures: one row per cell type
        (``obs_names`` are the types; mean counts per cell) with ``labels_key=None``.
    labels_key
        The reference's obs column with cell types; None when the reference holds signatures.
    table_key
        The table of spot counts; may be omitted when there is one.
    layer
        Layer of the spots' raw counts; ``X`` when omitted.
    reference_layer
        Layer of the reference's raw counts; ``X`` when omitted.
    section_key
        The obs column naming each spot's section.
    sections
        Sections to deconvolve (values of ``obs[section_key]``); all spots when omitted.
    genes
        Genes to use; all genes shared by spots and reference when omitted.
    n_cells_key
        The obs column with nuclei per spot; used as the prior on cells per spot when present for every spot.
    min_cells_per_type
        Cell types with fewer reference cells are an error.
    min_shared_genes
        Fewer genes shared by reference and spots are an error.
    alpha
        Concentration of the Dirichlet prior (below 1: few types per spot).
    platform_sd
        Prior standard deviation of the per-gene log platform effect (smaller when reference and spots come from
        the same technology).
    n_steps
        Maximum SVI steps (it stops earlier when the loss stops improving).
    seed
        Random seed.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    key_added
        Name of the ``obsm`` entry (and of the ``uns['omx']`` entry).
    overwrite
        Replace existing results under ``key_added`` (rows of other sections are kept).
    show_progress_bar
        Show a progress bar over SVI steps.

    Returns
    -------
    The fitted :class:`~omx.models._deconv.DeconvolutionModel`. Writes to the table:

    - ``obsm[key_added]``: posterior mean proportions (DataFrame, one column per cell type; NaN for other spots
      and for spots with no counts in the shared genes);
    - ``obsm[key_added + "_q05"]``, ``obsm[key_added + "_q95"]``: 90 % credible intervals;
    - ``obs["omx_cell_type"]`` (``key_added + "_cell_type"`` for another ``key_added``): the most abundant type;
    - ``obs[key_added + "_n_cells"]``: posterior mean cells per spot;
    - ``varm[key_added + "_signatures"]``: the signatures used (genes x types; 0 for genes not used), which
      :func:`omx.tl.assign_cells` uses to impute expression per cell;
    - ``uns['omx'][key_added]``: parameters, cell types, genes, sections, steps and final loss.
    """
    from omx.models._deconv import DeconvolutionModel, signatures_from_reference

    table_key, table = resolve_table(sdata, table_key)
    sections = as_list(sections)
    check_key_free(table, key_added, overwrite=overwrite, where="obsm")
    rows = _section_rows(table, sections, section_key)
    S, types = signatures_from_reference(
        reference, labels_key, min_cells_per_type=min_cells_per_type, layer=reference_layer
    )
    shared = table.var_names.intersection(reference.var_names, sort=False)
    if genes is not None:
        genes = list(genes)
        missing = [g for g in genes if g not in shared]
        if missing:
            raise KeyError(
                f"{len(missing)} requested genes are not in both the spots and the reference: {missing[:10]}."
            )
        shared = pd.Index(genes)
    S_shared = S[:, reference.var_names.get_indexer(shared)]
    used = S_shared.sum(0) > 0
    shared, S_shared = shared[used], S_shared[:, used]
    if len(shared) < min_shared_genes:
        raise ValueError(
            f"The reference and the spots share {len(shared)} genes expressed in the reference "
            f"({table.n_vars} in the spots, {reference.n_vars} in the reference); at least "
            f"min_shared_genes={min_shared_genes} are needed. Check that both use the same gene symbols (or IDs)."
        )
    Y = np.asarray(as_dense(counts(table, rows, layer=layer)[:, table.var_names.get_indexer(shared)]), dtype=np.float64)
    lib = Y.sum(1)
    ok = lib > 0
    if (~ok).any():
        logger.info("Left out %d spots with no counts in the %d shared genes.", int((~ok).sum()), len(shared))
    if ok.sum() < 2:
        raise ValueError("Fewer than 2 spots have counts in the shared genes.")
    n_cells = None
    if n_cells_key is not None and n_cells_key in table.obs:
        nc = pd.to_numeric(table.obs[n_cells_key], errors="coerce").to_numpy(dtype=float)[rows][ok]
        if np.all(np.isfinite(nc)):
            n_cells = nc
        else:
            warn(
                f"obs[{n_cells_key!r}] is missing for some spots; cells per spot get a vague prior "
                "(segment the nuclei of every image, or pass n_cells_key=None)."
            )
    model = DeconvolutionModel(
        alpha=alpha,
        platform_sd=platform_sd,
        n_steps=n_steps,
        seed=seed,
        device=device,
        show_progress_bar=show_progress_bar,
    )
    model.fit(Y[ok], S_shared, n_cells=n_cells)

    fit_rows = rows[ok]
    _write_frame(table, key_added, fit_rows, model.proportions_, types)
    _write_frame(table, f"{key_added}_q05", fit_rows, model.q05_, types)
    _write_frame(table, f"{key_added}_q95", fit_rows, model.q95_, types)
    ct_key = _cell_type_key(key_added)
    top = np.asarray(types, dtype=object)[model.proportions_.argmax(1)]
    old = table.obs[ct_key].astype(object).to_numpy() if ct_key in table.obs else np.full(table.n_obs, np.nan, object)
    old[fit_rows] = top
    table.obs[ct_key] = pd.Categorical(old, categories=types)
    n_key = f"{key_added}_n_cells"
    col = table.obs[n_key].to_numpy(dtype=float) if n_key in table.obs else np.full(table.n_obs, np.nan)
    col[fit_rows] = model.n_cells_
    table.obs[n_key] = col
    sig = np.zeros((table.n_vars, len(types)), dtype=np.float32)
    sig[table.var_names.get_indexer(shared)] = S_shared.T
    table.varm[f"{key_added}_signatures"] = pd.DataFrame(sig, index=table.var_names, columns=types)
    table.uns.setdefault("omx", {})[key_added] = {
        "model": "DeconvolutionModel",
        "params": dict(model.init_params_),
        "version": omx.__version__,
        "seed": seed,
        "cell_types": types,
        "genes": [str(g) for g in shared],
        "sections": sections if sections is not None else "all",
        "labels_key": labels_key,
        "n_cells_prior": n_cells is not None,
        "n_steps_run": model.n_steps_,
        "final_loss": float(np.mean(model.history_["loss"][-50:])),
    }
    logger.info(
        "Added proportions of %d cell types for %d spots (%d shared genes) to sdata.tables[%r].obsm[%r] "
        "(and %r, %r), obs[%r]",
        len(types), len(fit_rows), len(shared), table_key, key_added, f"{key_added}_q05", f"{key_added}_q95", ct_key,
    )  # fmt: skip
    return model


def _largest_remainder(p: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``n * p``."""
    raw = p / p.sum() * n
    out = np.floor(raw).astype(int)
    rest = n - out.sum()
    if rest > 0:
        out[np.argsort(-(raw - out), kind="stable")[:rest]] += 1
    return out


def signatures_from_proportions(
    sdata: SpatialData,
    *,
    key: str = "stereoscope_major",
    sections: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    table_key: str | None = None,
    section_key: str = "section",
) -> AnnData:
    """Cell-type signatures estimated from spots with known proportions, for use as a `deconvolve` reference.

    Each spot's counts, scaled to the median library size, are modelled as its proportions times the
    signatures; each gene's signature is the non-negative least-squares fit over the given (training) sections.

    Parameters
    ----------
    sdata
        SpatialData with a table of raw counts and proportions in ``table.obsm[key]``.
    key
        ``obsm`` entry with the proportions (a DataFrame, one column per cell type).
    sections
        Sections (values of ``obs[section_key]``) to estimate from; all when omitted. Leave out the sections
        you will deconvolve.
    genes
        Genes to keep; all genes of the table when omitted.
    table_key
        The table; may be omitted when there is one (besides tables omx made).
    section_key
        The obs column naming each spot's section.

    Returns
    -------
    An AnnData of cell types x genes (mean counts per spot at the median library size), to pass as
    ``reference`` with ``labels_key=None``.
    """
    from scipy.optimize import nnls

    table_key, table = resolve_table(sdata, table_key)
    if key not in table.obsm:
        raise KeyError(f"table.obsm has no {key!r} (entries: {list(table.obsm.keys())}).")
    rows = _section_rows(table, as_list(sections), section_key)
    P = np.asarray(table.obsm[key], dtype=np.float64)[rows]
    ok = np.isfinite(P).all(axis=1)
    X = counts(table, rows[ok])
    lib = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    keep = lib > 0
    genes = list(table.var_names) if genes is None else list(genes)
    cols = table.var_names.get_indexer(genes)
    if (cols < 0).any():
        raise KeyError(f"{int((cols < 0).sum())} genes are not in the table, e.g. {np.asarray(genes)[cols < 0][:5]}.")
    Xn = as_dense(X[keep][:, cols]) / lib[keep, None] * np.median(lib[keep])
    P = P[ok][keep]
    S = np.stack([nnls(P, Xn[:, g])[0] for g in range(len(genes))], axis=1)
    types = [str(c) for c in getattr(table.obsm[key], "columns", range(P.shape[1]))]
    return AnnData(X=S.astype(np.float32), obs=pd.DataFrame(index=types), var=pd.DataFrame(index=genes))


def assign_cells(
    sdata: SpatialData,
    *,
    cells_key: str = CELLS_KEY,
    table_key: str | None = None,
    proportions_key: str = "omx_proportions",
    features: Sequence[str] = ("area_um2", "eccentricity", "solidity", "hematoxylin", "eosin"),
    genes: Sequence[str] | None = None,
    key_added: str = "cell_type",
    overwrite: bool = False,
) -> None:
    """A cell type and imputed expression for every nucleus, consistent with its spot's proportions.

    In each spot, its nuclei are split among cell types in proportion to the spot's composition (rounded to
    whole cells); which nucleus gets which type is decided by morphology: each type's mean nuclear morphology
    is learned by regressing the spots' mean nucleus features on their proportions (least squares over all
    spots), and nuclei are matched to the types' slots by minimal total distance (Hungarian algorithm).
    Nuclei outside every spot take the type that is most likely under the nearest spot's proportions and
    their morphology. Expression per cell distributes each spot's counts over its cells in proportion to
    their types' signatures; cells outside spots get their type's signature at the median counts per cell.

    Parameters
    ----------
    sdata
        SpatialData after :func:`omx.pp.segment_nuclei` and :func:`omx.tl.deconvolve`.
    cells_key
        The table of nuclei.
    table_key
        The table of spots holding the proportions; may be omitted when there is one besides ``cells_key``.
    proportions_key
        The ``obsm`` entry with the proportions (and ``varm[proportions_key + "_signatures"]``).
    features
        obs columns of the nuclei used as morphology.
    genes
        Genes to impute; the genes of the deconvolution when omitted.
    key_added
        obs column of the nuclei table that receives the cell type.
    overwrite
        Replace an existing ``key_added`` (and the table's ``X``).

    Returns
    -------
    None. Replaces ``sdata.tables[cells_key]`` by a table with the same obs (and shapes it annotates) plus:

    - ``X``: imputed counts per cell (float32, cells x genes);
    - ``obs[key_added]``: the cell type (categorical); ``obs[key_added + "_source"]``: ``"spot"`` (the nucleus
      lies in a spot) or ``"nearest_spot"``; ``obs[key_added + "_score"]``: the morphology distance to its type;
    - ``uns['omx'][key_added]``: the per-type morphology means and parameters.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree
    from spatialdata.models import TableModel

    if cells_key not in sdata.tables:
        raise KeyError(f"There is no table {cells_key!r}; run omx.pp.segment_nuclei first.")
    cells = sdata.tables[cells_key]
    if key_added in cells.obs and not overwrite:
        raise KeyError(f"sdata.tables[{cells_key!r}].obs already has {key_added!r}; pass `overwrite=True`.")
    table_key, table = resolve_table(sdata, table_key)
    if proportions_key not in table.obsm:
        raise KeyError(
            f"sdata.tables[{table_key!r}].obsm has no {proportions_key!r}; run omx.tl.deconvolve first "
            f"(obsm: {list(table.obsm.keys())})."
        )
    P_all = table.obsm[proportions_key]
    types = list(P_all.columns)
    sig_key = f"{proportions_key}_signatures"
    missing = [f for f in features if f not in cells.obs]
    if missing:
        raise KeyError(f"The nuclei table has no obs columns {missing}.")
    if "spot_id" not in cells.obs or "spots_key" not in cells.obs:
        raise KeyError(
            "The nuclei table has no `spot_id` / `spots_key`; it was not made by omx.pp.segment_nuclei with spots."
        )

    # nucleus -> spot row of the table (or -1)
    _, region_key, instance_key = table_regions(table)
    lookup = pd.Series(
        np.arange(table.n_obs),
        index=table.obs[region_key].astype(str) + "\x00" + table.obs[instance_key].astype(str),
    )
    lookup = lookup[~lookup.index.duplicated()]
    keys = cells.obs["spots_key"].astype(str) + "\x00" + cells.obs["spot_id"].astype(str)
    spot_row = lookup.reindex(keys.to_numpy()).fillna(-1).to_numpy(dtype=np.int64)
    P = P_all.to_numpy(dtype=float)
    has_p = np.all(np.isfinite(P), axis=1)
    spot_row[(spot_row >= 0) & ~has_p[np.maximum(spot_row, 0)]] = -1
    if not (spot_row >= 0).any():
        raise ValueError(f"No nucleus lies in a spot with proportions in obsm[{proportions_key!r}].")

    F = cells.obs[list(features)].to_numpy(dtype=float)
    mu, sd = np.nanmean(F, 0), np.nanstd(F, 0)
    Z = np.nan_to_num((F - mu) / np.where(sd > 0, sd, 1.0))
    # per-type morphology: spot means of nucleus features ~ proportions @ M
    in_spot = spot_row >= 0
    uniq, inv = np.unique(spot_row[in_spot], return_inverse=True)
    sums = np.zeros((len(uniq), Z.shape[1]))
    np.add.at(sums, inv, Z[in_spot])
    means = sums / np.bincount(inv)[:, None]
    M, *_ = np.linalg.lstsq(P[uniq], means, rcond=None)  # (types, features)
    resid_var = np.maximum(np.var(Z[in_spot] - (P[spot_row[in_spot]] @ M), axis=0), 1e-3)

    cell_type = np.full(cells.n_obs, -1)
    score = np.full(cells.n_obs, np.nan)
    order = np.argsort(spot_row, kind="stable")
    bounds = np.searchsorted(spot_row[order], uniq)
    ends = np.r_[bounds[1:], len(order)]
    for r, b, e in zip(uniq, bounds, ends, strict=True):
        members = order[b:e]
        n_k = _largest_remainder(P[r], len(members))
        slots = np.repeat(np.arange(len(types)), n_k)
        cost = (((Z[members][:, None, :] - M[slots][None]) ** 2) / resid_var).sum(-1)
        i, j = linear_sum_assignment(cost)
        cell_type[members[i]] = slots[j]
        score[members[i]] = cost[i, j]
    out = np.flatnonzero(~in_spot)
    source = np.where(in_spot, "spot", "nearest_spot")
    if len(out):
        with_p = np.flatnonzero(has_p)
        spatial = _table_spatial(table, cells, spot_row, with_p)
        nearest = with_p[cKDTree(spatial).query(cells.obsm["spatial"][out])[1]]
        d2 = (((Z[out][:, None, :] - M[None]) ** 2) / resid_var).sum(-1)
        logp = np.log(np.clip(P[nearest], 1e-6, None)) - 0.5 * d2
        cell_type[out] = logp.argmax(1)
        score[out] = d2[np.arange(len(out)), cell_type[out]]

    # imputed expression: each spot's counts shared by its cells in proportion to their types' signatures
    if sig_key not in table.varm:
        raise KeyError(f"sdata.tables[{table_key!r}].varm has no {sig_key!r}; run omx.tl.deconvolve first.")
    sig = table.varm[sig_key]
    sig = sig.to_numpy(dtype=float) if isinstance(sig, pd.DataFrame) else np.asarray(sig, dtype=float)
    if genes is None:
        genes = table.uns.get("omx", {}).get(proportions_key, {}).get("genes") or list(table.var_names[sig.sum(1) > 0])
    gidx = table.var_names.get_indexer(list(genes))
    if (gidx < 0).any():
        raise KeyError(f"Genes not in the spots' table: {list(np.asarray(genes)[gidx < 0][:10])}.")
    S = sig[gidx].T  # (types, genes)
    Y = np.asarray(as_dense(table.X[uniq][:, gidx]), dtype=np.float64)
    X = np.zeros((cells.n_obs, len(gidx)), dtype=np.float32)
    per_cell = []
    for t, (b, e) in enumerate(zip(bounds, ends, strict=True)):
        members = order[b:e]
        w = S[cell_type[members]]  # (cells, genes)
        denom = w.sum(0)
        share = np.divide(w, denom, out=np.zeros_like(w), where=denom > 0)
        X[members] = share * Y[t]
        per_cell.append(Y[t].sum() / len(members))
    if len(out):
        scale = np.median(per_cell) / np.clip(S.sum(1), 1e-12, None)
        X[out] = S[cell_type[out]] * scale[cell_type[out]][:, None]

    obs = cells.obs.copy()
    obs[key_added] = pd.Categorical(np.asarray(types, dtype=object)[cell_type], categories=types)
    obs[f"{key_added}_source"] = pd.Categorical(source, categories=["spot", "nearest_spot"])
    obs[f"{key_added}_score"] = score
    new = AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index([str(g) for g in genes])), obsm=dict(cells.obsm))
    new.uns["omx"] = {
        **cells.uns.get("omx", {}),
        key_added: {
            "proportions_key": proportions_key,
            "table_key": table_key,
            "features": list(features),
            "morphology_means": pd.DataFrame(M, index=types, columns=list(features)).to_dict(),
            "version": omx.__version__,
        },
    }
    regions, region_key_c, instance_key_c = table_regions(cells)
    new.uns.pop("spatialdata_attrs", None)
    new.uns[OMX_TABLE] = "cells"
    new = TableModel.parse(new, region=regions, region_key=region_key_c, instance_key=instance_key_c)
    del sdata.tables[cells_key]
    sdata.tables[cells_key] = new
    counts_by_type = obs[key_added].value_counts()
    logger.info(
        "Added cell types (%s) and %d imputed genes for %d nuclei (%d in spots) to sdata.tables[%r]",
        ", ".join(f"{k}: {v}" for k, v in counts_by_type.items()),
        len(gidx),
        cells.n_obs,
        int(in_spot.sum()),
        cells_key,
    )


def _table_spatial(table: AnnData, cells: AnnData, spot_row: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Spot positions in the units of the nuclei's ``obsm['spatial']`` (microns), for table ``rows``.

    The nuclei inside spots give each spot's position in those units; spots without nuclei use the table's own
    ``obsm['spatial']`` mapped by a least-squares affine fit on the spots that have both.
    """
    if "spatial" not in table.obsm:
        raise KeyError("The spots' table has no obsm['spatial']; nuclei outside spots cannot find their nearest spot.")
    xy = np.asarray(table.obsm["spatial"], dtype=float)[:, :2]
    in_spot = spot_row >= 0
    uniq, inv = np.unique(spot_row[in_spot], return_inverse=True)
    sums = np.zeros((len(uniq), 2))
    np.add.at(sums, inv, cells.obsm["spatial"][in_spot])
    centre = sums / np.bincount(inv)[:, None]
    if len(uniq) >= 3:
        A = np.c_[xy[uniq], np.ones(len(uniq))]
        coef, *_ = np.linalg.lstsq(A, centre, rcond=None)
        return np.c_[xy[rows], np.ones(len(rows))] @ coef
    return xy[rows]


def predict_proportions(
    sdata: SpatialData,
    *,
    train: str | Sequence[str],
    predict: str | Sequence[str],
    key: str = "stereoscope_major",
    table_key: str | None = None,
    section_key: str = "section",
    image_key: str | None = None,
    mpp: float | None = None,
    size_um: float | None = None,
    context: Sequence[float] = DEFAULT_CONTEXT,
    alpha: float | None = None,
    key_added: str = "omx_proportions",
    overwrite: bool = False,
    seed: int = 0,
    show_progress_bar: bool = True,
):
    """Predict cell-type proportions from H&E alone, trained on sections with known proportions.

    A ridge model (:class:`omx.models.Ridge` on handcrafted features of the spot and its surroundings, each
    section's features standardised on their own) is fitted to the centred log-ratio of the training spots'
    proportions (``log(p + 1e-3)`` minus its mean over types); predictions are mapped back with a softmax.

    Parameters
    ----------
    sdata
        SpatialData with H&E images, spots and a table with proportions in ``obsm[key]``.
    train
        Sections to fit on (values of ``obs[section_key]``) whose spots have proportions.
    predict
        Sections to predict: values of ``obs[section_key]``, or shapes elements of H&E-only sections.
    key
        The ``obsm`` DataFrame of training proportions (e.g. from :func:`omx.tl.deconvolve`, or published ones).
    table_key
        The table; may be omitted when there is one.
    section_key
        The obs column naming each spot's section.
    image_key
        The H&E image, when it cannot be found from the spots' coordinate system.
    mpp
        Microns per pixel of the images, when their coordinate systems are not in microns.
    size_um
        Side of the patch around each spot, in microns; the spot diameter when omitted.
    context
        Patch sizes as multiples of ``size_um`` whose features are concatenated.
    alpha
        Ridge penalty; None chooses it (and the number of target components) by leave-one-section-out CV.
    key_added
        ``obsm`` entry written (and the name of the new table for H&E-only sections).
    overwrite
        Replace an existing ``key_added``.
    seed
        Random seed.
    show_progress_bar
        Show progress bars.

    Returns
    -------
    The fitted :class:`omx.models.Ridge`. Writes ``table.obsm[key_added]`` (DataFrame, one column per cell type;
    NaN for spots not predicted) and ``table.obs`` ``"omx_cell_type"`` (``key_added + "_cell_type"`` for another
    key) for predicted sections with a table, ``table.uns['omx'][key_added]``; for H&E-only sections a new table
    ``sdata.tables[key_added]`` with the proportions in ``X`` (var = cell types) and in ``obsm[key_added]``.
    """
    from omx.models import Ridge
    from omx.tl._predict import _add_prediction_table, _prediction_table

    train, predict = split_sections(train, predict)
    table_key, table = resolve_table(sdata, table_key)
    if key not in table.obsm:
        raise KeyError(f"sdata.tables[{table_key!r}].obsm has no {key!r} (entries: {list(table.obsm.keys())}).")
    check_key_free(table, key_added, overwrite=overwrite, where="obsm")
    props = table.obsm[key]
    if not isinstance(props, pd.DataFrame):
        raise TypeError(f"obsm[{key!r}] must be a DataFrame with one column per cell type.")
    types = [str(c) for c in props.columns]
    sections = resolve_sections(
        sdata, [*train, *predict], table_key=table_key, groups_key=section_key, image_key=image_key, mpp=mpp, role="a"
    )
    model = Ridge(alpha=alpha, seed=seed, show_progress_bar=show_progress_bar)
    size_um = sections[train[0]].spots.diameter_um if size_um is None else float(size_um)

    def inputs(name):
        return model_inputs(
            sections[name], model, size_um=size_um, context=context, show_progress_bar=show_progress_bar
        )

    X, Zs, groups = [], [], []
    for name in train:
        rows = sections[name].rows
        if (rows < 0).any():
            raise ValueError(f"Training section {name!r} has spots without a table row.")
        p = props.iloc[rows].to_numpy(dtype=float)
        ok = np.all(np.isfinite(p), axis=1)
        X.append(inputs(name)[ok])
        Zs.append(_clr(p[ok]))
        groups.append(np.full(int(ok.sum()), name, dtype=object))
    model.fit(np.concatenate(X), np.concatenate(Zs).astype(np.float32), groups=np.concatenate(groups))

    preds = {}
    for name in predict:
        Z = model.predict(inputs(name), groups=np.full(sections[name].spots.n_spots, name, dtype=object))
        preds[name] = _softmax(Z)
    uns = {
        "model": "Ridge",
        "params": dict(model.init_params_),
        "version": omx.__version__,
        "target": f"clr(obsm[{key!r}] + {_CLR_EPS})",
        "cell_types": types,
        "train_sections": train,
        "predict_sections": predict,
        "size_um": size_um,
        "context": list(context),
        "seed": seed,
    }
    measured = [n for n in predict if sections[n].measured]
    if measured:
        rows = np.concatenate([sections[n].rows for n in measured])
        values = np.concatenate([preds[n] for n in measured])
        if key_added in table.obsm and overwrite:
            del table.obsm[key_added]
        _write_frame(table, key_added, rows, values, types)
        ct_key = _cell_type_key(key_added)
        old = (
            table.obs[ct_key].astype(object).to_numpy() if ct_key in table.obs else np.full(table.n_obs, np.nan, object)
        )
        old[rows] = np.asarray(types, dtype=object)[values.argmax(1)]
        table.obs[ct_key] = pd.Categorical(old, categories=types)
        table.uns.setdefault("omx", {})[key_added] = uns
        logger.info(
            "Added proportions of %d cell types for %d spots to sdata.tables[%r].obsm[%r]",
            len(types),
            len(rows),
            table_key,
            key_added,
        )
    unmeasured = [n for n in predict if not sections[n].measured]
    if unmeasured:
        if key_added in sdata.tables and not overwrite:
            raise KeyError(f"sdata.tables[{key_added!r}] exists; pass another `key_added=` or `overwrite=True`.")
        new = _prediction_table(
            [sections[n] for n in unmeasured], types, [preds[n] for n in unmeasured], key_added=key_added, uns=uns
        )
        new.obsm[key_added] = pd.DataFrame(new.X, index=new.obs_names, columns=types)
        _add_prediction_table(sdata, new, key_added)
    return model


def _clr(p: np.ndarray) -> np.ndarray:
    lp = np.log(p / p.sum(1, keepdims=True) + _CLR_EPS)
    return lp - lp.mean(1, keepdims=True)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
