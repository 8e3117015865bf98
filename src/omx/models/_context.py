"""What a model is told about its rows besides X and Y: one explicit object from the caller (`omx.tl` or a user)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

#: The per-row fields of a `Context`, in the order they are checked.
ROW_FIELDS = ("groups", "patients", "coords", "library_size")


@dataclass(frozen=True)
class Context:
    """Everything a model may need about its rows besides the inputs ``X`` and the targets ``Y``.

    `omx.tl` builds one for every :meth:`~omx.models.Model.fit` and :meth:`~omx.models.Model.predict`; a user
    calling a model on arrays passes one too (or the ``groups=`` / ``coords=`` shorthands). A model reads the
    fields it declares in :attr:`~omx.models.Model.uses` and refuses to run without those in
    :attr:`~omx.models.Model.requires`; the others are ignored.

    Parameters
    ----------
    groups
        Section of each row ``(n,)``. Validation splits hold out whole groups, feature models standardise each
        group with its own statistics, spatial models build one neighbour graph per group.
    patients
        Patient of each row ``(n,)``: retrieval never draws on the query's own patient.
    coords
        Spot centres ``(n, 2)`` in microns, for spatial models.
    library_size
        Total counts of each spot over all genes ``(n,)``, for models fitted on counts (``target == "counts"``).
        At prediction it sets the library size of the predictive variance (the training median when omitted).
    group_stats
        Feature statistics of whole groups, ``{group: (mean, std, n_rows)}``, for predicting a group a chunk of
        rows at a time with the same standardisation as the whole group.
    meta
        JSON-able description of the data, given to :meth:`~omx.models.Model.fit` only (genes, target scaling,
        patch geometry, training sections); the model keeps it as ``meta_`` and saves it with its weights.
    """

    groups: np.ndarray | None = None
    patients: np.ndarray | None = None
    coords: np.ndarray | None = None
    library_size: np.ndarray | None = None
    group_stats: Mapping[str, tuple[np.ndarray, np.ndarray, int]] | None = None
    meta: Mapping[str, Any] | None = None

    def given(self) -> set[str]:
        """Names of the fields that are set (not None)."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}

    def checked(self, n: int) -> Context:
        """A copy with every per-row field checked against ``n`` rows and converted (labels to ``str``)."""
        out: dict[str, Any] = {}
        for name in ("groups", "patients"):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value)
            if value.ndim != 1 or len(value) != n:
                raise ValueError(f"`{name}` must hold one label per row ({n}), got shape {value.shape}.")
            out[name] = value.astype(str) if value.dtype == object else value
        if self.coords is not None:
            coords = np.asarray(self.coords, dtype=np.float64)
            if coords.shape != (n, 2) or not np.isfinite(coords).all():
                raise ValueError(f"`coords` must be finite spot centres of shape ({n}, 2), got shape {coords.shape}.")
            out["coords"] = coords
        if self.library_size is not None:
            lib = np.asarray(self.library_size, dtype=np.float64)
            if lib.shape != (n,) or not np.isfinite(lib).all() or (lib <= 0).any():
                raise ValueError(
                    f"`library_size` must hold one positive total count per row ({n}), got shape {lib.shape} "
                    "(or non-positive values: drop spots with no counts)."
                )
            out["library_size"] = lib
        return replace(self, **out)

    def subset(self, rows: np.ndarray) -> Context:
        """The context of a subset of rows (per-row fields indexed; ``group_stats`` and ``meta`` kept)."""
        given = [name for name in ROW_FIELDS if getattr(self, name) is not None]
        return replace(self, **{name: np.asarray(getattr(self, name))[rows] for name in given})
