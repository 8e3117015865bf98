"""Cell types and expression per nucleus from spot proportions and nuclear morphology (arrays in, arrays out)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse


@dataclass
class CellAssignment:
    """The result of :func:`assign_cells`.

    Attributes
    ----------
    cell_type
        Index of each nucleus's type into the columns of the proportions ``(n_cells,)``.
    score
        Morphology distance of each nucleus to its type's mean (lower is closer) ``(n_cells,)``.
    in_spot
        Whether each nucleus lies in a spot with proportions (else its type comes from the nearest spot).
    morphology_means
        Mean standardised morphology of each type ``(n_types, n_features)``.
    expression
        Imputed counts per nucleus ``(n_cells, n_genes)`` float32, when signatures and counts were given.
    """

    cell_type: np.ndarray
    score: np.ndarray
    in_spot: np.ndarray
    morphology_means: np.ndarray
    expression: np.ndarray | None = None


def largest_remainder(p: np.ndarray, n: int) -> np.ndarray:
    """Whole numbers summing to ``n`` in proportion to ``p`` (Hamilton's largest-remainder rounding)."""
    exact = np.asarray(p, dtype=float) / max(float(np.sum(p)), 1e-12) * n
    out = np.floor(exact).astype(int)
    short = n - out.sum()
    if short > 0:
        out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    return out


def assign_cells(
    morphology: np.ndarray,
    spot_of_cell: np.ndarray,
    proportions: np.ndarray,
    *,
    cell_xy: np.ndarray,
    spot_xy: np.ndarray | None = None,
    signatures: np.ndarray | None = None,
    spot_counts=None,
) -> CellAssignment:
    """Give every nucleus a cell type consistent with its spot's proportions, and optionally expression.

    In each spot, its nuclei are split among cell types in proportion to the spot's composition (rounded to
    whole cells); which nucleus gets which type is decided by morphology: each type's mean nuclear morphology
    is learned by regressing the spots' mean nucleus features on their proportions (least squares over all
    spots), and nuclei are matched to the types' slots by minimal total distance (Hungarian algorithm).
    Nuclei outside every spot take the type that is most likely under the nearest spot's proportions and
    their morphology. Expression per cell distributes each spot's counts over its cells in proportion to
    their types' signatures; cells outside spots get their type's signature at the median counts per cell.

    Parameters
    ----------
    morphology
        Nuclear features ``(n_cells, n_features)`` (NaN allowed; standardised here).
    spot_of_cell
        Row of each nucleus's spot in ``proportions`` ``(n_cells,)``, -1 outside spots.
    proportions
        Cell-type proportions of the spots ``(n_spots, n_types)``; rows with NaN count as spots without them.
    cell_xy
        Nucleus centres ``(n_cells, 2)`` in microns.
    spot_xy
        Spot centres ``(n_spots, 2)`` in the same units, for nuclei outside spots (needed when there are some).
    signatures
        Expression of each type ``(n_types, n_genes)``, for imputed expression.
    spot_counts
        Counts of the spots in the same genes ``(n_spots, n_genes)`` (dense or sparse), for imputed expression.

    Returns
    -------
    The assignment (see `CellAssignment`).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    P = np.asarray(proportions, dtype=float)
    spot_row = np.asarray(spot_of_cell, dtype=np.int64).copy()
    has_p = np.all(np.isfinite(P), axis=1)
    spot_row[(spot_row >= 0) & ~has_p[np.maximum(spot_row, 0)]] = -1
    if not (spot_row >= 0).any():
        raise ValueError("No nucleus lies in a spot with proportions.")
    F = np.asarray(morphology, dtype=float)
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

    n_types = P.shape[1]
    cell_type = np.full(len(Z), -1)
    score = np.full(len(Z), np.nan)
    order = np.argsort(spot_row, kind="stable")
    bounds = np.searchsorted(spot_row[order], uniq)
    ends = np.r_[bounds[1:], len(order)]
    for r, b, e in zip(uniq, bounds, ends, strict=True):
        members = order[b:e]
        slots = np.repeat(np.arange(n_types), largest_remainder(P[r], len(members)))
        cost = (((Z[members][:, None, :] - M[slots][None]) ** 2) / resid_var).sum(-1)
        i, j = linear_sum_assignment(cost)
        cell_type[members[i]] = slots[j]
        score[members[i]] = cost[i, j]
    out = np.flatnonzero(~in_spot)
    if len(out):
        if spot_xy is None:
            raise ValueError("Some nuclei lie outside spots: pass `spot_xy` so that they find their nearest spot.")
        with_p = np.flatnonzero(has_p)
        nearest = with_p[cKDTree(np.asarray(spot_xy)[with_p]).query(np.asarray(cell_xy)[out])[1]]
        d2 = (((Z[out][:, None, :] - M[None]) ** 2) / resid_var).sum(-1)
        logp = np.log(np.clip(P[nearest], 1e-6, None)) - 0.5 * d2
        cell_type[out] = logp.argmax(1)
        score[out] = d2[np.arange(len(out)), cell_type[out]]
    result = CellAssignment(cell_type=cell_type, score=score, in_spot=in_spot, morphology_means=M)
    if signatures is None or spot_counts is None:
        return result

    # imputed expression: each spot's counts shared by its cells in proportion to their types' signatures
    S = np.asarray(signatures, dtype=float)
    if S.ndim != 2 or S.shape[0] != P.shape[1]:
        raise ValueError(
            f"The signatures have shape {S.shape}: they need one row per cell type of the proportions "
            f"({P.shape[1]}), in the same order."
        )
    Y = spot_counts[uniq]
    Y = np.asarray(Y.toarray() if sparse.issparse(Y) else Y, dtype=np.float64)
    X = np.zeros((len(Z), S.shape[1]), dtype=np.float32)
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
    result.expression = X
    return result
