"""Front doors for cell types: Bayesian deconvolution of spots, cell types per nucleus, proportions from H&E."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import (
    Key,
    add_table,
    base_entry,
    check_free,
    entries,
    padded_rows,
    write_results,
)
from omx._settings import warn
from omx._utils import as_list, log_normalize, logger, progress, resolve_table
from omx.pp._spots import section_column, table_regions
from omx.tl._engine import (
    as_dense,
    counts,
)


def _proportion_keys(key_added: str, *, deconvolution: bool) -> dict[str, list[str]]:
    """The keys a result of proportions ``key_added`` writes, by slot (for the check before any work)."""
    keys = {"obsm": [key_added], "obs": [Key.cell_type(key_added)]}
    if deconvolution:
        keys["obsm"] += list(Key.quantiles(key_added))
        keys["obs"].append(Key.n_cells(key_added))
        keys["varm"] = [Key.signatures(key_added)]
    return keys


def _top_type(n_obs: int, rows: np.ndarray, proportions: np.ndarray, types: list[str]) -> pd.Categorical:
    """The most abundant type of each row (missing for rows without proportions)."""
    top = np.full(n_obs, np.nan, dtype=object)
    top[rows] = np.asarray(types, dtype=object)[np.asarray(proportions).argmax(1)]
    return pd.Categorical(top, categories=types)


def _section_rows(table: AnnData, sections: Sequence[str] | None, section_key: str) -> np.ndarray:
    if sections is None:
        return np.arange(table.n_obs)
    section_key = section_column(table, section_key)
    labels = table.obs[section_key].astype(str)
    known = set(labels)
    missing = [s for s in sections if s not in known]
    if missing:
        raise KeyError(f"Sections {missing} are not values of table.obs[{section_key!r}] ({sorted(known)}).")
    return np.flatnonzero(labels.isin(sections).to_numpy())


def _frame(table: AnnData, rows: np.ndarray, values: np.ndarray, types: list[str]) -> pd.DataFrame:
    """An ``obsm`` DataFrame of the table's rows, one column per cell type, ``values`` at ``rows`` and NaN elsewhere."""
    frame = pd.DataFrame(np.nan, index=table.obs_names, columns=types)
    frame.iloc[rows] = values
    return frame


@doc_params()
def deconvolve(
    sdata: SpatialData,
    reference: AnnData,
    *,
    labels_key: str | None = None,
    batch_key: str | None = None,
    table_key: str | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    section_key: str = "section",
    sections: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_cells_key: str | None = Key.N_NUCLEI,
    min_cells_per_type: int = 10,
    min_shared_genes: int = 50,
    alpha: float = 1.0,
    prior_strength: float | None = None,
    platform_sd: float = 0.5,
    cells_per_spot: float = 10.0,
    dispersion: str | None = None,
    max_rounds: int = 30,
    seed: int = 0,
    device: str = "auto",
    key_added: str = Key.PROPORTIONS,
    overwrite: bool = False,
    show_progress_bar: bool = True,
):
    """Cell-type proportions of every spot from its counts and a single-cell reference, with a Bayesian model.

    Counts are negative binomial around the library-scaled mixture of cell-type signatures, with a per-gene
    platform effect between reference and spots, a Dirichlet prior on the proportions, and the number of
    nuclei in each spot (:func:`omx.pp.segment_nuclei`) as the prior on its number of cells
    (:class:`omx.models._deconv.DeconvolutionModel`). The shared parameters are fitted on a random subsample of
    spots; each spot's posterior then comes from a Laplace approximation at its mode, a chunk of spots at a time,
    so a million bins fit in a few GB. A type with less than half a cell in a posterior draw counts as absent
    there, so the credible intervals of absent types start at exactly 0; on simulated spots the 90 % and 50 %
    intervals hold the truth about 90 % and 50 % of the time (``benchmarks/deconvolution.py simulate``).

    Parameters
    ----------
    sdata
        SpatialData with a table of raw spot counts.
    reference
        Single cells (raw counts, cell types in ``obs[labels_key]``; their signatures are fitted by a
        negative-binomial model of the cells, as stereoscope and cell2location do), or signatures: one row per cell
        type (``obs_names`` are the types; mean counts per cell) with ``labels_key=None``.
    labels_key
        The reference's obs column with cell types; None when the reference holds signatures.
    batch_key
        The reference's obs column with its batches (samples, donors, technologies): the signatures are then
        corrected for each batch's detection and per-gene effects. None: one batch.
    table_key
        The table of spot counts; may be omitted when there is one.
    {layer}
    reference_layer
        Layer of the reference's raw counts; ``X`` when omitted.
    {section_key}
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
    prior_strength
        With a reference from :func:`signatures_from_proportions` that carries an expression prior, each spot's
        Dirichlet prior adds this much concentration times the proportions the prior predicts from the spot's
        counts; None uses the strength chosen there by cross-validation, 0 leaves the expression prior out.
    platform_sd
        Prior standard deviation of the per-gene log platform effect (smaller when reference and spots come from
        the same technology; 0 leaves it out, e.g. for signatures from :func:`signatures_from_proportions`).
    cells_per_spot
        Typical cells per spot when nuclei are not counted (about 10 in a 55 um Visium spot, 50 in a 100 um ST
        spot, 1 in an 8 um Visium HD bin): it sets the scale of the cell counts, hence where a type falls below
        half a cell and counts as absent in the intervals. Unused with ``n_cells_key``.
    dispersion
        ``"gene"``: a negative-binomial dispersion per gene; ``"common"``: one for all genes (see
        :class:`~omx.models._deconv.DeconvolutionModel`). None: the one chosen with the reference's expression
        prior, else ``"gene"``.
    max_rounds
        Most rounds of fitting the shared parameters (it stops earlier when the fit stops improving).
    {seed}
    {device}
    key_added
        Name of the ``obsm`` entry (and of the ``uns['omx']`` entry).
    {overwrite}
    {show_progress_bar}

    Returns
    -------
    The fitted :class:`~omx.models._deconv.DeconvolutionModel`. Writes to the table:

    - ``obsm[key_added]``: proportions of cells, the posterior mode (DataFrame, one column per cell type; NaN for
      other spots and for spots with no counts in the shared genes);
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
    where = f"sdata.tables[{table_key!r}]"
    check_free(
        table, key=key_added, overwrite=overwrite, where=where, **_proportion_keys(key_added, deconvolution=True)
    )
    rows = _section_rows(table, sections, section_key)
    S, types = signatures_from_reference(
        reference, labels_key, batch_key=batch_key, min_cells_per_type=min_cells_per_type, layer=reference_layer
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
    if empty := [t for t, total in zip(types, S_shared.sum(1), strict=True) if total <= 0]:
        raise ValueError(
            f"Cell types {empty} express none of the {len(shared)} genes the reference shares with the spots; a type "
            "with no profile would still take a share of every spot. Drop them from the reference (or check its "
            "genes and `reference_layer=`)."
        )
    used = S_shared.sum(0) > 0
    shared, S_shared = shared[used], S_shared[:, used]
    if len(shared) < min_shared_genes:
        raise ValueError(
            f"The reference and the spots share {len(shared)} genes expressed in the reference "
            f"({table.n_vars} in the spots, {reference.n_vars} in the reference); at least "
            f"min_shared_genes={min_shared_genes} are needed. Check that both use the same gene symbols (or IDs)."
        )
    X = counts(table, rows, layer=layer)  # all genes: the expression prior normalises by their total
    Y = X[:, table.var_names.get_indexer(shared)]  # stays sparse when it is
    Y = Y.tocsr() if sparse.issparse(Y) else np.asarray(Y, dtype=np.float64)
    lib = np.asarray(Y.sum(1), dtype=np.float64).ravel()
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
    expected, strength = _expression_prior(table, X[ok], reference, strength=prior_strength)
    if dispersion is None:
        dispersion = reference.uns.get(PRIOR_INFO, {}).get("dispersion", "gene")
    model = DeconvolutionModel(
        alpha=alpha,
        prior_strength=strength,
        platform_sd=platform_sd,
        cells_per_spot=cells_per_spot,
        dispersion=dispersion,
        max_rounds=max_rounds,
        seed=seed,
        device=device,
        show_progress_bar=show_progress_bar,
    )
    model.fit(Y[ok], S_shared, n_cells=n_cells, prior=expected)

    fit_rows = rows[ok]
    q05, q95 = Key.quantiles(key_added)
    sig = np.zeros((table.n_vars, len(types)), dtype=np.float32)
    sig[table.var_names.get_indexer(shared)] = S_shared.T
    entry = base_entry(
        "deconvolve",
        {
            "labels_key": labels_key, "batch_key": batch_key, "sections": sections, "genes": genes,
            "table_key": table_key, "section_key": section_key, "layer": layer, "n_cells_key": n_cells_key,
            "seed": seed,
        },
        model={"class": "DeconvolutionModel", "params": dict(model.init_params_)},
        cell_types=types,
        genes=[str(g) for g in shared],
        n_cells_prior=n_cells is not None,
        expression_prior=expected is not None,
        n_rounds=model.n_steps_,
        log_posterior=model.history_["log_posterior"][-1],
    )  # fmt: skip
    write_results(
        table,
        key=key_added,
        entry=entry,
        overwrite=overwrite,
        where=where,
        obsm={
            key_added: _frame(table, fit_rows, model.proportions_, types),
            q05: _frame(table, fit_rows, model.q05_, types),
            q95: _frame(table, fit_rows, model.q95_, types),
        },
        obs={
            Key.cell_type(key_added): _top_type(table.n_obs, fit_rows, model.proportions_, types),
            Key.n_cells(key_added): padded_rows(table.n_obs, fit_rows, model.n_cells_),
        },
        varm={Key.signatures(key_added): pd.DataFrame(sig, index=table.var_names, columns=types)},
        n_rows=len(fit_rows),
    )
    return model


def _expression_prior(table: AnnData, X: Any, reference: AnnData, *, strength: float | None):
    """Prior proportions of the spots with counts ``X`` (all genes of ``table``) and the prior's strength.

    (None, 0) when the reference has no expression prior or the strength is 0.
    """
    if PRIOR_COEF not in reference.varm:
        if strength:
            raise ValueError(
                f"prior_strength={strength} needs a reference with an expression prior (varm[{PRIOR_COEF!r}]); make "
                "it with omx.tl.signatures_from_proportions(..., prior=True) or leave prior_strength=None."
            )
        return None, 0.0
    strength = float(reference.uns[PRIOR_INFO]["strength"]) if strength is None else float(strength)
    if strength == 0:
        return None, 0.0
    cols = table.var_names.get_indexer(reference.var_names)
    if (cols < 0).any():
        raise KeyError(
            f"The reference's expression prior uses {int((cols < 0).sum())} genes the spots lack (e.g. "
            f"{list(reference.var_names[cols < 0][:5])}); pass prior_strength=0 to deconvolve without it."
        )
    trained_on = reference.uns[PRIOR_INFO].get("table_genes")
    if trained_on is not None and trained_on != table.n_vars:
        warn(
            f"The expression prior was learned on a table of {trained_on} genes and these spots have {table.n_vars}: "
            "its features (counts per 10,000 of all genes) mean something else here, so its proportions can be "
            "off. Pass prior_strength=0 to leave it out, or learn it on spots of this platform."
        )
    coef, intercept = reference.varm[PRIOR_COEF], reference.obs[PRIOR_INTERCEPT].to_numpy()
    expected = np.empty((X.shape[0], reference.n_obs))
    for start in range(0, X.shape[0], _PRIOR_CHUNK):  # the dense features of a chunk of spots at a time
        block = slice(start, start + _PRIOR_CHUNK)
        expected[block] = prior_proportions(log_normalize(X[block], columns=cols), coef, intercept)
    return expected, strength


@doc_params()
def signatures_from_proportions(
    sdata: SpatialData,
    *,
    key: str = "stereoscope_major",
    sections: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int = 1000,
    group_key: str | None = None,
    prior: bool = True,
    table_key: str | None = None,
    section_key: str = "section",
    show_progress_bar: bool = True,
) -> AnnData:
    """Cell-type signatures estimated from spots with known proportions, for use as a `deconvolve` reference.

    Each spot's counts are Poisson around its library size times its proportions times the signatures (an
    identity-link Poisson regression fitted by multiplicative updates), each section weighing the same however
    deep its library; the signatures are the mean counts per spot of each type at the median library size.

    With ``genes=None`` the genes are chosen on the given sections alone: of the 5,000 most expressed genes
    detected in more than 5 % of the spots, the ``n_genes`` whose cell-type pattern carries over best from one
    group of sections to another (signatures fitted on one group predict the library-normalised counts of the
    other; mean Pearson r over all pairs of groups). Signatures learnt on some patients are used on others, so
    genes whose pattern does not transfer only add noise: on her2st, choosing genes this way raised the held-out
    patients' per-type agreement with stereoscope from 0.52 to 0.60 (``benchmarks/deconvolution.py her2st``).
    With one group, the ``n_genes`` most expressed are kept.

    With ``prior=True`` the reference also carries an **expression prior**: a ridge regression
    (:class:`omx.models.Ridge`, penalty by leave-one-section-out cross-validation) from each spot's log
    counts per 10,000 of those genes to its centred log-ratio proportions. `deconvolve` centres each spot's
    Dirichlet prior on this prediction, with a strength (and `deconvolve`'s ``dispersion``) chosen here by
    leave-one-section-out cross-validation over the training sections (mean per-type Pearson r of the deconvolved
    held-out section; signatures and ridge refitted without it). The regression learns what the signatures miss
    (``benchmarks/deconvolution.py her2st``).

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
        Genes to use; chosen as above when omitted.
    n_genes
        Genes to keep when they are chosen.
    group_key
        obs column whose values group the sections for the choice of genes (e.g. patients); ``"patient"`` when
        the table has it, else the sections themselves.
    prior
        Fit the expression prior (above); it needs two or more sections to choose its strength.
    table_key
        The table; may be omitted when there is one (besides tables omx made).
    {section_key}
    {show_progress_bar}

    Returns
    -------
    An AnnData of cell types x genes (mean counts per spot at the median library size), to pass as
    ``reference`` with ``labels_key=None``; ``var["transfer_r"]`` holds each chosen gene's score. With the
    expression prior: ``varm["omx_prior_coef"]`` (genes x types) and ``obs["omx_prior_intercept"]`` map a spot's
    ``log1p(counts / library * 1e4)`` (library: all genes of the table) to log proportions, and
    ``uns["omx_prior"]`` holds the chosen strength and dispersion and the cross-validation scores.
    """
    table_key, table = resolve_table(sdata, table_key)
    if key not in table.obsm:
        raise KeyError(f"table.obsm has no {key!r} (entries: {list(table.obsm.keys())}).")
    rows = _section_rows(table, as_list(sections), section_key)
    P = np.asarray(table.obsm[key], dtype=np.float64)[rows]
    X = counts(table, rows)
    lib = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    keep = np.isfinite(P).all(axis=1) & (lib > 0)
    rows, P, X, lib = rows[keep], P[keep], X[keep], lib[keep]
    section = table.obs[section_column(table, section_key)].astype(str).to_numpy()[rows]
    types = [str(c) for c in getattr(table.obsm[key], "columns", range(P.shape[1]))]
    score = None
    if genes is None:
        if group_key is None:
            group_key = "patient" if "patient" in table.obs else None
        groups = section if group_key is None else table.obs[group_key].astype(str).to_numpy()[rows]
        cols, score = _transferable_genes(X, P, lib, section, groups, n_genes=n_genes)
        genes = list(table.var_names[cols])
    else:
        genes = list(genes)
        cols = table.var_names.get_indexer(genes)
        if (cols < 0).any():
            raise KeyError(
                f"{int((cols < 0).sum())} genes are not in the table, e.g. {np.asarray(genes)[cols < 0][:5]}."
            )
    Yg = as_dense(X[:, cols]).astype(np.float64)
    S = _poisson_signatures(Yg, P, lib, section) * np.median(lib)
    var = pd.DataFrame(index=pd.Index(genes))
    if score is not None:
        var["transfer_r"] = score
    ref = AnnData(X=S.astype(np.float32), obs=pd.DataFrame(index=types), var=var)
    if prior:
        if len(np.unique(section)) < 2:
            logger.info("One section: no held-out section to choose the expression prior's strength; left out.")
        else:
            F = log_normalize(X, columns=cols).astype(np.float64)
            coef, intercept, info = _fit_expression_prior(Yg, F, P, lib, section, show_progress_bar=show_progress_bar)
            info["table_genes"] = int(table.n_vars)
            ref.varm[PRIOR_COEF] = coef.astype(np.float32)
            ref.obs[PRIOR_INTERCEPT] = intercept
            ref.uns[PRIOR_INFO] = info
    return ref


#: Where `signatures_from_proportions` stores the expression prior in the reference it returns.
PRIOR_COEF, PRIOR_INTERCEPT, PRIOR_INFO = "omx_prior_coef", "omx_prior_intercept", "omx_prior"
#: Prior strengths (Dirichlet concentration added per unit of predicted proportion) tried by cross-validation.
PRIOR_STRENGTHS = (0.0, 30.0, 100.0, 300.0, 1000.0)
#: Dispersions (`deconvolve`'s ``dispersion=``) tried by the same cross-validation.
PRIOR_DISPERSIONS = ("gene", "common")
#: Floor on the proportions before their centred log-ratio (the regression's targets).
_CLR_FLOOR = 1e-3
#: Spots whose dense features `deconvolve` makes at once for the expression prior.
_PRIOR_CHUNK = 50_000


def prior_proportions(features: Any, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Softmax of the expression prior's log proportions, ``(n_spots, n_types)``, from `log_normalize` features."""
    Z = np.asarray(features @ np.asarray(coef, dtype=np.float64)) + np.asarray(intercept, dtype=np.float64)
    Z = np.exp(Z - Z.max(1, keepdims=True))
    return Z / Z.sum(1, keepdims=True)


def _ridge_prior(F: np.ndarray, P: np.ndarray, section: np.ndarray, alpha: float | None):
    """Ridge from features to centred log-ratio proportions, folded into ``(coef, intercept)`` on raw features."""
    from omx.models import Ridge

    T = np.log(P + _CLR_FLOOR)
    T = T - T.mean(1, keepdims=True)
    model = Ridge(alpha=alpha, n_components=None, standardize="global", show_progress_bar=False)
    model.fit(F, T, groups=section)
    mean, scale = model.standardizer_.mean_, model.standardizer_.scale_
    coef = model.coef_ / scale[:, None]
    intercept = model.intercept_ - ((mean / scale) + model.z_mean_) @ model.coef_
    return coef, intercept, model.alpha_


def _fit_expression_prior(Y, F, P, lib, section, *, show_progress_bar: bool):
    """The expression prior, its strength and the dispersion, by leave-one-section-out CV (see the caller).

    ``Y`` are the counts of the chosen genes, ``F`` their `log_normalize` features, ``lib`` the totals over all genes.
    """
    from omx.metrics import pearson
    from omx.models._deconv import DeconvolutionModel

    coef, intercept, alpha = _ridge_prior(F, P, section, None)
    names = np.unique(section)
    scores = np.zeros((len(names), len(PRIOR_DISPERSIONS), len(PRIOR_STRENGTHS)))
    for i, name in enumerate(progress(names, show=show_progress_bar, desc="expression prior CV", unit="section")):
        held, train = section == name, section != name
        S = _poisson_signatures(Y[train], P[train], lib[train], section[train])
        fold_coef, fold_intercept, _ = _ridge_prior(F[train], P[train], section[train], alpha)
        at = np.flatnonzero(held)[Y[held].sum(1) > 0]
        expected = prior_proportions(F[at], fold_coef, fold_intercept)
        for d, dispersion in enumerate(PRIOR_DISPERSIONS):
            for j, strength in enumerate(PRIOR_STRENGTHS):
                model = DeconvolutionModel(
                    platform_sd=0.0, prior_strength=strength, dispersion=dispersion, show_progress_bar=False
                )
                model.fit(Y[at], S, prior=expected)
                scores[i, d, j] = np.nanmean(pearson(P[at], model.proportions_))
    mean = scores.mean(0)
    d, j = np.unravel_index(int(np.argmax(mean)), mean.shape)
    logger.info(
        "Expression prior: ridge alpha %g; strength %g and %s dispersion chosen by leave-one-section-out CV over %d "
        "sections (mean per-type r %s for strengths %s, per-gene / common dispersion).",
        alpha, PRIOR_STRENGTHS[j], PRIOR_DISPERSIONS[d], len(names), np.round(mean, 3).tolist(), list(PRIOR_STRENGTHS),
    )  # fmt: skip
    info = {
        "strength": PRIOR_STRENGTHS[j], "dispersion": PRIOR_DISPERSIONS[d], "ridge_alpha": float(alpha),
        "strengths": list(PRIOR_STRENGTHS), "dispersions": list(PRIOR_DISPERSIONS), "cv_r": mean.tolist(),
        "features": "log1p(counts / library * 1e4), library over all genes",
    }  # fmt: skip
    return coef, intercept, info


def _poisson_signatures(Y: np.ndarray, P: np.ndarray, lib: np.ndarray, section: np.ndarray, n_iter: int = 200):
    """Signatures per unit of library, ``(types, genes)``: Poisson ``Y ~ lib * P @ S``, sections weighted equally."""
    weight = np.empty(len(lib))
    for name in np.unique(section):
        at = section == name
        weight[at] = 1.0 / lib[at].sum()
    S = np.maximum(np.linalg.lstsq(P, Y / lib[:, None], rcond=None)[0], 0) + 1e-7
    a = (weight * lib)[:, None] * P
    den = np.maximum(a.sum(0)[:, None], 1e-300)
    for _ in range(n_iter):
        S = S * (a.T @ (Y / (lib[:, None] * (P @ S) + 1e-12))) / den
    return S


def _transferable_genes(X, P, lib, section, groups, *, n_genes: int, n_candidates: int = 5000, min_detected=0.05):
    """Positions of the ``n_genes`` genes whose type pattern transfers best between ``groups``, and their scores."""
    detected = np.asarray((X > 0).mean(axis=0)).ravel()
    mean = np.asarray(X.mean(axis=0)).ravel()
    cand = np.flatnonzero(detected > min_detected)
    cand = cand[np.argsort(-mean[cand])][:n_candidates]
    names = np.unique(groups)
    if len(names) < 2:
        logger.info("One group of sections: keeping the %d most expressed genes.", min(n_genes, len(cand)))
        return cand[:n_genes], None
    Y = as_dense(X[:, cand]).astype(np.float64)
    fitted = {g: _poisson_signatures(Y[groups == g], P[groups == g], lib[groups == g], section[groups == g],
                                     n_iter=150) for g in names}  # fmt: skip
    score = np.zeros(len(cand))
    for g in names:
        at = groups == g
        observed = Y[at] / lib[at, None]
        observed = observed - observed.mean(0)
        for h in names:
            if h == g:
                continue
            fit = P[at] @ fitted[h]
            fit = fit - fit.mean(0)
            denom = np.sqrt((observed**2).sum(0) * (fit**2).sum(0))
            score += np.divide((observed * fit).sum(0), denom, out=np.zeros(len(cand)), where=denom > 0)
    score /= len(names) * (len(names) - 1)
    order = np.argsort(-score)[:n_genes]
    logger.info(
        "Chose %d of %d genes whose cell-type pattern transfers best between %d groups (mean r %.2f).",
        len(order), len(cand), len(names), score[order].mean(),
    )  # fmt: skip
    return cand[order], score[order]


@doc_params()
def assign_cells(
    sdata: SpatialData,
    *,
    cells_key: str = Key.CELLS,
    table_key: str | None = None,
    proportions_key: str = Key.PROPORTIONS,
    features: Sequence[str] = ("area_um2", "eccentricity", "solidity", "hematoxylin", "eosin"),
    genes: Sequence[str] | None = None,
    key_added: str = "cell_type",
    overwrite: bool = False,
) -> None:
    """A cell type and imputed expression for every nucleus, consistent with its spot's proportions.

    In each spot, its nuclei are split among cell types in proportion to the spot's composition, nuclear
    morphology deciding which nucleus gets which type, and the spot's counts are shared among its cells by their
    types' signatures; :func:`omx.models.assign_cells` describes the algorithm, which this function runs on the
    nuclei table and the spots' proportions.

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
    {overwrite}

    Returns
    -------
    None. Replaces ``sdata.tables[cells_key]`` by a table with the same obs (and shapes it annotates) plus:

    - ``X``: imputed counts per cell (float32, cells x genes);
    - ``obs[key_added]``: the cell type (categorical); ``obs[key_added + "_source"]``: ``"spot"`` (the nucleus
      lies in a spot) or ``"nearest_spot"``; ``obs[key_added + "_score"]``: the morphology distance to its type;
    - ``uns['omx'][key_added]``: the per-type morphology means and parameters.
    """
    from spatialdata.models import TableModel

    from omx.models import assign_cells as assign

    if cells_key not in sdata.tables:
        raise KeyError(f"There is no table {cells_key!r}; run omx.pp.segment_nuclei first.")
    cells = sdata.tables[cells_key]
    where = f"sdata.tables[{cells_key!r}]"
    written = [key_added, f"{key_added}_source", f"{key_added}_score"]
    check_free(cells, key=key_added, overwrite=overwrite, where=where, obs=written)
    if cells.n_vars and not overwrite:
        raise KeyError(f"{where}.X already holds imputed expression of {cells.n_vars} genes; pass `overwrite=True`.")
    table_key, table = resolve_table(sdata, table_key)
    if proportions_key not in table.obsm:
        raise KeyError(
            f"sdata.tables[{table_key!r}].obsm has no {proportions_key!r}; run omx.tl.deconvolve first "
            f"(obsm: {list(table.obsm.keys())})."
        )
    P_all = table.obsm[proportions_key]
    types = list(P_all.columns)
    sig_key = Key.signatures(proportions_key)
    if sig_key not in table.varm:
        raise KeyError(f"sdata.tables[{table_key!r}].varm has no {sig_key!r}; run omx.tl.deconvolve first.")
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

    sig = _signatures_by_type(table, proportions_key, types, where=f"sdata.tables[{table_key!r}]")
    if genes is None:
        genes = entries(table).get(proportions_key, {}).get("genes")
        genes = list(table.var_names[sig.sum(1) > 0]) if genes is None else [str(g) for g in genes]
    gidx = table.var_names.get_indexer(list(genes))
    if (gidx < 0).any():
        raise KeyError(f"Genes not in the spots' table: {list(np.asarray(genes)[gidx < 0][:10])}.")
    spot_xy = None
    if (spot_row < 0).any():
        spot_xy = _table_spatial(table, cells, spot_row, np.arange(table.n_obs))
    result = assign(
        cells.obs[list(features)].to_numpy(dtype=float),
        spot_row,
        P,
        cell_xy=cells.obsm["spatial"],
        spot_xy=spot_xy,
        signatures=sig[gidx].T,
        spot_counts=table.X[:, gidx],
    )
    source = np.where(result.in_spot, "spot", "nearest_spot")
    obs = cells.obs.copy()
    obs[key_added] = pd.Categorical(np.asarray(types, dtype=object)[result.cell_type], categories=types)
    obs[f"{key_added}_source"] = pd.Categorical(source, categories=["spot", "nearest_spot"])
    obs[f"{key_added}_score"] = result.score
    new = AnnData(
        X=result.expression, obs=obs, var=pd.DataFrame(index=pd.Index([str(g) for g in genes])), obsm=dict(cells.obsm)
    )
    entry = base_entry(
        "assign_cells",
        {
            "cells_key": cells_key, "table_key": table_key, "proportions_key": proportions_key,
            "features": list(features), "genes": None if genes is None else list(genes),
        },
        morphology_means=pd.DataFrame(result.morphology_means, index=types, columns=list(features)).to_dict(),
        written=[*(f"obs/{k}" for k in written), "X"],
    )  # fmt: skip
    new.uns[Key.UNS] = {**entries(cells), key_added: entry}
    regions, region_key_c, instance_key_c = table_regions(cells)
    new.uns[Key.TABLE_MARK] = "cells"
    new = TableModel.parse(new, region=regions, region_key=region_key_c, instance_key=instance_key_c)
    add_table(sdata, cells_key, new, overwrite=True, what="nuclei with cell types and imputed expression")
    counts_by_type = obs[key_added].value_counts()
    logger.info(
        "Cell types of %d nuclei (%d in spots): %s; %d imputed genes",
        cells.n_obs, int(result.in_spot.sum()), ", ".join(f"{k}: {v}" for k, v in counts_by_type.items()), len(gidx),
    )  # fmt: skip


def _signatures_by_type(table: AnnData, proportions_key: str, types: list, *, where: str) -> np.ndarray:
    """``varm`` signatures (genes x types) with their columns matched BY NAME to the proportions' ``types``.

    A DataFrame's columns name its types; a plain array takes the names the deconvolution recorded in
    ``uns['omx'][proportions_key]['cell_types']``. The two lists of types must hold the same names.
    """
    sig_key = Key.signatures(proportions_key)
    sig = table.varm[sig_key]
    if isinstance(sig, pd.DataFrame):
        sig_types = [str(c) for c in sig.columns]
        values = sig.to_numpy(dtype=float)
    else:
        values = np.asarray(sig, dtype=float)
        sig_types = entries(table).get(proportions_key, {}).get("cell_types")
        if sig_types is None:
            if values.shape[1] != len(types):
                raise ValueError(
                    f"{where}.varm[{sig_key!r}] has {values.shape[1]} cell types without names and "
                    f"obsm[{proportions_key!r}] {len(types)}; store the signatures as a DataFrame with one column per "
                    "cell type."
                )
            sig_types = [str(t) for t in types]
        sig_types = [str(t) for t in sig_types]
    names = [str(t) for t in types]
    missing = [t for t in names if t not in sig_types]
    extra = [t for t in sig_types if t not in names]
    if missing or extra or len(set(sig_types)) != len(sig_types) or len(set(names)) != len(names):
        raise ValueError(
            f"The cell types of {where}.obsm[{proportions_key!r}] and of varm[{sig_key!r}] differ: the signatures lack "
            f"{missing or 'none'} and the proportions lack {extra or 'none'} (duplicates count too). Each nucleus "
            "must get the profile of its own type: give both the same types (rerun omx.tl.deconvolve, or add the "
            "missing columns to the proportions with 0)."
        )
    return values[:, [sig_types.index(t) for t in names]]


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
