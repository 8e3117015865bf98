"""Ridge on features, then propagation of its predictions over the spot graph (predict then propagate, APPNP)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from omx._docs import doc_params
from omx._utils import logger, progress
from omx.encoders import Encoder, get_encoder
from omx.metrics import pearson
from omx.models._base import Model
from omx.models._context import Context
from omx.models._neighbors import PROPAGATION_GRID, check_graph, propagate, spatial_graph
from omx.models._ridge import Ridge


@doc_params()
class GraphRidge(Model):
    """A `Ridge` on the features whose predictions are propagated over the graph of neighbouring spots.

    Predict, then propagate (APPNP, Gasteiger et al., ICLR 2019): a `Ridge` on the features (its penalty and rank
    chosen by its own leave-one-section-out CV) predicts every spot, and `n_layers` rounds of personalised-PageRank
    propagation then give each spot ``p <- (1 - a) * p_0 + a * mean of its neighbours' p``. The neighbour share
    ``a`` is chosen from `PROPAGATION_GRID` by leave-one-section-out CV on the training sections (0 keeps the
    ridge alone; with fewer than two sections no propagation is fitted). Each section gets its own graph, built
    from the spot centres in microns with squidpy, so no edge joins two sections. How it compares with the other
    model families on her2st: see "Model families on her2st" in the guide.

    Parameters
    ----------
    {encoder_features}
    {graph}
    {n_neighbors}
    {radius}
    n_layers
        Rounds of propagation; 0 is the ridge alone.
    seed
        Seed of the ridge's cross-validation folds (used without groups).
    device
        Unused (numpy); accepted for a uniform interface.
    show_progress_bar
        Show a progress bar over the cross-validation folds.

    Attributes
    ----------
    ridge_
        The fitted `Ridge`.
    propagation_
        The neighbour share of the propagation (0: the ridge alone).
    history_
        ``"propagation"``: the grid of shares; ``"cv_pearson"``: the cross-validated mean per-gene Pearson r of each.

    Examples
    --------
    >>> import numpy as np
    >>> from omx.models import GraphRidge
    >>> rng = np.random.default_rng(0)
    >>> coords = np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2) * 100.0
    >>> X = rng.normal(size=(144, 8))
    >>> Y = X[:, :2] + 0.1 * rng.normal(size=(144, 2))
    >>> model = GraphRidge(show_progress_bar=False).fit(X, Y, coords=coords)
    >>> model.predict(X, coords=coords).shape
    (144, 2)
    """

    input = "features"
    target = "log"
    uses = frozenset({"groups", "coords", "group_stats"})
    requires = frozenset({"coords"})

    def __init__(
        self,
        *,
        encoder: str | Encoder | Any = "handcrafted",
        graph: Literal["knn", "radius", "delaunay"] = "knn",
        n_neighbors: int = 6,
        radius: float | None = None,
        n_layers: int = 2,
        seed: int = 0,
        device: str = "auto",
        show_progress_bar: bool = True,
    ):
        check_graph(graph, n_neighbors, radius)
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}.")
        self.encoder = get_encoder(encoder)
        self.graph = graph
        self.n_neighbors = int(n_neighbors)
        self.radius = None if radius is None else float(radius)
        self.n_layers = int(n_layers)
        super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)

    def _neighbours(self, coords: np.ndarray, groups: np.ndarray | None):
        """The spot graph without self loops: what each spot's propagation averages over."""
        return spatial_graph(
            coords, groups, kind=self.graph, n_neighbors=self.n_neighbors, radius=self.radius, self_loops=False
        )

    def _ridge(self, **overrides: Any) -> Ridge:
        return Ridge(encoder=self.encoder, seed=self.seed, show_progress_bar=False, **overrides)

    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        """Fit the ridge on all rows, then choose the neighbour share by leave-one-section-out CV."""
        groups, coords = context.groups, context.coords
        self._neighbours(coords, groups)  # check the graph first (isolated spots, one-spot sections)
        self.ridge_ = self._ridge().fit(X, Y, groups=groups)
        labels = np.unique(groups) if groups is not None else []
        scores = np.zeros((len(labels), len(PROPAGATION_GRID)))
        if len(labels) >= 2 and self.n_layers > 0:
            fixed = {"alpha": self.ridge_.alpha_, "n_components": self.ridge_.n_components_}
            for i, label in enumerate(progress(labels, show=self.show_progress_bar, desc="GraphRidge CV")):
                held = groups == label
                fold = self._ridge(**fixed).fit(X[~held], Y[~held], groups=groups[~held])
                P0 = fold.predict(X[held], groups=groups[held])
                nbrs = self._neighbours(coords[held], groups[held])
                for j, share in enumerate(PROPAGATION_GRID):
                    scores[i, j] = np.nanmean(pearson(Y[held], propagate(P0, nbrs, share, self.n_layers)))
            self.propagation_ = float(PROPAGATION_GRID[int(np.argmax(scores.mean(0)))])
        else:
            self.propagation_ = 0.0
            logger.info("GraphRidge: fewer than 2 sections, so no propagation is fitted (the ridge alone).")
        self.history_ = {"propagation": list(PROPAGATION_GRID), "cv_pearson": scores.mean(0).tolist()}
        logger.info("GraphRidge: neighbour share %.2f chosen by leave-one-section-out CV.", self.propagation_)

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        P0 = self.ridge_.predict(X, Context(groups=context.groups, group_stats=context.group_stats))
        return propagate(P0, self._neighbours(context.coords, context.groups), self.propagation_, self.n_layers)

    # ------------------------------------------------------------------ state
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        ridge_state, ridge_arrays = self.ridge_._export_state("ridge.")
        return {"propagation_": self.propagation_, "ridge": ridge_state}, ridge_arrays

    def _set_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.propagation_ = state["propagation_"]
        self.ridge_ = self._ridge()._restore_state(
            state["ridge"], arrays, "ridge.", n_targets=self.n_targets_, n_features_in=self.n_features_in_
        )
