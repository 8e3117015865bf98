"""Per-gene scores of predicted against measured expression, and their summaries.

All functions take two matrices of shape ``(n_spots, n_genes)`` (the measured values ``y_true`` and
the predictions ``y_pred``, on the same scale, e.g. both log-normalised) and score every gene, that is
every column, separately. They use numpy and scipy only.

Correlation-type scores (:func:`pearson`, :func:`spearman`, :func:`ccc`) are NaN for a gene that is
constant over the spots in ``y_true`` or in ``y_pred``: a correlation is undefined there, and a
constant prediction says nothing about the spatial pattern. :func:`summarize` ignores these NaNs and
reports how many genes it counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import rankdata

__all__ = ["ccc", "gene_scores", "mse", "pearson", "spearman", "summarize"]

#: The per-gene metrics computed by :func:`gene_scores`, in column order.
METRICS = ("pearson", "spearman", "mse", "ccc")
#: Entries (spots x genes) that :func:`spearman` ranks at once.
_SPEARMAN_BLOCK = 2**21


def _as_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return both inputs as float64 2-D arrays of the same shape, and whether they were 1-D."""
    arrays = []
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        y = y.toarray() if sparse.issparse(y) else np.asarray(y)
        if y.ndim not in (1, 2):
            raise ValueError(f"`{name}` must be 1-D (one gene) or 2-D (spots x genes), got shape {y.shape}.")
        arrays.append(y.astype(np.float64, copy=False))
    a, b = arrays
    if a.shape != b.shape:
        raise ValueError(
            f"`y_true` has shape {a.shape} but `y_pred` has shape {b.shape}; "
            "pass the same spots (rows) and genes (columns) in the same order."
        )
    one_d = a.ndim == 1
    if one_d:
        a, b = a[:, None], b[:, None]
    return a, b, one_d


def _constant(y: np.ndarray) -> np.ndarray:
    """Columns of ``y`` whose values are all equal (exactly), as a boolean array."""
    if y.shape[0] == 0:
        return np.ones(y.shape[1], dtype=bool)
    return np.all(y == y[:1], axis=0)


def _out(values: np.ndarray, one_d: bool) -> np.ndarray | float:
    return float(values[0]) if one_d else values


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = np.einsum("ij,ij->j", a, b)
    den = np.sqrt(np.einsum("ij,ij->j", a, a) * np.einsum("ij,ij->j", b, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    return np.clip(r, -1.0, 1.0)


def pearson(y_true: Any, y_pred: Any) -> np.ndarray | float:
    """Pearson correlation between measured and predicted values, per gene.

    Parameters
    ----------
    y_true
        Measured values, ``(n_spots, n_genes)`` (dense or scipy sparse), or ``(n_spots,)`` for one gene.
    y_pred
        Predicted values, same shape as ``y_true``.

    Returns
    -------
    Array of length ``n_genes`` (a float for 1-D input). NaN for a gene that is constant in ``y_true``
    or in ``y_pred``, and for a gene with a NaN among its values.
    """
    a, b, one_d = _as_pair(y_true, y_pred)
    if a.shape[0] == 0:
        return _out(np.full(a.shape[1], np.nan), one_d)
    r = _pearson(a, b)
    r[_constant(a) | _constant(b)] = np.nan
    return _out(r, one_d)


def spearman(y_true: Any, y_pred: Any) -> np.ndarray | float:
    """Spearman rank correlation between measured and predicted values, per gene.

    The Pearson correlation of the column ranks (ties get their average rank).

    Parameters
    ----------
    y_true
        Measured values, ``(n_spots, n_genes)`` (dense or scipy sparse), or ``(n_spots,)`` for one gene.
    y_pred
        Predicted values, same shape as ``y_true``.

    Returns
    -------
    Array of length ``n_genes`` (a float for 1-D input). NaN for a gene that is constant in ``y_true``
    or in ``y_pred``, and for a gene with a NaN among its values.
    """
    a, b, one_d = _as_pair(y_true, y_pred)
    bad = _constant(a) | _constant(b) | np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0)
    if a.shape[0] == 0:
        return _out(np.full(a.shape[1], np.nan), one_d)
    # a block of genes at a time: the ranks of all genes at once would be two more float64 copies of the input
    step = max(1, _SPEARMAN_BLOCK // a.shape[0])
    r = np.concatenate(
        [
            _pearson(rankdata(a[:, j : j + step], axis=0), rankdata(b[:, j : j + step], axis=0))
            for j in range(0, a.shape[1], step)
        ]
    )
    r[bad] = np.nan
    return _out(r, one_d)


def mse(y_true: Any, y_pred: Any) -> np.ndarray | float:
    """Mean squared error of the predictions, per gene.

    Unlike the correlations, the error is defined for constant genes too (it is the natural score of
    a constant baseline such as the training mean), so it is NaN only for a gene with a NaN among its
    values or with no spots.

    Parameters
    ----------
    y_true
        Measured values, ``(n_spots, n_genes)`` (dense or scipy sparse), or ``(n_spots,)`` for one gene.
    y_pred
        Predicted values, same shape as ``y_true``.

    Returns
    -------
    Array of length ``n_genes`` (a float for 1-D input).
    """
    a, b, one_d = _as_pair(y_true, y_pred)
    if a.shape[0] == 0:
        return _out(np.full(a.shape[1], np.nan), one_d)
    d = a - b
    return _out(np.einsum("ij,ij->j", d, d) / a.shape[0], one_d)


def ccc(y_true: Any, y_pred: Any) -> np.ndarray | float:
    """Lin's concordance correlation coefficient, per gene.

    ``2 cov(t, p) / (var(t) + var(p) + (mean(t) - mean(p))**2)`` with population (``ddof=0``) moments.
    Unlike the Pearson correlation it also penalises a shift or a change of scale, so it is 1 only
    when the predictions equal the measured values.

    Parameters
    ----------
    y_true
        Measured values, ``(n_spots, n_genes)`` (dense or scipy sparse), or ``(n_spots,)`` for one gene.
    y_pred
        Predicted values, same shape as ``y_true``.

    Returns
    -------
    Array of length ``n_genes`` (a float for 1-D input). NaN for a gene that is constant in ``y_true``
    or in ``y_pred`` (as for :func:`pearson`, so that all correlation-type scores count the same
    genes), and for a gene with a NaN among its values.
    """
    a, b, one_d = _as_pair(y_true, y_pred)
    if a.shape[0] == 0:
        return _out(np.full(a.shape[1], np.nan), one_d)
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    ac, bc = a - ma, b - mb
    n = a.shape[0]
    cov = np.einsum("ij,ij->j", ac, bc) / n
    va = np.einsum("ij,ij->j", ac, ac) / n
    vb = np.einsum("ij,ij->j", bc, bc) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        c = 2 * cov / (va + vb + (ma - mb) ** 2)
    c[_constant(a) | _constant(b)] = np.nan
    return _out(c, one_d)


def gene_scores(y_true: Any, y_pred: Any, genes: Sequence[str]) -> pd.DataFrame:
    """Score every gene with all metrics.

    Parameters
    ----------
    y_true
        Measured values of the held-out spots, ``(n_spots, n_genes)``, dense or scipy sparse.
    y_pred
        Predicted values, same shape and scale as ``y_true``.
    genes
        Gene names, one per column.

    Returns
    -------
    One row per gene (index ``"gene"``) with the columns ``pearson``, ``spearman``, ``mse``, ``ccc``
    (see the functions of the same name) and ``mean_true``, the mean measured value of the gene over
    these spots (used by :func:`summarize` to pick the top expressed genes).

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    >>> gene_scores(y, 2 * y, ["A", "B"])["pearson"].tolist()
    [1.0, nan]
    """
    a, b, one_d = _as_pair(y_true, y_pred)
    genes = [str(g) for g in genes]
    if len(genes) != a.shape[1]:
        raise ValueError(f"Got {len(genes)} gene names for {a.shape[1]} columns; pass one name per column.")
    if len(set(genes)) != len(genes):
        raise ValueError("Gene names must be unique.")
    df = pd.DataFrame(
        {
            "pearson": pearson(a, b),
            "spearman": spearman(a, b),
            "mse": mse(a, b),
            "ccc": ccc(a, b),
            "mean_true": a.mean(axis=0) if a.shape[0] else np.full(a.shape[1], np.nan),
        },
        index=pd.Index(genes, name="gene"),
    )
    return df


def _mean_and_count(values: pd.Series) -> tuple[float, int]:
    v = values.to_numpy(dtype=np.float64)
    v = v[~np.isnan(v)]
    return (float(v.mean()) if v.size else float("nan")), int(v.size)


def _summary(scores: pd.DataFrame, genes: pd.Index) -> dict[str, float | int]:
    out: dict[str, float | int] = {"n_genes": len(genes)}
    sub = scores.loc[genes]
    for metric in METRICS:
        if metric in sub.columns:
            out[metric], out[f"n_{metric}"] = _mean_and_count(sub[metric])
    return out


def _top(values: pd.Series, top_n: int) -> pd.Index:
    """Index of the ``top_n`` largest values (NaN last, ties broken by the original order)."""
    order = values.sort_values(ascending=False, kind="stable", na_position="last")
    return order.index[: min(top_n, len(order))]


def summarize(
    scores: pd.DataFrame, *, y_train_var: pd.Series | None = None, top_n: int = 50
) -> dict[str, dict[str, float | int]]:
    """Average per-gene scores over the whole panel and over gene subsets.

    The subsets are chosen without looking at the predictions:

    - ``"all"``: every gene in ``scores``;
    - ``"top_expressed"``: the ``top_n`` genes with the highest ``mean_true``, the mean measured value
      over the scored (test) spots. This is the convention of the published her2st benchmarks
      ("top-50 expressed genes"); it uses the measured test expression but never the predictions;
    - ``"top_variable"``: the ``top_n`` genes with the highest ``y_train_var``, the variance of each
      gene over the **training** sections only, so that nothing about the held-out section leaks into
      the choice. Only present when ``y_train_var`` is given.

    Parameters
    ----------
    scores
        Output of :func:`gene_scores`: one row per gene (genes in the index or a ``"gene"`` column).
    y_train_var
        Per-gene variance over the training spots, indexed by gene name. Must cover every gene in
        ``scores``.
    top_n
        Size of the gene subsets (all genes when the panel is smaller).

    Returns
    -------
    A dictionary ``{subset: {"n_genes": int, metric: float, f"n_{metric}": int, ...}}`` with, for each
    metric present in ``scores`` (``pearson``, ``spearman``, ``mse``, ``ccc``), the NaN-ignoring mean
    over the subset and the number of genes that entered it (genes with a NaN score, e.g. constant
    genes, are left out). Plain Python numbers, so the result can be stored in ``table.uns``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.poisson(3, size=(100, 80)).astype(float)
    >>> scores = gene_scores(y, y + rng.normal(size=y.shape), [f"g{i}" for i in range(80)])
    >>> summary = summarize(scores, top_n=10)
    >>> summary["top_expressed"]["n_genes"]
    10
    """
    if not isinstance(scores, pd.DataFrame):
        raise TypeError(f"`scores` must be the DataFrame returned by omx.metrics.gene_scores, got {type(scores)}.")
    if "gene" in scores.columns:
        scores = scores.set_index("gene")
    if not scores.index.is_unique:
        raise ValueError("The gene names in `scores` must be unique.")
    if not any(m in scores.columns for m in METRICS):
        raise ValueError(f"`scores` has none of the metric columns {list(METRICS)}; pass omx.metrics.gene_scores(...).")
    if top_n < 1:
        raise ValueError(f"`top_n` must be at least 1, got {top_n}.")

    if "mean_true" not in scores.columns:
        raise ValueError("`scores` has no 'mean_true' column; pass the DataFrame returned by omx.metrics.gene_scores.")
    result = {"all": _summary(scores, scores.index)}
    result["top_expressed"] = _summary(scores, _top(scores["mean_true"], top_n))
    if y_train_var is not None:
        y_train_var = pd.Series(y_train_var)
        missing = scores.index.difference(y_train_var.index)
        if len(missing):
            raise ValueError(
                f"`y_train_var` has no value for {len(missing)} scored genes (e.g. {list(missing[:5])}); "
                "pass the variance of every scored gene over the training sections."
            )
        result["top_variable"] = _summary(scores, _top(y_train_var.loc[scores.index], top_n))
    return result
