"""Per-group standardisation of image features: one object, fitted, applied, saved and loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

#: Groups with fewer rows than this are standardised with the training set's global statistics.
MIN_GROUP_ROWS = 5


class GroupStandardizer:
    """Z-scores of features, per group (section) with each group's own statistics, or globally.

    Standardising each group with its own mean and standard deviation uses only the images, not the expression, so
    it is leakage-free, and it removes the stain and scanner differences between sections. A group's own rows give
    its statistics, so pass whole groups; groups of fewer than `MIN_GROUP_ROWS` rows (and rows without groups, with
    fewer) fall back to the statistics fitted on the training rows. A group predicted a chunk of rows at a time
    takes the statistics of the whole group from ``group_stats`` (see `omx.models.Context`).

    Parameters
    ----------
    mode
        ``"group"`` (per group, as above), ``"global"`` (the fitted training mean and standard deviation) or None
        (features as given).

    Attributes
    ----------
    mean_
        Mean of each feature over the training rows.
    scale_
        Their standard deviation, with (near-)constant features set to 1 (they standardise to 0).
    """

    def __init__(self, mode: Literal["group", "global"] | None = "group"):
        if mode not in ("group", "global", None):
            raise ValueError(f"standardize must be 'group', 'global' or None, got {mode!r}.")
        self.mode = mode

    def fit(self, X: np.ndarray) -> GroupStandardizer:
        """Fit the global statistics (the fallback of small groups) on the training features ``(n, d)``."""
        self.mean_ = X.mean(0)
        self.scale_ = safe_scale(X.std(0))
        return self

    def transform(
        self,
        X: np.ndarray,
        groups: np.ndarray | None = None,
        group_stats: Mapping[str, tuple[np.ndarray, np.ndarray, int]] | None = None,
    ) -> np.ndarray:
        """Standardised copy of the features ``X`` ``(n, d)``.

        Parameters
        ----------
        X
            Features.
        groups
            Group of each row; None is one group.
        group_stats
            ``{group: (mean, std, n_rows)}`` of whole groups whose rows come in chunks; other groups use the
            statistics of their rows here.

        Returns
        -------
        The standardised features, float64.
        """
        if self.mode is None:
            return X.copy()
        out = (X - self.mean_) / self.scale_
        if self.mode == "global":
            return out
        labels, inverse = (
            (np.array([0]), np.zeros(len(X), int)) if groups is None else np.unique(groups, return_inverse=True)
        )
        group_stats = group_stats or {}
        for k, label in enumerate(labels):
            rows = inverse == k
            if str(label) in group_stats:
                mu, sd, n = group_stats[str(label)]
            else:
                mu, sd, n = X[rows].mean(0), X[rows].std(0), int(rows.sum())
            if n >= MIN_GROUP_ROWS:
                out[rows] = (X[rows] - mu) / safe_scale(np.asarray(sd))
        return out

    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted statistics, as arrays to save (``{"mean": ..., "scale": ...}``)."""
        return {"mean": self.mean_, "scale": self.scale_}

    def set_state(self, state: Mapping[str, np.ndarray]) -> GroupStandardizer:
        """Restore the statistics of `get_state`."""
        self.mean_, self.scale_ = np.asarray(state["mean"]), np.asarray(state["scale"])
        return self


def safe_scale(std: np.ndarray) -> np.ndarray:
    """Standard deviations with (near-)constant features set to 1, so that they standardise to 0."""
    return np.where(std > 1e-12, std, 1.0)
