"""Stacking of out-of-fold predictions: the weights of the parts and the neighbours' share, chosen by grid search."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse

from omx.metrics import pearson
from omx.models._neighbors import propagate


def simplex(n: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of length ``n`` on the grid ``step`` that sums to 1."""
    m = round(1 / step)
    points = [c for c in np.ndindex(*(m + 1,) * (n - 1)) if sum(c) <= m]
    return [tuple(round(x * step, 10) for x in (*c, m - sum(c))) for c in points]


def group_score(truth: np.ndarray, pred: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups of the mean per-column Pearson r (-inf when no column has one)."""
    scores = [np.nanmean(pearson(truth[m], pred[m])) for m in (groups == g for g in np.unique(groups))]
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else -np.inf


def blend_scores(
    parts: Mapping[str, Sequence[np.ndarray]],
    truths: Sequence[np.ndarray],
    groups: Sequence[np.ndarray],
    grid: Sequence[Sequence[float]],
    shares: Sequence[float] = (0.0,),
    neighbours: Sequence[sparse.spmatrix | None] | None = None,
) -> np.ndarray:
    """Mean over folds of `group_score` for every neighbours' share and every weight vector of the parts.

    Parameters
    ----------
    parts
        Out-of-fold predictions of each part, one array ``(n_f, g)`` per fold.
    truths
        The targets of each fold's rows.
    groups
        The group of each fold's rows (scores are averaged over groups, then folds).
    grid
        Weight vectors, one weight per part in the order of `parts`.
    shares
        Neighbours' shares of the propagation (0: none).
    neighbours
        Each fold's neighbour matrix over its rows (needed when a share is not 0).

    Returns
    -------
    Scores ``(len(shares), len(grid))``.
    """
    scores = np.zeros((len(shares), len(grid)))
    for i, (truth, labels) in enumerate(zip(truths, groups, strict=True)):
        for s, share in enumerate(shares):
            smoothed = {n: p[i] if share == 0 else propagate(p[i], neighbours[i], share) for n, p in parts.items()}
            for j, w in enumerate(grid):
                pred = sum(wk * smoothed[n] for wk, n in zip(w, parts, strict=True))
                scores[s, j] += group_score(truth, pred, labels) / len(truths)
    return scores
