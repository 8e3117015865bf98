"""Cell-type proportions of spots from H&E alone: image features, nucleus morphology and a per-nucleus classifier.

Two softmax (multinomial logistic) regressions, both fitted with the cross-entropy against the spots' soft target
proportions and an L2 penalty, arrays in and arrays out:

- the **spot model** maps a spot's image features (e.g. the handcrafted encoder's) and the aggregates of its
  nuclei's morphology (count, mean and spread of each nucleus feature) to the spot's proportions;
- the **nucleus classifier** maps one nucleus's own features to type probabilities, learned from label proportions:
  the mean of its probabilities over the nuclei of a spot is fitted to the spot's proportions, so it needs no
  labelled nuclei and labels every nucleus (inside spots or not).

A spot's proportions are ``w * spot model + (1 - w) * mean of its nuclei's probabilities`` (the spot model alone
where a spot holds no nucleus). Features are standardised per group (section) with the group's own statistics,
as `omx.models.Ridge` does, so stain and scanner differences between slides do not leak into the fit; the two
penalties and ``w`` are chosen by leave-one-group-out cross-validation over the training groups only (mean
Jensen-Shannon divergence of the held-out groups).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from omx._utils import logger
from omx.models._standardize import MIN_GROUP_ROWS, GroupStandardizer

#: Per-nucleus morphology columns of the ``omx_cells`` table (`omx.pp.segment_nuclei`) the models use.
NUCLEUS_COLUMNS = ("area_um2", "eccentricity", "solidity", "hematoxylin", "eosin")
#: Radius (microns) within which neighbouring nuclei are counted for a nucleus's local density.
DENSITY_RADIUS_UM = 25.0
#: Penalties tried by cross-validation (L2 on the weights; the loss is a mean over spots).
DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)
#: Weights of the spot model in the mixture tried by cross-validation (1 - weight goes to the nucleus classifier).
DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def nucleus_features(morphology: pd.DataFrame | np.ndarray, xy_um: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Features of each nucleus: its morphology and its local density.

    Parameters
    ----------
    morphology
        One row per nucleus with the `NUCLEUS_COLUMNS` (a DataFrame, e.g. ``sdata.tables["omx_cells"].obs``, or an
        array with those columns in that order).
    xy_um
        Centroids in microns, ``(n, 2)``.
    groups
        Section (image) of each nucleus; neighbours are counted within a section only.

    Returns
    -------
    ``(n, 8)`` float64: log area, eccentricity, solidity, hematoxylin, eosin, log(1 + nuclei within
    `DENSITY_RADIUS_UM`), log distance to the third nearest nucleus, and the hematoxylin / eosin ratio's log.
    """
    from scipy.spatial import cKDTree

    M = (
        morphology[list(NUCLEUS_COLUMNS)].to_numpy(dtype=np.float64)
        if isinstance(morphology, pd.DataFrame)
        else np.asarray(morphology, dtype=np.float64)
    )
    if M.ndim != 2 or M.shape[1] != len(NUCLEUS_COLUMNS):
        raise ValueError(f"Nucleus morphology must have the columns {NUCLEUS_COLUMNS}, got shape {M.shape}.")
    xy = np.asarray(xy_um, dtype=np.float64)
    groups = np.asarray(groups)
    if len(xy) != len(M) or len(groups) != len(M):
        raise ValueError(f"{len(M)} nuclei but {len(xy)} centroids and {len(groups)} groups.")
    density = np.zeros(len(M))
    third = np.zeros(len(M))
    for g in pd.unique(groups):
        rows = np.flatnonzero(groups == g)
        tree = cKDTree(xy[rows])
        density[rows] = tree.query_ball_point(xy[rows], DENSITY_RADIUS_UM, return_length=True) - 1
        k = min(4, len(rows))
        dist, _ = tree.query(xy[rows], k=k)
        third[rows] = np.atleast_2d(dist.T).T[:, -1] if k > 1 else DENSITY_RADIUS_UM
    area, ecc, sol, hem, eos = M.T
    ratio = np.log(np.clip(hem, 1e-3, None) / np.clip(eos, 1e-3, None))
    return np.column_stack(
        [np.log(np.clip(area, 1e-3, None)), ecc, sol, hem, eos, np.log1p(density), np.log(third + 1.0), ratio]
    )


def spot_aggregates(U: np.ndarray, spot: np.ndarray, n_spots: int) -> np.ndarray:
    """Per-spot aggregates of nucleus features: log(1 + count), and the mean and standard deviation of each feature.

    Parameters
    ----------
    U
        Nucleus features ``(m, f)`` (see `nucleus_features`).
    spot
        Row of each nucleus's spot (0 .. n_spots - 1), -1 for nuclei outside every spot.
    n_spots
        Number of spots.

    Returns
    -------
    ``(n_spots, 1 + 2 f)``; NaN means and spreads for spots without nuclei (a spread needs two).
    """
    U = np.asarray(U, dtype=np.float64)
    spot = np.asarray(spot)
    ins = spot >= 0
    count = np.bincount(spot[ins], minlength=n_spots).astype(np.float64)
    s1 = np.zeros((n_spots, U.shape[1]))
    s2 = np.zeros((n_spots, U.shape[1]))
    np.add.at(s1, spot[ins], U[ins])
    np.add.at(s2, spot[ins], U[ins] ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / count[:, None]
        var = s2 / count[:, None] - mean**2
        sd = np.sqrt(np.clip(var, 0, None))
    sd[count < 2] = np.nan
    return np.column_stack([np.log1p(count), mean, sd])


def _softmax(Z: np.ndarray) -> np.ndarray:
    E = np.exp(Z - Z.max(1, keepdims=True))
    return E / E.sum(1, keepdims=True)


def _jsd(P: np.ndarray, Q: np.ndarray) -> float:
    from omx.models._deconv import jsd

    return float(jsd(P, Q).mean())


def _fit_softmax(
    X: np.ndarray, P: np.ndarray, alpha: float, *, max_iter: int, start: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression of soft targets ``P`` on ``X``: mean cross-entropy + ``alpha / 2 ||W||^2``.

    ``start`` is a fit ``(W, b)`` to start from (a warm start along a path of penalties); zeros otherwise.
    """
    from scipy.optimize import minimize

    n, d = X.shape
    K = P.shape[1]

    def loss(theta):
        W, b = theta[: d * K].reshape(d, K), theta[d * K :]
        Q = _softmax(X @ W + b)
        f = -np.sum(P * np.log(np.clip(Q, 1e-300, None))) / n + 0.5 * alpha * np.sum(W * W)
        G = (Q - P) / n
        return f, np.concatenate([(X.T @ G + alpha * W).ravel(), G.sum(0)])

    theta0 = _start(P, d, start)
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return res.x[: d * K].reshape(d, K), res.x[d * K :]


def _start(P: np.ndarray, d: int, start: tuple | None) -> np.ndarray:
    """Flat starting parameters: ``start`` when given, else zero weights and the log mean proportions."""
    if start is not None:
        return np.concatenate([start[0].ravel(), start[1]])
    b0 = np.log(np.clip(P.mean(0), 1e-6, None))
    return np.concatenate([np.zeros(d * P.shape[1]), b0 - b0.mean()])


def _fit_nucleus(
    U: np.ndarray, A: sparse.csr_matrix, P: np.ndarray, alpha: float, *, max_iter: int, start: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over nucleus features whose mean over each spot's nuclei (``A @ Q``) fits the spot's proportions."""
    from scipy.optimize import minimize

    n = P.shape[0]
    d, K = U.shape[1], P.shape[1]
    AT = A.T.tocsr()

    def loss(theta):
        V, c = theta[: d * K].reshape(d, K), theta[d * K :]
        Q = _softmax(U @ V + c)
        M = np.clip(A @ Q, 1e-300, None)
        f = -np.sum(P * np.log(M)) / n + 0.5 * alpha * np.sum(V * V)
        GQ = AT @ (-P / M / n)
        GZ = Q * (GQ - np.sum(Q * GQ, axis=1, keepdims=True))
        return f, np.concatenate([(U.T @ GZ + alpha * V).ravel(), GZ.sum(0)])

    res = minimize(loss, _start(P, d, start), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return res.x[: d * K].reshape(d, K), res.x[d * K :]


def _in_spots(Us: np.ndarray, spot: np.ndarray, n_spots: int):
    """The nuclei that lie in spots, the matrix averaging them per spot (spots with nuclei only), and those spots."""
    ins = np.asarray(spot) >= 0
    A = _mean_matrix(np.asarray(spot)[ins], n_spots)
    has = np.asarray(A.sum(1)).ravel() > 0
    return Us[ins], A[has], has


def _mean_matrix(spot: np.ndarray, n_spots: int) -> sparse.csr_matrix:
    """``(n_spots, m)`` matrix averaging the rows of nuclei with ``spot >= 0`` over their spot."""
    spot = np.asarray(spot)
    cols = np.flatnonzero(spot >= 0)
    rows = spot[cols]
    count = np.bincount(rows, minlength=n_spots).astype(np.float64)
    vals = 1.0 / count[rows]
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_spots, len(spot)))


class CompositionModel:
    """Cell-type proportions from H&E: a spot model, a nucleus classifier learned from label proportions, and their mix.

    See the module docstring for the models. Both are convex or nearly so and fitted by L-BFGS from a zero start,
    so a fit is deterministic.

    Parameters
    ----------
    alpha
        L2 penalty of the spot model; None chooses it from `alphas` by leave-one-group-out cross-validation.
    nucleus_alpha
        L2 penalty of the nucleus classifier; None chooses it from `alphas` likewise.
    weight
        Weight of the spot model in the mix (the nucleus classifier gets ``1 - weight``); None chooses it from
        `weights` by cross-validation. Without nuclei the spot model is used alone.
    alphas
        Penalties tried.
    weights
        Mixing weights tried.
    standardize
        ``"group"``: features standardised per group (section) with its own statistics; ``"global"``: with the
        training statistics; None: as given.
    max_iter
        L-BFGS iterations per fit.
    seed
        Recorded for the caller's bookkeeping; the fits are deterministic and draw no random numbers.

    Attributes
    ----------
    alpha_, nucleus_alpha_, weight_
        The penalties and weight used.
    cv_
        ``{"alpha": {alpha: jsd}, "nucleus_alpha": {...}, "weight": {...}}``: cross-validated mean JSD of each
        candidate (empty when there was one training group).
    uses_nuclei_
        Whether the model was fitted with nuclei.
    """

    def __init__(
        self,
        *,
        alpha: float | None = None,
        nucleus_alpha: float | None = None,
        weight: float | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        standardize: str | None = "group",
        max_iter: int = 500,
        seed: int = 0,
    ):
        for name, value in (("alpha", alpha), ("nucleus_alpha", nucleus_alpha)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if weight is not None and not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {weight}.")
        if len(alphas) == 0 or min(alphas) < 0:
            raise ValueError("alphas must be a non-empty sequence of non-negative values.")
        if len(weights) == 0 or min(weights) < 0 or max(weights) > 1:
            raise ValueError("weights must be a non-empty sequence of values in [0, 1].")
        self.alpha = alpha
        self.nucleus_alpha = nucleus_alpha
        self.weight = weight
        self.alphas = tuple(float(a) for a in alphas)
        self.weights = tuple(float(w) for w in weights)
        self.standardize = standardize
        self.max_iter = int(max_iter)
        self.seed = seed
        self.init_params_ = {
            "alpha": alpha, "nucleus_alpha": nucleus_alpha, "weight": weight, "alphas": list(self.alphas),
            "weights": list(self.weights), "standardize": standardize, "max_iter": self.max_iter, "seed": seed,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"CompositionModel({', '.join(f'{k}={v!r}' for k, v in self.init_params_.items())})"

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _check(X, P, groups, U, spot, nucleus_groups):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (spots x features), got shape {X.shape}.")
        groups = np.asarray(groups if groups is not None else np.zeros(len(X), int))
        if len(groups) != len(X):
            raise ValueError(f"groups has {len(groups)} rows, X {len(X)}.")
        if P is not None:
            P = np.asarray(P, dtype=np.float64)
            if P.shape[0] != X.shape[0] or P.ndim != 2 or P.shape[1] < 2:
                raise ValueError(f"P must be (n_spots, n_types >= 2) with the rows of X {X.shape}, got {P.shape}.")
            if not np.isfinite(P).all() or (P < 0).any():
                raise ValueError("P must hold finite, non-negative proportions.")
            total = P.sum(1, keepdims=True)
            if (total <= 0).any():
                raise ValueError("Every row of P needs a positive sum.")
            P = P / total
        if U is None:
            if spot is not None:
                raise ValueError("`nucleus_spot` was given without nucleus features `U`.")
            return X, P, groups, None, None, None
        U = np.asarray(U, dtype=np.float64)
        spot = np.asarray(spot if spot is not None else np.full(len(U), -1), dtype=np.int64)
        nucleus_groups = np.asarray(nucleus_groups if nucleus_groups is not None else np.zeros(len(U), int))
        if U.ndim != 2 or len(spot) != len(U) or len(nucleus_groups) != len(U):
            raise ValueError(
                f"U must be (n_nuclei, f) with one nucleus_spot and nucleus_group per row; got {U.shape}, "
                f"{len(spot)} and {len(nucleus_groups)}."
            )
        if (spot >= len(X)).any():
            raise ValueError(f"nucleus_spot holds rows beyond the {len(X)} spots.")
        return X, P, groups, U, spot, nucleus_groups

    def _design(self, X, groups, U, spot, nucleus_groups, *, fitting: bool):
        """Standardised spot design (image features and nucleus aggregates) and nucleus features."""
        if U is not None:
            X = np.column_stack([X, spot_aggregates(U, spot, len(X))])
        if fitting:
            self.spot_std_ = GroupStandardizer(self.standardize)
            mean, sd = _nan_stats(X)
            self.spot_std_.mean_ = np.nan_to_num(mean)
            self.spot_std_.scale_ = _safe(sd)
            if U is not None:
                self.nucleus_std_ = GroupStandardizer(self.standardize).fit(U)
        Xs = _standardize(X, groups, self.spot_std_)
        Us = None if U is None else self.nucleus_std_.transform(U, nucleus_groups)
        return Xs, Us

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        X: np.ndarray,
        P: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        U: np.ndarray | None = None,
        nucleus_spot: np.ndarray | None = None,
        nucleus_groups: np.ndarray | None = None,
    ) -> CompositionModel:
        """Fit on training spots with known proportions.

        Parameters
        ----------
        X
            Image features of the spots, ``(n, d)``.
        P
            Their proportions, ``(n, K)`` (rows are normalised to sum to 1).
        groups
            Section of each spot: the unit of per-group standardisation and of the cross-validation.
        U
            Nucleus features ``(m, f)`` (`nucleus_features`), of all nuclei of the training sections; None fits the
            spot model on the image features alone.
        nucleus_spot
            Row of ``X`` holding each nucleus (-1 outside every spot).
        nucleus_groups
            Section of each nucleus (the same labels as ``groups``).

        Returns
        -------
        The fitted model.
        """
        X, P, groups, U, spot, ngroups = self._check(X, P, groups, U, nucleus_spot, nucleus_groups)
        if P is None:
            raise ValueError("P (the training proportions) is required.")
        self.n_types_ = P.shape[1]
        self.n_features_ = X.shape[1]
        self.uses_nuclei_ = U is not None
        self.n_nucleus_features_ = None if U is None else U.shape[1]
        self.cv_ = {}
        labels = pd.unique(groups)
        choose = self.alpha is None or (self.uses_nuclei_ and (self.nucleus_alpha is None or self.weight is None))
        if choose and len(labels) >= 2:
            self._cross_validate(X, P, groups, U, spot, ngroups, labels)
        else:
            if choose:
                logger.info("One training group: no cross-validation; middle penalties and an even mix are used.")
            mid = self.alphas[len(self.alphas) // 2]
            self.alpha_ = mid if self.alpha is None else float(self.alpha)
            self.nucleus_alpha_ = mid if self.nucleus_alpha is None else float(self.nucleus_alpha)
            self.weight_ = (0.5 if self.weight is None else float(self.weight)) if self.uses_nuclei_ else 1.0
        Xs, Us = self._design(X, groups, U, spot, ngroups, fitting=True)
        self.coef_, self.intercept_ = _fit_softmax(Xs, P, self.alpha_, max_iter=self.max_iter)
        if self.uses_nuclei_:
            Uin, A, has = _in_spots(Us, spot, len(X))
            self.nucleus_coef_, self.nucleus_intercept_ = _fit_nucleus(
                Uin, A, P[has], self.nucleus_alpha_, max_iter=self.max_iter
            )
        logger.info(
            "CompositionModel: alpha %g, nucleus alpha %s, spot-model weight %g",
            self.alpha_, self.nucleus_alpha_ if self.uses_nuclei_ else "-", self.weight_,
        )  # fmt: skip
        return self

    def _cross_validate(self, X, P, groups, U, spot, ngroups, labels) -> None:
        """Leave-one-group-out predictions of every candidate; keep the best penalties, then the best weight."""
        alphas = self.alphas if self.alpha is None else (float(self.alpha),)
        nalphas = self.nucleus_alphas_grid()
        oof_spot = {a: np.zeros_like(P) for a in alphas}
        oof_nuc = {a: np.full_like(P, np.nan) for a in nalphas} if self.uses_nuclei_ else {}
        for held in labels:
            tr, te = groups != held, groups == held
            sub = _subset(X, groups, U, spot, ngroups, tr)
            sub_te = _subset(X, groups, U, spot, ngroups, te)
            fold = CompositionModel(standardize=self.standardize, max_iter=self.max_iter)
            Xs, Us = fold._design(*sub, fitting=True)
            Xt, Ut = fold._design(*sub_te, fitting=False)
            fit = None
            for a in sorted(alphas, reverse=True):  # strongest penalty first, each fit starting from the last
                fit = _fit_softmax(Xs, P[tr], a, max_iter=self.max_iter, start=fit)
                oof_spot[a][te] = _softmax(Xt @ fit[0] + fit[1])
            if self.uses_nuclei_:
                Uin, A, has = _in_spots(Us, sub[3], int(tr.sum()))
                Uin_t, At, has_t = _in_spots(Ut, sub_te[3], int(te.sum()))
                fit = None
                for a in sorted(nalphas, reverse=True):
                    fit = _fit_nucleus(Uin, A, P[tr][has], a, max_iter=self.max_iter, start=fit)
                    M = np.full((int(te.sum()), P.shape[1]), np.nan)
                    M[has_t] = At @ _softmax(Uin_t @ fit[0] + fit[1])
                    oof_nuc[a][te] = M

        def score(Q):  # mean over groups of each group's mean JSD
            return float(np.mean([_jsd(P[groups == g], Q[groups == g]) for g in labels]))

        self.cv_["alpha"] = {a: score(Q) for a, Q in oof_spot.items()}
        self.alpha_ = min(self.cv_["alpha"], key=self.cv_["alpha"].get)
        if not self.uses_nuclei_:
            self.nucleus_alpha_, self.weight_ = None, 1.0
            return
        best_spot = oof_spot[self.alpha_]
        self.cv_["nucleus_alpha"] = {a: score(_mix(best_spot, Q, 0.0)) for a, Q in oof_nuc.items()}
        self.nucleus_alpha_ = min(self.cv_["nucleus_alpha"], key=self.cv_["nucleus_alpha"].get)
        weights = self.weights if self.weight is None else (float(self.weight),)
        self.cv_["weight"] = {w: score(_mix(best_spot, oof_nuc[self.nucleus_alpha_], w)) for w in weights}
        self.weight_ = min(self.cv_["weight"], key=self.cv_["weight"].get)

    def nucleus_alphas_grid(self) -> tuple[float, ...]:
        """The nucleus classifier's candidate penalties (``(nucleus_alpha,)`` when it is fixed)."""
        return self.alphas if self.nucleus_alpha is None else (float(self.nucleus_alpha),)

    # ------------------------------------------------------------------ predict
    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError("This CompositionModel is not fitted yet; call fit first.")

    def predict(
        self,
        X: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        U: np.ndarray | None = None,
        nucleus_spot: np.ndarray | None = None,
        nucleus_groups: np.ndarray | None = None,
        parts: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Proportions of spots, rows summing to 1.

        Parameters
        ----------
        X, groups, U, nucleus_spot, nucleus_groups
            As in `fit`, for the spots to predict (whole sections: each is standardised with its own statistics).
            ``U`` is required when the model was fitted with nuclei.
        parts
            Also return the spot model's and the nucleus classifier's predictions (NaN rows for spots without
            nuclei, or everywhere without nuclei).

        Returns
        -------
        ``(n, K)`` proportions, or ``(mixed, spot model, nucleus mean)`` with ``parts=True``.
        """
        self._check_fitted()
        X, _, groups, U, spot, ngroups = self._check(X, None, groups, U, nucleus_spot, nucleus_groups)
        if X.shape[1] != self.n_features_:
            raise ValueError(f"X has {X.shape[1]} features; the model was fitted on {self.n_features_}.")
        if self.uses_nuclei_ and U is None:
            raise ValueError("This model was fitted with nuclei; pass their features `U` and `nucleus_spot`.")
        if not self.uses_nuclei_:
            U = spot = ngroups = None
        Xs, Us = self._design(X, groups, U, spot, ngroups, fitting=False)
        spot_pred = _softmax(Xs @ self.coef_ + self.intercept_)
        nuc = np.full_like(spot_pred, np.nan)
        if self.uses_nuclei_:
            Uin, A, has = _in_spots(Us, spot, len(X))
            nuc[has] = A @ _softmax(Uin @ self.nucleus_coef_ + self.nucleus_intercept_)
        out = _mix(spot_pred, nuc, self.weight_)
        return (out, spot_pred, nuc) if parts else out

    def predict_nuclei(self, U: np.ndarray, *, nucleus_groups: np.ndarray | None = None) -> np.ndarray:
        """Type probabilities of nuclei from their own features, ``(m, K)`` (rows sum to 1).

        Parameters
        ----------
        U
            Nucleus features (`nucleus_features`), whole sections at a time.
        nucleus_groups
            Section of each nucleus (standardisation per section).
        """
        self._check_fitted()
        if not self.uses_nuclei_:
            raise ValueError("This model was fitted without nuclei; it has no nucleus classifier.")
        U = np.asarray(U, dtype=np.float64)
        if U.ndim != 2 or U.shape[1] != self.n_nucleus_features_:
            raise ValueError(f"U must have {self.n_nucleus_features_} columns, got shape {U.shape}.")
        ngroups = np.zeros(len(U), int) if nucleus_groups is None else np.asarray(nucleus_groups)
        Us = self.nucleus_std_.transform(U, ngroups)
        return _softmax(Us @ self.nucleus_coef_ + self.nucleus_intercept_)


def _mix(spot_pred: np.ndarray, nuc: np.ndarray, weight: float) -> np.ndarray:
    """``weight * spot_pred + (1 - weight) * nuc``; the spot model alone in rows where ``nuc`` is missing."""
    has = np.isfinite(nuc).all(1)
    out = spot_pred.copy()
    out[has] = weight * spot_pred[has] + (1 - weight) * nuc[has]
    return out / out.sum(1, keepdims=True)


def _nan_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations over the finite values (NaN for a column with none)."""
    finite = np.where(np.isfinite(X), X, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(finite, axis=0), np.nanstd(finite, axis=0)


def _safe(sd: np.ndarray) -> np.ndarray:
    sd = np.nan_to_num(np.asarray(sd, dtype=np.float64), nan=1.0)
    return np.where(sd > 1e-8, sd, 1.0)


def _standardize(X: np.ndarray, groups: np.ndarray, std: GroupStandardizer) -> np.ndarray:
    """Per-group z-scores that ignore missing values (spots without nuclei); missing values become 0 (the mean)."""
    if std.mode is None:
        out = X.copy()
    elif std.mode == "global":
        out = (X - std.mean_) / std.scale_
    else:
        out = np.empty_like(X)
        for g in pd.unique(groups):
            rows = groups == g
            Xg = X[rows]
            if rows.sum() < MIN_GROUP_ROWS:
                out[rows] = (Xg - std.mean_) / std.scale_
                continue
            mu, sd = _nan_stats(Xg)
            mu = np.where(np.isfinite(mu), mu, std.mean_)
            out[rows] = (Xg - mu) / _safe(sd)
    return np.where(np.isfinite(out), out, 0.0)


def _subset(X, groups, U, spot, ngroups, rows: np.ndarray):
    """The spots ``rows`` (a mask) and the nuclei of their groups, with nucleus spot rows renumbered."""
    Xr, gr = X[rows], groups[rows]
    if U is None:
        return Xr, gr, None, None, None
    new = np.full(len(X), -1, dtype=np.int64)
    new[rows] = np.arange(int(rows.sum()))
    keep = np.isin(ngroups, pd.unique(gr))
    s = spot[keep]
    return Xr, gr, U[keep], np.where(s >= 0, new[np.maximum(s, 0)], -1), ngroups[keep]
