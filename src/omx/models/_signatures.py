"""Cell-type signatures from a single-cell reference, by a negative-binomial regression of the cells.

The model is cell2location's reference regression and stereoscope's single-cell step, fitted by maximum a
posteriori in numpy.

Cell ``c`` of type ``k(c)`` in batch ``b(c)``, gene ``g``::

    y[c, g] ~ NegativeBinomial(mean = detect[b] * S[k, g] * batch_gene[b, g], dispersion r[g])
    log batch_gene[b, g] ~ Normal(0, batch_sd)        # weak prior: batches differ a little per gene

``S[k, g]`` (the signatures) are mean counts per cell of each type in a typical batch. Identifiability: the
detection efficiencies have geometric mean 1 over batches (no batch is privileged), and the per-gene effects are
centred, geometric mean 1 over the batches of each gene and over the genes of each batch. The prior makes the
centring over batches the maximum a posteriori; the other two are the convention.

All cells of one type in one batch share a mean, so the part of the likelihood that holds the means needs only the
summed counts of each (type, batch) group; the dispersion part needs, per gene, how many cells have each count
value, which a histogram of the nonzero entries gives. The fit alternates a Newton step of the log means
(types and batch effects of each gene solved jointly, vectorised over genes), the detection efficiencies in closed
form given the batch effects, and a Newton step of each gene's log dispersion (maximum likelihood). Without
batches the signatures are the per-type means exactly (their maximum likelihood estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import digamma, gammaln, polygamma

from omx._utils import check_counts, logger

__all__ = ["SignatureFit", "fit_signatures"]

#: Bounds of the per-gene dispersion ``r`` (variance ``mu + mu**2 / r``): the upper one is Poisson to 1e-6.
_R_MIN, _R_MAX = 1e-3, 1e6
#: Count values below this are histogrammed with one `np.bincount`; the few above with `np.unique`.
_HIST_CAP = 256
#: Rows of the counts read at a time.
_BLOCK_ROWS = 4096
#: Largest change of a log parameter in one step: keeps early steps from overshooting.
_MAX_STEP = 2.0


@dataclass(frozen=True)
class SignatureFit:
    """Signatures fitted by `fit_signatures`.

    Attributes
    ----------
    signatures
        Mean counts per cell of each type, ``(n_types, n_genes)`` float64, in a typical batch (geometric mean of
        the batches' detection and per-gene effects).
    types
        Cell type names, the rows of ``signatures`` (sorted).
    genes
        Positions of the genes (columns of the input) that were kept: genes without counts are dropped.
    dispersion
        Per-gene negative-binomial dispersion ``r`` (variance ``mu + mu**2 / r``), ``(n_genes,)``.
    log_se
        Standard error of ``log(signatures)`` from the Fisher information, ``(n_types, n_genes)``; ``inf`` where the
        type has no counts of the gene (the signature is 0).
    n_cells
        Cells of each type.
    batches
        Batch names, or `None` when fitted without batches.
    detection
        Detection efficiency of each batch (geometric mean 1), or `None`.
    batch_effects
        Per-batch per-gene factor ``(n_batches, n_genes)`` (geometric mean 1 over batches and over genes), or `None`.
    n_iter
        Iterations run.
    converged
        Whether the largest change of a log parameter fell below ``tol``.
    """

    signatures: np.ndarray
    types: list[str]
    genes: np.ndarray
    dispersion: np.ndarray
    log_se: np.ndarray
    n_cells: np.ndarray
    batches: list[str] | None
    detection: np.ndarray | None
    batch_effects: np.ndarray | None
    n_iter: int
    converged: bool


def _codes(values: Any, n_obs: int, name: str, argname: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted names and integer codes of a label vector, with clear errors for a length mismatch and missing values."""
    values = pd.Series(np.asarray(values, dtype=object) if not isinstance(values, pd.Series) else values.to_numpy())
    if len(values) != n_obs:
        raise ValueError(
            f"{argname} has {len(values)} entries but the counts have {n_obs} cells (rows); pass one {name} per cell."
        )
    missing = values.isna()
    if missing.any():
        raise ValueError(
            f"{argname} holds {int(missing.sum())} missing values; drop those cells (rows) or give each a {name}."
        )
    names, codes = np.unique(values.astype(str).to_numpy(), return_inverse=True)
    return names, codes


def _count_matrix(X: Any) -> Any:
    """``X`` as CSR (not copied when it already is) or a dense 2-D array, after `check_counts`."""
    if sparse.issparse(X):
        X = X.tocsr()
    else:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"The reference counts must be 2-D (cells x genes), got shape {X.shape}.")
    check_counts(X, name="reference counts")
    return X


def _statistics(X: Any, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Summed counts of each group ``(n_groups, n_genes)`` and the histogram of nonzero counts of each gene.

    One pass over blocks of rows (small temporaries: large arrays cost more in page faults than in arithmetic),
    which also checks the counts are integers. The histogram is the gene, count value and number of cells of every
    (gene, nonzero value) pair that occurs.
    """
    n_obs, n_genes = X.shape
    Y = np.zeros((n_groups, n_genes))
    m = np.zeros(n_genes * _HIST_CAP, dtype=np.int64)
    large: list[np.ndarray] = []
    for start in range(0, n_obs, _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        block = X[rows] if sparse.issparse(X) else sparse.csr_matrix(X[rows])
        values = block.data
        if values.dtype.kind == "f" and (values != np.floor(values)).any():
            raise ValueError(
                "The reference counts hold non-integer values. The negative-binomial model needs raw counts: pass "
                "the raw counts (e.g. `adata.layers['counts']` or `adata.raw.X`), not normalised or log values."
            )
        onehot = sparse.csr_matrix(
            (np.ones(block.shape[0]), (group[rows], np.arange(block.shape[0]))), shape=(n_groups, block.shape[0])
        )
        Y += (onehot @ block.astype(np.float64)).toarray()
        values = values.astype(np.int64)
        small = (values > 0) & (values < _HIST_CAP)
        m += np.bincount(block.indices[small].astype(np.int64) * _HIST_CAP + values[small], minlength=m.size)
        big = values >= _HIST_CAP
        if big.any():
            large.append(np.stack([block.indices[big].astype(np.int64), values[big]]))
    keys = np.flatnonzero(m)
    hg, hy, hm = keys // _HIST_CAP, keys % _HIST_CAP, m[keys]
    if large:
        pairs, mult = np.unique(np.concatenate(large, axis=1), axis=1, return_counts=True)
        hg, hy, hm = np.concatenate([hg, pairs[0]]), np.concatenate([hy, pairs[1]]), np.concatenate([hm, mult])
    return Y, hg, hy.astype(np.float64), hm.astype(np.float64)


def _check_connected(n: np.ndarray, batch_names: np.ndarray, type_names: np.ndarray) -> None:
    """Raise when the batches split into groups that share no cell type: their effects are then not identifiable."""
    n_types, n_batches = n.shape
    # Union-find over types (0..K-1) and batches (K..K+B-1), linked by every (type, batch) pair with cells.
    parent = list(range(n_types + n_batches))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k, b in zip(*np.nonzero(n), strict=True):
        parent[find(int(k))] = find(n_types + int(b))
    roots = [find(n_types + b) for b in range(n_batches)]
    if len(set(roots)) > 1:
        groups = {}
        for b, root in enumerate(roots):
            groups.setdefault(root, []).append(str(batch_names[b]))
        raise ValueError(
            "Batch effects cannot be estimated: these groups of batches share no cell type, so a difference between "
            f"them is as well a difference between their cell types: {list(groups.values())}. Pass `batches=None` "
            "(or merge the batches), or add cells of a shared type to each group."
        )


def _information(w: np.ndarray, zero: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Information of the log means of each gene in the signatures ``s`` and the batch effects ``gamma``.

    ``w`` ``(K, B, G)`` is the information of each (type, batch) group's log mean. Returns the ``s`` block's
    diagonal ``D_s`` ``(K, G)`` (1 where a type has no counts of the gene: those stay fixed), ``A = w / D_s`` and the
    Schur complement ``M`` ``(G, B, B)`` of the ``s`` block (the prior's ``lam`` on the diagonal), with which a Newton
    step or the covariance is a ``B x B`` solve per gene.
    """
    D_s = np.where(zero, 1.0, w.sum(1))
    A = w / D_s[:, None, :]
    M = -np.einsum("kbg,kcg->gbc", A, w)
    diag = np.arange(w.shape[1])
    M[:, diag, diag] += (w.sum(0) + lam).T
    return D_s, A, M


def _mean_objective(
    s: np.ndarray, gamma: np.ndarray, delta: np.ndarray, r: np.ndarray, n: np.ndarray, Y: np.ndarray, lam: float
) -> np.ndarray:
    """Log likelihood of each gene in its means (terms without them left out), plus the log prior of its effects."""
    eta = s[:, None, :] + gamma[None, :, :]
    ll = np.where(Y > 0, Y * np.where(Y > 0, eta, 0.0), 0.0) - (n[:, :, None] * r + Y) * np.log(r + np.exp(eta))
    return ll.sum((0, 1)) - 0.5 * lam * ((gamma - delta[:, None]) ** 2).sum(0)


def _dispersion_objective(
    theta: np.ndarray, mu: np.ndarray, n: np.ndarray, Y: np.ndarray, hg: np.ndarray, hy: np.ndarray, hm: np.ndarray
) -> np.ndarray:
    """Log likelihood of each gene in its log dispersion ``theta`` (terms without it left out)."""
    r = np.exp(theta)
    rh = r[hg]
    ll = np.bincount(hg, weights=hm * (gammaln(hy + rh) - gammaln(rh)), minlength=r.size)
    return ll - (n[:, :, None] * r * np.log1p(mu / r) + Y * np.log(r + mu)).sum((0, 1))


def _backtrack(objective: Callable[[np.ndarray], np.ndarray], max_halvings: int = 30) -> np.ndarray:
    """Per-gene step lengths (1, 1/2, 1/4, ...) at which ``objective(step)`` is not below ``objective(0)``.

    The comparison allows rounding error, so a gene at its optimum keeps the full (tiny) step.
    """
    f0 = objective(np.zeros(1))
    step = np.ones_like(f0)
    for _ in range(max_halvings):
        bad = ~(objective(step) >= f0 - 1e-10 * (1.0 + np.abs(f0)))
        if not bad.any():
            break
        step = np.where(bad, step / 2, step)
    return np.where(bad, 0.0, step)


def fit_signatures(
    X: Any,
    labels: Any,
    *,
    batches: Any = None,
    min_cells_per_type: int = 10,
    batch_sd: float = 1.0,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> SignatureFit:
    """Fit cell-type signatures to a single-cell reference with a negative-binomial model.

    ``y[c, g] ~ NB(detect[b] * S[k, g] * batch_gene[b, g], r[g])`` for cell ``c`` of type ``k`` in batch ``b``:
    the signatures ``S`` are mean counts per cell of each type, corrected for the batches' detection efficiency
    and per-gene effects (as cell2location's reference regression and stereoscope's single-cell step do). The fit
    is deterministic: maximum a posteriori by Newton steps on the summed counts of each (type, batch) group and
    Newton steps of each gene's dispersion on a histogram of its counts.

    Parameters
    ----------
    X
        Raw counts, cells x genes, scipy sparse or dense; non-negative integers.
    labels
        Cell type of each cell (array-like, one per row of ``X``).
    batches
        Batch (sample, donor, technology) of each cell, or `None` for one batch: the signatures are then the
        per-type means. Batch effects are told apart from cell types through the types that batches share: a batch
        may hold a single type when that type is also in another batch, but every group of batches must share a
        cell type with the others (an error says which do not).
    min_cells_per_type
        Fewest cells a type may have.
    batch_sd
        Standard deviation of the normal prior of the log per-gene batch effects (1: a factor of e).
    max_iter
        Most iterations.
    tol
        Stop when no log parameter (signature, batch effect, dispersion) changes by more than this.

    Returns
    -------
    The fitted signatures, their standard errors, dispersions and batch effects (see `SignatureFit`).
    """
    if not batch_sd > 0 or max_iter < 1 or not tol > 0:
        raise ValueError(
            f"batch_sd and tol must be positive and max_iter at least 1; got batch_sd={batch_sd}, tol={tol}, "
            f"max_iter={max_iter}."
        )
    X = _count_matrix(X)
    n_obs = X.shape[0]
    type_names, k_of = _codes(labels, n_obs, "label", "labels")
    n_types = len(type_names)
    n_per_type = np.bincount(k_of, minlength=n_types)
    few = {str(t): int(c) for t, c in zip(type_names, n_per_type, strict=True) if c < min_cells_per_type}
    if few:
        raise ValueError(
            f"Cell types with fewer than min_cells_per_type={min_cells_per_type} cells: {few}. Drop or merge them, or "
            "lower `min_cells_per_type=`."
        )
    if batches is None:
        batch_names, b_of = None, np.zeros(n_obs, dtype=np.int64)
    else:
        batch_names, b_of = _codes(batches, n_obs, "batch", "batches")
    n_batches = 1 if batch_names is None else len(batch_names)

    # Sufficient statistics: cells and summed counts of each (type, batch) group; histogram of counts per gene.
    group = k_of * n_batches + b_of
    n_groups = n_types * n_batches
    n = np.bincount(group, minlength=n_groups).astype(np.float64).reshape(n_types, n_batches)
    if n_batches > 1:
        _check_connected(n, batch_names, type_names)
    Y, hg, hy, hm = _statistics(X, group, n_groups)
    genes = np.flatnonzero(Y.sum(0) > 0)
    if genes.size == 0:
        raise ValueError("The reference counts are all zero; pass the raw counts.")
    if genes.size < X.shape[1]:
        logger.info(f"fit_signatures: dropped {X.shape[1] - genes.size} of {X.shape[1]} genes without counts.")
        position = np.full(X.shape[1], -1)
        position[genes] = np.arange(genes.size)
        Y, hg = Y[:, genes], position[hg]  # genes without counts have no histogram entries
    n_genes = genes.size
    Y = Y.reshape(n_types, n_batches, n_genes)
    sum_y2 = np.bincount(hg, weights=hm * hy**2, minlength=n_genes)

    # Start: per-type means (the answer without batches), no batch effects, moment-estimated dispersion.
    Y_type = Y.sum(1)
    with np.errstate(divide="ignore"):
        s = np.log(Y_type / n_per_type[:, None])  # -inf where a type has no counts of a gene: its MLE
    zero = ~np.isfinite(s)
    gamma = np.zeros((n_batches, n_genes))  # log(detect[b] * batch_gene[b, g])
    delta = np.zeros(n_batches)  # log detect[b]
    nz = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        group_means = np.where(nz[:, :, None], Y / n[:, :, None], 0.0)
    sum_mu = Y.sum((0, 1))
    sum_mu2 = (n[:, :, None] * group_means**2).sum((0, 1))
    excess = sum_y2 - sum_mu2 - sum_mu  # sum (y - mu)^2 - sum mu estimates sum mu^2 / r
    r = np.clip(np.divide(sum_mu2, excess, out=np.full(n_genes, _R_MAX), where=excess > 0), _R_MIN, _R_MAX)
    theta = np.log(r)
    lam = 1.0 / batch_sd**2

    converged = False
    n_iter = 0
    mean_count = Y.sum((0, 1)) / n_obs
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is reported)
        change = 0.0
        r = np.exp(theta)
        if n_batches > 1:
            # Newton steps of (s[:, g], gamma[:, g]) for every gene at once, the prior on gamma - delta included,
            # halved per gene until the penalised likelihood does not fall.
            mu = np.exp(s[:, None, :] + gamma[None, :, :])  # (K, B, G); 0 where s = -inf
            grad = r * (Y - n[:, :, None] * mu) / (r + mu)
            g_s, g_b = grad.sum(1), grad.sum(0) - lam * (gamma - delta[:, None])
            # Newton: the observed information, not the expected (Fisher scoring converges slowly where they differ)
            w = (n[:, :, None] * r + Y) * r * mu / (r + mu) ** 2
            D_s, A, M = _information(w, zero, lam)
            rhs = g_b - np.einsum("kbg,kg->bg", A, g_s)
            d_gamma = np.linalg.solve(M, rhs.T[:, :, None])[:, :, 0].T
            d_s = np.where(zero, 0.0, (g_s - np.einsum("kbg,bg->kg", w, d_gamma)) / D_s)
            d_s, d_gamma = np.clip(d_s, -_MAX_STEP, _MAX_STEP), np.clip(d_gamma, -_MAX_STEP, _MAX_STEP)
            objective = lambda step: _mean_objective(s + step * d_s, gamma + step * d_gamma, delta, r, n, Y, lam)  # noqa: B023
            step = _backtrack(objective)
            d_s, d_gamma = step * d_s, step * d_gamma
            s, gamma = s + d_s, gamma + d_gamma
            # Detection given the batch effects (closed form: the prior's centre is their mean over genes), then
            # the geometric mean of detection set to 1, its scale moved into the signatures.
            delta = gamma.mean(1)
            shift = delta.mean()
            delta, gamma, s = delta - shift, gamma - shift, s + shift
            change = max(float(np.abs(d_s).max()), float(np.abs(d_gamma).max()))
        # Newton step of each gene's log dispersion (maximum likelihood given the means), halved per gene until the
        # likelihood does not fall; where the likelihood is not concave, a unit step uphill.
        mu = np.exp(s[:, None, :] + gamma[None, :, :])
        nn = n[:, :, None]
        rh = r[hg]
        grad_r = np.bincount(hg, weights=hm * (digamma(hy + rh) - digamma(rh)), minlength=n_genes)
        grad_r += (-nn * np.log1p(mu / r) + (nn * mu - Y) / (r + mu)).sum((0, 1))
        hess_r = np.bincount(hg, weights=hm * (polygamma(1, hy + rh) - polygamma(1, rh)), minlength=n_genes)
        hess_r += (nn / r - nn / (r + mu) - (nn * mu - Y) / (r + mu) ** 2).sum((0, 1))
        g_t, h_t = r * grad_r, r**2 * hess_r + r * grad_r
        d_theta = np.clip(np.where(h_t < 0, -g_t / np.where(h_t < 0, h_t, -1.0), np.sign(g_t)), -1.0, 1.0)
        d_theta = np.clip(theta + d_theta, np.log(_R_MIN), np.log(_R_MAX)) - theta
        objective = lambda step: _dispersion_objective(theta + step * d_theta, mu, n, Y, hg, hy, hm)  # noqa: B023
        new_theta = theta + _backtrack(objective) * d_theta
        # The dispersion's change, measured by what it does: the variance over the mean, 1 + mean / r.
        change = max(change, float(np.abs(np.log1p(mean_count / np.exp(new_theta)) - np.log1p(mean_count / r)).max()))
        theta = new_theta
        if change < tol:
            converged = True
            break
    if not converged:
        logger.warning(f"fit_signatures did not converge in max_iter={max_iter} iterations (last change {change:.2g}).")

    # Standard errors of log S: the (s, gamma) block of the inverse Fisher information (the prior included), per
    # gene, conditional on the centring of the batch effects (a shift of gene g's batch effects against its
    # signatures is the convention, not something the data tell); the dispersion is orthogonal to the mean in the
    # negative binomial, and detection is pinned by all genes.
    r = np.exp(theta)
    mu = np.exp(s[:, None, :] + gamma[None, :, :])
    D_s, A, M = _information(n[:, :, None] * mu * r / (r + mu), zero, lam)
    var = 1.0 / D_s
    if n_batches > 1:
        M_inv = np.linalg.inv(M)
        v = M_inv.sum(2)  # (G, B): M^-1 1
        u = np.einsum("kbg,gb->kg", A, v)  # covariance of s with the sum of gene g's batch effects (sign dropped)
        var = var + np.einsum("kbg,gbc,kcg->kg", A, M_inv, A) - u**2 / v.sum(1)
    log_se = np.where(zero, np.inf, np.sqrt(var))

    # Without batches the maximum likelihood signatures are the per-type means: return them exactly.
    S = Y_type / n_per_type[:, None] if n_batches == 1 else np.exp(s)
    logger.info(
        f"fit_signatures: {n_types} types x {n_genes} genes from {n_obs} cells in {n_batches} batch(es), "
        f"{n_iter} iterations; median dispersion {np.median(r):.3g}."
    )
    return SignatureFit(
        signatures=S,
        types=[str(t) for t in type_names],
        genes=genes,
        dispersion=r,
        log_se=log_se,
        n_cells=n_per_type,
        batches=None if batch_names is None else [str(b) for b in batch_names],
        detection=None if batch_names is None else np.exp(delta),
        batch_effects=None if batch_names is None else np.exp(gamma - delta[:, None]),
        n_iter=n_iter,
        converged=converged,
    )
