"""Ridge regression from image features to expression, with per-section standardisation and CV-chosen alpha."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from omx._utils import logger, progress
from omx.encoders import Encoder, get_encoder
from omx.metrics import pearson
from omx.models._base import Model
from omx.models._context import Context
from omx.models._standardize import GroupStandardizer

#: Default alpha grid (penalty per row, on standardised features).
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-4, 2, 13))
#: Numbers of target components searched with ``n_components="auto"`` (None: the genes themselves).
N_COMPONENTS_GRID = (5, 10, 20, 50, None)


class Ridge(Model):
    """Ridge regression on patch features (linear probing, as in the HEST benchmark), solved in closed form.

    The loss is ``||Y - X W||^2 / n + alpha * ||W||^2`` on standardised features, with an intercept.

    Standardisation per group (``standardize="group"``) z-scores the features of each group (section) with
    that group's own mean and standard deviation. It uses only the images, not the expression, so it is
    leakage-free, and it removes the stain and scanner differences between sections. At prediction time a
    section's own features give its standardisation, so pass whole sections (with `groups`), not a handful
    of spots; groups of fewer than 5 rows fall back to the training set's global statistics
    (`~omx.models.GroupStandardizer`).

    With ``alpha=None`` the penalty is chosen from `alphas`, and with ``n_components="auto"`` the number of
    target components too, by cross-validation that maximises the mean per-gene Pearson r on held-out rows:
    leave-one-group-out when `groups` holds two or more groups, otherwise shuffled 5-fold (scikit-learn's
    `~sklearn.model_selection.LeaveOneGroupOut` and `~sklearn.model_selection.KFold` with ``random_state=seed``).
    Each fold takes one SVD and scans every alpha and every number of components from it.

    How it compares with the other model families on her2st, and what its options add there: see "Model families
    on her2st" in the guide.

    Parameters
    ----------
    encoder
        The encoder that makes the features (``"handcrafted"``, an `~omx.encoders.Encoder` or a torch module).
        The model itself takes features; callers such as `omx.tl` encode patches with ``model.encoder``.
    alpha
        Penalty per row; None chooses it by cross-validation.
    n_components
        Fit the ridge to this many principal components of the training targets (denoises many-gene targets)
        and map back to genes; None fits the genes directly; ``"auto"`` chooses among 5, 10, 20, 50 and None
        by the same cross-validation as alpha.
    standardize
        ``"group"`` (per group, see above), ``"global"`` (training mean and std) or None (features as given).
    alphas
        Grid searched when `alpha` is None.
    seed
        Seed of the shuffled K-fold split (used without groups).
    device
        Unused (numpy); accepted for a uniform interface.
    show_progress_bar
        Show a progress bar over the cross-validation folds.

    Attributes
    ----------
    standardizer_
        The fitted feature standardisation (`~omx.models.GroupStandardizer`).
    alpha_
        The penalty used.
    n_components_
        The number of target components used (None: genes directly).
    coef_
        Coefficients ``(d, g)`` on standardised features (through the components when `n_components` is set).
    intercept_
        Target means ``(g,)``.
    components_
        Principal axes of the targets ``(n_components, g)``, or None.
    history_
        ``"alpha"`` and ``"n_components"``: the grids; ``"cv_pearson"``: mean per-gene Pearson r over the folds,
        one row per number of components, one column per alpha.

    Examples
    --------
    >>> import numpy as np
    >>> from omx.models import Ridge
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 10))
    >>> Y = X[:, :3] + 0.1 * rng.normal(size=(200, 3))
    >>> model = Ridge(show_progress_bar=False).fit(X, Y)
    >>> model.predict(X).shape
    (200, 3)
    """

    input = "features"
    target = "log"
    uses = frozenset({"groups", "group_stats"})

    def __init__(
        self,
        *,
        encoder: str | Encoder | Any = "handcrafted",
        alpha: float | None = None,
        n_components: int | Literal["auto"] | None = "auto",
        standardize: Literal["group", "global"] | None = "group",
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        seed: int = 0,
        device: str = "auto",
        show_progress_bar: bool = True,
    ):
        if standardize not in ("group", "global", None):
            raise ValueError(f"standardize must be 'group', 'global' or None, got {standardize!r}.")
        if alpha is not None and alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        if n_components not in (None, "auto") and (not isinstance(n_components, int) or n_components < 1):
            raise ValueError(f"n_components must be a positive integer, 'auto' or None, got {n_components!r}.")
        if len(alphas) == 0 or min(alphas) < 0:
            raise ValueError("alphas must be a non-empty sequence of non-negative values.")
        self.encoder = get_encoder(encoder)
        self.alpha = None if alpha is None else float(alpha)
        self.n_components = n_components
        self.standardize = standardize
        self.alphas = tuple(float(a) for a in alphas)
        super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)

    # ------------------------------------------------------------------ fit / predict
    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        groups = context.groups
        self.standardizer_ = GroupStandardizer(self.standardize).fit(X)
        # group_stats at fit: rows that summarise finer units (super-resolution) take the units' statistics
        Z = self.standardizer_.transform(X, groups, context.group_stats)
        Yd = Y.astype(np.float64)
        if self.alpha is None or self.n_components == "auto":
            self.alpha_, self.n_components_ = self._select(Z, Yd, groups)
        else:
            self.alpha_, self.n_components_ = self.alpha, self.n_components
        self.z_mean_, self.coef_, self.intercept_, self.components_ = _fit_ridge(
            Z, Yd, [self.alpha_], self.n_components_
        )
        self.coef_ = self.coef_[0]

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        return self._predict_standardised(self.standardizer_.transform(X, context.groups, context.group_stats))

    def _predict_standardised(self, Z: np.ndarray) -> np.ndarray:
        """Predictions from features already standardised as `standardizer_` does."""
        return (Z - self.z_mean_) @ self.coef_ + self.intercept_

    def _select(self, Z: np.ndarray, Y: np.ndarray, groups: np.ndarray | None) -> tuple[float, int | None]:
        """Choose alpha (and the number of target components) by cross-validated mean per-gene Pearson r."""
        alphas = self.alphas if self.alpha is None else (self.alpha,)
        ranks = N_COMPONENTS_GRID if self.n_components == "auto" else (self.n_components,)
        from sklearn.model_selection import KFold, LeaveOneGroupOut

        n = len(Z)
        if groups is not None and len(np.unique(groups)) >= 2:
            splits = list(LeaveOneGroupOut().split(Z, groups=groups))
            kind = f"leave-one-group-out ({len(splits)} groups)"
        else:
            k = min(5, n)
            if k < 2:
                return alphas[len(alphas) // 2], ranks[-1]
            splits = list(KFold(n_splits=k, shuffle=True, random_state=self.seed).split(Z))
            kind = f"{k}-fold"
        folds = [np.isin(np.arange(n), held) for _, held in splits]
        scores = np.full((len(folds), len(ranks), len(alphas)), np.nan)
        for f, val in enumerate(progress(folds, show=self.show_progress_bar, desc="Ridge CV", unit="fold")):
            # Ridge is linear in the targets: fitting to the top-k target components equals projecting the
            # full-gene prediction onto them, so one fit per fold serves every rank.
            z_mean, coefs, intercept, _ = _fit_ridge(Z[~val], Y[~val], alphas, None)
            _, _, axes = np.linalg.svd(Y[~val] - intercept, full_matrices=False)
            Zv = Z[val] - z_mean
            for a, coef in enumerate(coefs):
                centred = Zv @ coef
                for r_i, rank in enumerate(ranks):
                    proj = centred if rank is None else centred @ axes[:rank].T @ axes[:rank]
                    r = pearson(Y[val], proj + intercept)
                    scores[f, r_i, a] = np.nanmean(r) if np.isfinite(r).any() else np.nan
        mean = np.nanmean(np.where(np.isnan(scores).all(0, keepdims=True), -np.inf, scores), axis=0)
        self.history_ = {
            "alpha": list(alphas),
            "n_components": [None if r is None else int(r) for r in ranks],
            "cv_pearson": mean.tolist(),
        }
        r_best, a_best = np.unravel_index(int(np.argmax(mean)), mean.shape)
        logger.info(
            "Ridge: alpha=%g, n_components=%s chosen by %s CV (mean Pearson r %.3f).",
            alphas[a_best], ranks[r_best], kind, mean[r_best, a_best],
        )  # fmt: skip
        return alphas[a_best], ranks[r_best]

    # ------------------------------------------------------------------ state
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        standardizer = self.standardizer_.get_state()
        arrays = {
            "x_mean": standardizer["mean"],
            "x_scale": standardizer["scale"],
            "z_mean": self.z_mean_,
            "coef": self.coef_,
            "intercept": self.intercept_,
        }
        if self.components_ is not None:
            arrays["components"] = self.components_
        return {"alpha_": self.alpha_, "n_components_": self.n_components_}, arrays

    def _set_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.alpha_ = state["alpha_"]
        self.n_components_ = state.get("n_components_")
        self.standardizer_ = GroupStandardizer(self.standardize).set_state(
            {"mean": arrays["x_mean"], "scale": arrays["x_scale"]}
        )
        self.z_mean_ = arrays["z_mean"]
        self.coef_, self.intercept_ = arrays["coef"], arrays["intercept"]
        self.components_ = arrays.get("components")


def _fit_ridge(
    Z: np.ndarray, Y: np.ndarray, alphas: Sequence[float], n_components: int | None
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray | None]:
    """Ridge with intercept for every alpha from one SVD; return (feature mean, [coef (d, g)], target mean, axes)."""
    n = len(Z)
    z_mean = Z.mean(0)
    y_mean = Y.mean(0)
    Yc = Y - y_mean
    components = None
    if n_components is not None:
        _, _, vt = np.linalg.svd(Yc, full_matrices=False)
        components = vt[: min(n_components, len(vt))]
        Yc = Yc @ components.T
    U, s, Vt = np.linalg.svd(Z - z_mean, full_matrices=False)
    UtY = U.T @ Yc
    coefs = []
    for alpha in alphas:
        d = s / (s**2 + n * alpha) if alpha > 0 else np.divide(1.0, s, out=np.zeros_like(s), where=s > 1e-10 * s.max())
        coef = Vt.T @ (d[:, None] * UtY)
        coefs.append(coef @ components if components is not None else coef)
    return z_mean, coefs, y_mean, components
