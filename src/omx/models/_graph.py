"""Spatial graph model (Hist2ST / THItoGene family): message passing over the spot graph, MSE or count heads."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse

from omx._utils import logger, progress, seed_everything
from omx.encoders import Encoder, get_encoder
from omx.metrics import pearson
from omx.models._base import TorchModel
from omx.models._context import Context
from omx.models._standardize import GroupStandardizer

if TYPE_CHECKING:
    import torch

#: Graph kinds accepted by `SpatialGraph` (`graph=`).
GRAPHS = ("knn", "radius", "delaunay")
#: Message passing layers accepted by `SpatialGraph` (`conv=`).
CONVS = ("gcn", "attention")
#: Heads accepted by `SpatialGraph` (`likelihood=`).
LIKELIHOODS = ("mse", "nb", "zinb")
#: Per-spot predictors accepted by `SpatialGraph` (`predictor=`).
PREDICTORS = ("auto", "ridge", "mlp")
#: Shares of a spot's propagated prediction that come from its neighbours, tried with ``predictor="ridge"``.
PROPAGATION_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
#: Scale of count-model predictions: log1p(counts / library size * TARGET_SUM).
TARGET_SUM = 1e4
#: Spots whose predictions are computed together at prediction time (each with its k-hop halo).
PREDICT_CHUNK = 8192


class SpatialGraph(TorchModel):
    """Message passing over the graph of neighbouring spots, from encoder features to expression.

    Two per-spot predictors (``predictor=``), both followed by message passing over the spot graph:

    - ``"ridge"`` (the default with ``likelihood="mse"``): predict, then propagate (APPNP, Gasteiger et al.,
      ICLR 2019). A `Ridge` on the features (its penalty and rank chosen by leave-one-section-out CV) predicts
      every spot; `n_layers` rounds of personalised-PageRank propagation then give each spot
      ``p <- (1 - a) * p_0 + a * mean of its neighbours' p``, where the neighbour share ``a`` is chosen by
      leave-one-section-out CV on the training sections from `PROPAGATION_GRID` (0 keeps the ridge alone). On
      her2st it raised the held-out mean per-gene Pearson r of the same ridge from 0.165 to 0.167 (C sections).
    - ``"mlp"`` (the default with count likelihoods): the network described below, trained end to end.

    Each section (group) gets its own graph, built from the spot centres in microns with squidpy
    (`squidpy.gr.spatial_neighbors_knn`, ``_radius`` or ``_delaunay`` on a small AnnData per section), so no
    edge joins two sections. Every spot also links to itself. Features are z-scored within each section (as in
    `Ridge`), pass through a two-layer MLP (LayerNorm, GELU, dropout) and then `n_layers` residual graph layers
    ``h <- h + dropout(gelu(norm(W aggregate(h))))``: ``conv="gcn"`` takes the mean over the spot and its
    neighbours, ``conv="attention"`` a single-head GAT-style attention-weighted sum. ``n_layers=0`` gives the
    same network without the graph (a plain MLP on each spot), the baseline a graph must beat.

    Heads:

    - ``likelihood="mse"``: mean squared error on the targets standardised per column (what `omx.tl` passes:
      log-normalised expression standardised within each training section); predictions come back on the
      scale of the targets.
    - ``likelihood="nb"`` / ``"zinb"``: the targets are raw counts (``target == "counts"``) and :meth:`fit` takes
      ``Context(library_size=...)`` (total counts of each spot over all genes; the row sums of the counts when
      omitted). The mean is ``mu = library_size * exp(eta)`` with a per-gene dispersion (and, for ZINB, a per-spot
      dropout logit). Predictions are ``log1p(1e4 * exp(eta))``, the log-normalised expression at the predicted
      rate, so they are on the scale `omx.tl` writes. ``predict(..., return_var=True)`` also returns the variance
      of ``log1p(1e4 * x / library_size)`` for counts ``x`` drawn from the fitted NB (or ZINB) at each spot's
      library size (``Context(library_size=...)``, the training median when omitted: an H&E-only section has no
      measured library size), estimated from `n_samples` Monte Carlo draws: the spread of a measurement around
      the prediction, counting noise included (larger at low counts and for noisy genes).

    Training and prediction run on subgraphs, so a section of any size fits in memory: spots are cut into
    spatial tiles of about `tile_size` spots, each step takes `batch_size` tiles and their full
    ``n_layers``-hop neighbourhood (the halo), and the loss covers the tile spots only. With the full halo each
    tile spot's output equals its output on the whole graph (mean aggregation uses whole-graph degrees), so
    subgraph training is exact, not an approximation. ``tile_size=1`` samples spots at random.

    Early stopping follows the mean per-gene Pearson r on held-out validation groups (whole sections when
    `groups` holds two or more), and the weights of the best epoch are kept; with ``refit=True`` the network
    is then trained again from scratch on all rows for that many epochs.

    Parameters
    ----------
    encoder
        The encoder whose features the model takes (``"handcrafted"``, an `~omx.encoders.Encoder` or a torch
        module); callers such as `omx.tl` encode patches with ``model.encoder``.
    graph
        ``"knn"`` (the `n_neighbors` nearest spots), ``"radius"`` (all spots within `radius` microns) or
        ``"delaunay"`` (Delaunay triangulation, optionally cut at `radius`).
    n_neighbors
        Neighbours per spot for ``graph="knn"`` (fewer in a section with fewer spots).
    radius
        Radius in microns for ``graph="radius"`` (required) and ``graph="delaunay"`` (optional cut).
    conv
        ``"gcn"`` (normalised mean aggregation) or ``"attention"`` (GAT-style).
    n_layers
        Graph layers; 0 is the MLP alone.
    hidden
        Width of the MLP and graph layers.
    dropout
        Dropout after each hidden layer.
    likelihood
        ``"mse"``, ``"nb"`` (negative binomial) or ``"zinb"`` (zero-inflated negative binomial).
    predictor
        ``"ridge"`` (predict then propagate; ``likelihood="mse"`` only), ``"mlp"`` (the trained network) or
        ``"auto"``: ridge for ``"mse"``, the network for the count likelihoods. With ``"ridge"``, `n_layers` is
        the number of propagation rounds and the network's parameters (`conv`, `hidden`, `epochs`, ...) are unused.
    epochs
        Maximum number of epochs.
    tile_size
        Spots per spatial tile (1: single spots).
    batch_size
        Tiles per step (at least 2).
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay (L2).
    patience
        Epochs without a better validation Pearson r before stopping; 0 or None trains all `epochs`.
    val_fraction
        Share of rows for validation (whole groups when there are two or more); 0 disables early stopping.
    refit
        After early stopping, train again on all rows (validation included) for the best number of epochs.
    n_samples
        Monte Carlo samples per spot for the predictive variance of the count heads.
    seed
        Seed of initialisation, splits, tiles, shuffling, dropout and sampling.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``; mixed precision on CUDA.
    show_progress_bar
        Show a progress bar over epochs.

    Attributes
    ----------
    module_
        The trained network.
    history_
        ``"train_loss"``, ``"val_loss"`` and ``"val_score"`` (validation mean Pearson r) per epoch.
    best_epoch_
        Epoch (from 0) whose weights were kept.
    library_size_
        Median library size of the training spots (count heads), used at prediction when none is given.

    Examples
    --------
    >>> import numpy as np
    >>> from omx.models import SpatialGraph
    >>> rng = np.random.default_rng(0)
    >>> coords = np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2) * 100.0
    >>> X = rng.normal(size=(144, 8))
    >>> Y = X[:, :2] + 0.1 * rng.normal(size=(144, 2))
    >>> model = SpatialGraph(epochs=2, show_progress_bar=False).fit(X, Y, coords=coords)
    >>> model.predict(X, coords=coords).shape
    (144, 2)
    """

    input = "features"
    uses = frozenset({"groups", "coords", "library_size"})
    requires = frozenset({"coords"})

    def __init__(
        self,
        *,
        encoder: str | Encoder | Any = "handcrafted",
        graph: Literal["knn", "radius", "delaunay"] = "knn",
        n_neighbors: int = 6,
        radius: float | None = None,
        conv: Literal["gcn", "attention"] = "gcn",
        n_layers: int = 2,
        hidden: int = 256,
        dropout: float = 0.2,
        likelihood: Literal["mse", "nb", "zinb"] = "mse",
        predictor: Literal["auto", "ridge", "mlp"] = "auto",
        epochs: int = 100,
        tile_size: int = 16,
        batch_size: int = 16,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        patience: int | None = 10,
        val_fraction: float = 0.2,
        refit: bool = False,
        n_samples: int = 64,
        seed: int = 0,
        device: str = "auto",
        show_progress_bar: bool = True,
    ):
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}.")
        if graph == "radius" and (radius is None or radius <= 0):
            raise ValueError("graph='radius' needs `radius=` (microns, > 0), e.g. 1.5 x the spot spacing.")
        if radius is not None and radius <= 0:
            raise ValueError(f"radius must be > 0 microns, got {radius}.")
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}.")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}.")
        if predictor == "ridge" and likelihood != "mse":
            raise ValueError("predictor='ridge' fits log-normalised targets: use likelihood='mse', or predictor='mlp'.")
        if n_neighbors < 1 or n_layers < 0 or hidden < 1 or tile_size < 1 or batch_size < 2 or epochs < 1:
            raise ValueError(
                "n_neighbors, hidden, tile_size and epochs must be >= 1, n_layers >= 0 and batch_size >= 2."
            )
        if not 0 <= dropout < 1 or not 0 <= val_fraction < 1:
            raise ValueError("dropout and val_fraction must be in [0, 1).")
        self.encoder = get_encoder(encoder)
        self.graph = graph
        self.n_neighbors = int(n_neighbors)
        self.radius = None if radius is None else float(radius)
        self.conv = conv
        self.n_layers = int(n_layers)
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.likelihood = likelihood
        self.predictor = predictor
        self.epochs = int(epochs)
        self.tile_size = int(tile_size)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.patience = None if patience is None else int(patience)
        self.val_fraction = float(val_fraction)
        self.refit = bool(refit)
        self.n_samples = int(n_samples)
        super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)

    @property
    def uses_ridge(self) -> bool:
        """Whether the per-spot predictor is a ridge regression (predict then propagate)."""
        return self.predictor == "ridge" or (self.predictor == "auto" and self.likelihood == "mse")

    @property
    def target(self) -> str:
        """``"counts"`` with a count likelihood (raw counts and library sizes), else ``"log"``."""
        return "log" if self.likelihood == "mse" else "counts"

    @property
    def provides_variance(self) -> bool:
        """Whether ``predict(..., return_var=True)`` gives a predictive variance (count likelihoods)."""
        return self.likelihood != "mse"

    def _variance_hint(self) -> str:
        return " The predictive variance needs a count likelihood (likelihood='nb' or 'zinb')."

    # ------------------------------------------------------------------ graph
    def _build_graph(self, coords: np.ndarray, groups: np.ndarray | None) -> sparse.csr_matrix:
        """Adjacency (CSR, self loops, symmetric, block diagonal over groups) of the spots."""
        import warnings

        import anndata as ad
        import squidpy as sq
        from spatialdata._logging import logger as sd_logger  # squidpy logs each graph through it

        n = len(coords)
        labels, inverse = (
            (np.array(["all"]), np.zeros(n, int)) if groups is None else np.unique(groups, return_inverse=True)
        )
        blocks = []
        for k, label in enumerate(labels):
            rows = np.flatnonzero(inverse == k)
            if len(rows) < 2:
                raise ValueError(
                    f"Section {str(label)!r} has one spot; a spatial graph needs at least 2 spots per section. "
                    "Drop that section or pass it together with its neighbours."
                )
            adata = ad.AnnData(obs={"i": np.arange(len(rows))})
            adata.obsm["spatial"] = coords[rows]
            with warnings.catch_warnings(), _quiet(sd_logger):
                warnings.simplefilter("ignore")
                if self.graph == "knn":
                    sq.gr.spatial_neighbors_knn(adata, n_neighs=min(self.n_neighbors, len(rows) - 1))
                elif self.graph == "radius":
                    sq.gr.spatial_neighbors_radius(adata, radius=self.radius)
                else:
                    if len(rows) < 3:
                        raise ValueError(f"Section {str(label)!r} has {len(rows)} spots; Delaunay needs 3 or more.")
                    try:
                        sq.gr.spatial_neighbors_delaunay(adata, radius=self.radius)
                    except Exception as err:  # noqa: BLE001 - qhull raises its own error types
                        raise ValueError(f"Delaunay triangulation of section {str(label)!r} failed: {err}") from err
            A = sparse.csr_matrix(adata.obsp["spatial_connectivities"])
            A = (A + A.T).tocsr()
            A.setdiag(0)
            A.eliminate_zeros()
            isolated = np.flatnonzero(np.diff(A.indptr) == 0)
            if len(isolated):
                spacing = _median_spacing(coords[rows])
                raise ValueError(
                    f"{len(isolated)} of {len(rows)} spots of section {str(label)!r} have no neighbour "
                    f"(graph={self.graph!r}, radius={self.radius}), e.g. rows {rows[isolated[:5]].tolist()}. "
                    f"Use a larger `radius` (the median nearest-neighbour distance is {spacing:.3g} microns) or "
                    "graph='knn' with `n_neighbors`."
                )
            blocks.append((rows, A))
        data, ri, ci = [], [], []
        for rows, A in blocks:
            coo = A.tocoo()
            ri.append(rows[coo.row])
            ci.append(rows[coo.col])
        ri.append(np.arange(n))
        ci.append(np.arange(n))
        ri, ci = np.concatenate(ri), np.concatenate(ci)
        data = np.ones(len(ri), dtype=np.float32)
        adj = sparse.csr_matrix((data, (ri, ci)), shape=(n, n))
        adj.data[:] = 1.0
        return adj

    def _tiles(self, coords: np.ndarray, groups: np.ndarray | None, rows: np.ndarray) -> list[np.ndarray]:
        """Cut ``rows`` into spatial tiles of about `tile_size` spots (square cells, per group)."""
        if self.tile_size == 1:
            return [rows[i : i + 1] for i in range(len(rows))]
        g = np.zeros(len(rows), int) if groups is None else np.unique(groups[rows], return_inverse=True)[1]
        keys = np.empty((len(rows), 3), dtype=np.int64)
        keys[:, 0] = g
        for k in np.unique(g):
            m = g == k
            c = coords[rows[m]]
            side = np.sqrt(self.tile_size) * _median_spacing(c)
            keys[m, 1:] = np.floor((c - c.min(0)) / side).astype(np.int64)
        _, tile_of = np.unique(keys, axis=0, return_inverse=True)
        tile_of = tile_of.ravel()
        order = np.argsort(tile_of, kind="stable")
        bounds = np.flatnonzero(np.diff(tile_of[order])) + 1
        return np.split(rows[order], bounds)

    def _subgraph(self, adj: sparse.csr_matrix, deg: np.ndarray, seeds: np.ndarray, device) -> tuple:
        """Nodes within `n_layers` hops of `seeds`, their edges, and the seeds' positions among the nodes."""
        import torch

        mask = np.zeros(adj.shape[0], bool)
        mask[seeds] = True
        for _ in range(self.n_layers):
            mask[adj[np.flatnonzero(mask)].indices] = True
        nodes = np.flatnonzero(mask)
        sub = adj[nodes][:, nodes].tocoo()
        dst = torch.as_tensor(sub.row, dtype=torch.long, device=device)
        src = torch.as_tensor(sub.col, dtype=torch.long, device=device)
        weight = torch.as_tensor(1.0 / deg[nodes[sub.row]], dtype=torch.float32, device=device)
        pos = torch.as_tensor(np.searchsorted(nodes, seeds), dtype=torch.long, device=device)
        return nodes, (src, dst, weight), pos

    # ------------------------------------------------------------------ fit / predict
    def _standardise(self, X: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        return self.standardizer_.transform(X, groups).astype(np.float32)

    def _build(self, n_features: int, n_targets: int) -> torch.nn.Module:
        return _GraphNet(
            n_features, n_targets, hidden=self.hidden, n_layers=self.n_layers, conv=self.conv,
            dropout=self.dropout, likelihood=self.likelihood,
        )  # fmt: skip

    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        groups, coords = context.groups, context.coords
        if self.uses_ridge:
            self._fit_ridge(X, Y, groups, coords)
            return
        import torch

        device = self._torch_device()
        seed_everything(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        adj = self._build_graph(coords, groups)
        deg = np.asarray(adj.sum(1)).ravel()
        self.standardizer_ = GroupStandardizer().fit(X)
        feats = torch.from_numpy(self._standardise(X, groups))
        train_rows, val_rows = self._validation_split(len(X), groups, self.val_fraction, rng)

        if self.target == "counts":
            lib = context.library_size
            if lib is None:  # the row sums of the counts
                lib = Y.astype(np.float64).sum(1)
                if (lib <= 0).any():
                    raise ValueError(
                        f"{int((lib <= 0).sum())} rows have no counts: drop them, or pass `Context(library_size=...)`."
                    )
            self.library_size_ = float(np.median(lib))
            rate = Y / lib[:, None]
            self.target_mean_ = np.log(np.maximum(rate[train_rows].mean(0), 1e-8)).astype(np.float32)
            self.target_std_ = np.ones(Y.shape[1], np.float32)
            y_score = np.log1p(TARGET_SUM * rate).astype(np.float32)
            target = torch.from_numpy(np.asarray(Y, np.float32))
            log_lib = torch.from_numpy(np.log(lib).astype(np.float32))
        else:
            self.target_mean_ = Y[train_rows].mean(0)
            std = Y[train_rows].std(0)
            self.target_std_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)
            y_score = Y
            target = torch.from_numpy(((Y - self.target_mean_) / self.target_std_).astype(np.float32))
            log_lib = None

        def make_batch_loss(tiles: list[np.ndarray]):
            def batch_loss(_net, tile_idx: np.ndarray, train: bool) -> torch.Tensor:  # no DDP: calls module_
                seeds = np.sort(np.concatenate([tiles[t] for t in tile_idx]))
                nodes, edges, pos = self._subgraph(adj, deg, seeds, device)
                out = self.module_(feats[nodes].to(device), *edges)[pos]
                y = target[seeds].to(device)
                return self.module_.loss(out, y, None if log_lib is None else log_lib[seeds].to(device))

            return batch_loss

        val_groups = groups[val_rows] if groups is not None else np.zeros(len(val_rows))

        def val_score() -> float:
            pred = self._forward_rows(adj, deg, feats, val_rows, device)
            pred = self._to_output(pred)
            scores = []
            for g in np.unique(val_groups):
                m = val_groups == g
                r = pearson(y_score[val_rows][m], pred[m])
                scores.append(np.nanmean(r) if np.isfinite(r).any() else np.nan)
            scores = np.asarray(scores)
            return float(np.nanmean(scores)) if np.isfinite(scores).any() else -np.inf

        train_tiles = self._tiles(coords, groups, train_rows)
        val_tiles = self._tiles(coords, groups, val_rows) if len(val_rows) else []
        tiles = train_tiles + val_tiles
        t_idx = np.arange(len(train_tiles))
        v_idx = np.arange(len(train_tiles), len(tiles))
        logger.info(
            "SpatialGraph: %d spots, %d edges, %d training tiles, %d validation tiles.",
            len(X), adj.nnz - len(X), len(train_tiles), len(val_tiles),
        )  # fmt: skip
        self.module_ = self._build(X.shape[1], Y.shape[1]).to(device)
        self.module_.init_bias(self.target_mean_ if self.target == "counts" else None)
        self._train(
            make_batch_loss(tiles), t_idx, v_idx, val_score=val_score if len(val_rows) else None,
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            patience=self.patience, generator=generator, device=device,
        )  # fmt: skip
        if self.refit and len(val_rows):
            best = self.best_epoch_
            history = self.history_
            seed_everything(self.seed)
            generator = torch.Generator().manual_seed(self.seed)
            all_tiles = self._tiles(coords, groups, np.arange(len(X)))
            self.module_ = self._build(X.shape[1], Y.shape[1]).to(device)
            self.module_.init_bias(self.target_mean_ if self.target == "counts" else None)
            self._train(
                make_batch_loss(all_tiles), np.arange(len(all_tiles)), np.arange(0), epochs=best + 1,
                batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, patience=None,
                generator=generator, device=device,
            )  # fmt: skip
            history["refit_loss"] = self.history_["train_loss"]
            self.history_ = history
            self.best_epoch_ = best

    def _forward_rows(self, adj, deg, feats, rows: np.ndarray, device) -> np.ndarray:
        """Raw network outputs ``(len(rows), out)`` for `rows`, in chunks with their halos (eval mode)."""
        import torch

        module = self.module_.to(device).eval()
        out = []
        with torch.inference_mode(), self._autocast(device):
            for start in range(0, len(rows), PREDICT_CHUNK):
                seeds = rows[start : start + PREDICT_CHUNK]
                order = np.argsort(seeds)
                nodes, edges, pos = self._subgraph(adj, deg, seeds[order], device)
                res = module(feats[nodes].to(device), *edges)[pos].float().cpu().numpy()
                chunk = np.empty_like(res)
                chunk[order] = res
                out.append(chunk)
        return np.concatenate(out) if out else np.zeros((0, self.module_.n_out), np.float32)

    def _to_output(self, raw: np.ndarray) -> np.ndarray:
        g = len(self.target_mean_)
        if self.target == "counts":
            return np.log1p(TARGET_SUM * np.exp(np.minimum(raw[:, :g], 20.0))).astype(np.float32)
        return raw[:, :g] * self.target_std_ + self.target_mean_

    # ------------------------------------------------------------------ ridge predictor
    def _ridge(self, **overrides: Any):
        from omx.models._ridge import Ridge

        return Ridge(encoder=self.encoder, seed=self.seed, show_progress_bar=False, **overrides)

    def _propagate(self, P0: np.ndarray, adj: sparse.csr_matrix, share: float) -> np.ndarray:
        """`n_layers` rounds of propagation over the graph's neighbours (self loops left out)."""
        return propagate(P0, adj - sparse.identity(adj.shape[0], format="csr", dtype=adj.dtype), share, self.n_layers)

    def _fit_ridge(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None, coords: np.ndarray) -> None:
        """Fit the ridge on all rows, then choose the neighbour share by leave-one-section-out CV."""
        import torch

        self._build_graph(coords, groups)  # the same checks as the network's (isolated spots, one-spot sections)
        self.ridge_ = self._ridge().fit(X, Y, groups=groups)
        self.target_mean_, self.target_std_ = Y.mean(0), np.ones(Y.shape[1], np.float32)
        self.standardizer_ = GroupStandardizer().fit(X)
        self.module_ = torch.nn.Module()  # no trained network: the ridge and the share are the fitted state
        self.best_epoch_ = 0
        labels = np.unique(groups) if groups is not None else []
        scores = np.zeros((len(labels), len(PROPAGATION_GRID)))
        if len(labels) >= 2 and self.n_layers > 0:
            fixed = {"alpha": self.ridge_.alpha_, "n_components": self.ridge_.n_components_}
            for i, label in enumerate(progress(labels, show=self.show_progress_bar, desc="SpatialGraph CV")):
                held = groups == label
                fold = self._ridge(**fixed).fit(X[~held], Y[~held], groups=groups[~held])
                P0 = fold.predict(X[held], groups=groups[held])
                adj = self._build_graph(coords[held], groups[held])
                for j, share in enumerate(PROPAGATION_GRID):
                    scores[i, j] = np.nanmean(pearson(Y[held], self._propagate(P0, adj, share)))
            self.propagation_ = float(PROPAGATION_GRID[int(np.argmax(scores.mean(0)))])
        else:
            self.propagation_ = 0.0
            logger.info("SpatialGraph: fewer than 2 sections, so no propagation is fitted (the ridge alone).")
        self.history_ = {"propagation": list(PROPAGATION_GRID), "cv_pearson": scores.mean(0).tolist()}
        logger.info("SpatialGraph: neighbour share %.2f chosen by leave-one-section-out CV.", self.propagation_)

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        groups, coords = context.groups, context.coords
        if self.uses_ridge:
            return self._propagate(
                self.ridge_.predict(X, groups=groups), self._build_graph(coords, groups), self.propagation_
            )
        return self._to_output(self._raw(X, groups, coords))

    def _predict_var(self, X: np.ndarray, context: Context) -> tuple[np.ndarray, np.ndarray]:
        raw = self._raw(X, context.groups, context.coords)
        var = self._variance(raw, context.library_size)
        return self._to_output(raw), var

    def _raw(self, X: np.ndarray, groups: np.ndarray | None, coords: np.ndarray) -> np.ndarray:
        """Raw network outputs of every row, predicted over the graph of the rows given."""
        device = self._torch_device()
        adj = self._build_graph(coords, groups)
        deg = np.asarray(adj.sum(1)).ravel()
        import torch

        feats = torch.from_numpy(self._standardise(X, groups))
        order = np.concatenate(self._tiles(coords, groups, np.arange(len(X))))  # contiguous chunks: small halos
        raw = np.empty((len(X), self.module_.n_out), np.float32)
        raw[order] = self._forward_rows(adj, deg, feats, order, device)
        return raw

    def _variance(self, raw: np.ndarray, library_size) -> np.ndarray:
        """Monte Carlo variance of log1p(1e4 x / l) with x ~ NB / ZINB at the predicted mean (seeded)."""
        import torch

        n = len(raw)
        lib = np.full(n, self.library_size_) if library_size is None else np.broadcast_to(library_size, (n,))
        lib = torch.as_tensor(np.asarray(lib, np.float64))
        theta = torch.exp(self.module_.log_theta.detach().cpu().double())
        with torch.random.fork_rng(devices=[]):  # seeded draws that leave the caller's random state alone
            torch.manual_seed(self.seed)
            return self._sample_variance(raw, lib, theta)

    def _sample_variance(self, raw: np.ndarray, lib: torch.Tensor, theta: torch.Tensor) -> np.ndarray:
        import torch

        g = len(self.target_mean_)
        n = len(raw)
        out = np.empty((n, g), np.float32)
        for start in range(0, n, 512):
            sl = slice(start, start + 512)
            rate = torch.exp(torch.as_tensor(raw[sl, :g], dtype=torch.float64).clamp(max=20.0))
            mu = rate * lib[sl, None]
            # NB as a gamma-Poisson mixture: x ~ Poisson(Gamma(theta, theta / mu))
            shape = theta.expand_as(mu).unsqueeze(0).expand(self.n_samples, *mu.shape)
            lam = torch._standard_gamma(shape.contiguous()) * (mu / theta)
            lam = torch.where(torch.isfinite(lam), lam, torch.zeros_like(lam))
            x = torch.poisson(lam)
            if self.likelihood == "zinb":
                pi = torch.sigmoid(torch.as_tensor(raw[sl, g:], dtype=torch.float64))
                x = torch.where(torch.rand(x.shape, dtype=torch.float64) < pi, 0.0, x)
            y = torch.log1p(TARGET_SUM * x / lib[sl, None])
            out[sl] = y.var(0).numpy()
        return out

    # ------------------------------------------------------------------ state
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {
            "x_mean": self.standardizer_.mean_,
            "x_scale": self.standardizer_.scale_,
            "target_mean": self.target_mean_,
            "target_std": self.target_std_,
        }
        state = {"best_epoch_": int(self.best_epoch_), "library_size_": getattr(self, "library_size_", None)}
        if self.uses_ridge:
            ridge_state, ridge_arrays = self.ridge_._get_state()
            state.update(propagation_=self.propagation_, ridge=ridge_state)
            arrays.update({f"ridge.{k}": v for k, v in ridge_arrays.items()})
        return state, arrays

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.best_epoch_ = state["best_epoch_"]
        self.library_size_ = state.get("library_size_")
        self.standardizer_ = GroupStandardizer().set_state({"mean": arrays["x_mean"], "scale": arrays["x_scale"]})
        self.target_mean_, self.target_std_ = arrays["target_mean"], arrays["target_std"]
        if self.uses_ridge:
            import torch

            self.propagation_ = state["propagation_"]
            self.ridge_ = self._ridge()
            self.ridge_._set_state(state["ridge"], {k[6:]: v for k, v in arrays.items() if k.startswith("ridge.")})
            self.ridge_.n_targets_, self.ridge_.n_features_in_ = len(self.target_mean_), self.n_features_in_
            self.ridge_.is_fitted_ = True
            self.module_ = torch.nn.Module()
            return
        self.module_ = self._build(self.n_features_in_, len(self.target_mean_))


def propagate(P0: np.ndarray, neighbours: sparse.spmatrix, share: float, n_layers: int = 2) -> np.ndarray:
    """`n_layers` rounds of ``p <- (1 - share) * p0 + share * (mean of the neighbours' p)`` (personalised PageRank).

    ``neighbours`` is an ``(n, n)`` matrix whose nonzero entries mark each row's neighbours (weights are averaged;
    rows without neighbours keep ``(1 - share) * p0``).
    """
    if share == 0 or n_layers == 0:
        return P0
    A = sparse.csr_matrix(neighbours, dtype=np.float64)
    A = sparse.diags(1.0 / np.maximum(np.asarray(A.sum(1)).ravel(), 1.0)) @ A
    P = P0
    for _ in range(n_layers):
        P = (1.0 - share) * P0 + share * (A @ P)
    return P


@contextmanager
def _quiet(log: logging.Logger):
    """Raise a logger's level to WARNING for the duration of the block."""
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _median_spacing(coords: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot (1 when undefined)."""
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    spacing = float(np.median(dist[:, 1]))
    return spacing if spacing > 0 else 1.0


def _make_net():
    """Define the torch modules on first use, so that importing omx does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class GraphLayer(nn.Module):
        """One residual message-passing update: mean (GCN) or attention aggregation over in-edges."""

        def __init__(self, hidden: int, conv: str, dropout: float):
            super().__init__()
            self.conv = conv
            self.lin = nn.Linear(hidden, hidden)
            self.norm = nn.LayerNorm(hidden)
            self.drop = nn.Dropout(dropout)
            if conv == "attention":
                self.att_src = nn.Parameter(torch.randn(hidden) / hidden**0.5)
                self.att_dst = nn.Parameter(torch.randn(hidden) / hidden**0.5)

        def forward(self, h, src, dst, weight):
            with torch.autocast(device_type=h.device.type, enabled=False):
                z = self.lin(h.float())
                if self.conv == "attention":
                    score = F.leaky_relu((z * self.att_src).sum(-1)[src] + (z * self.att_dst).sum(-1)[dst], 0.2)
                    top = torch.full((len(z),), -torch.inf, device=z.device).scatter_reduce(
                        0, dst, score, reduce="amax", include_self=True
                    )
                    e = torch.exp(score - top[dst])
                    denom = _aggregate(dst, src, e, torch.ones(len(z), 1, device=z.device))[:, 0]
                    weight = e / denom[dst]
                agg = _aggregate(dst, src, weight, z)
            return self.drop(F.gelu(self.norm(agg)))

    def _aggregate(dst, src, weight, z):
        """``out[i] = sum over edges (j -> i) of weight * z[j]``, as a sparse product.

        The sums come out the same whatever the number of threads (an ``index_add_`` of the messages does not,
        on the CPU).
        """
        adj = torch.sparse_coo_tensor(torch.stack([dst, src]), weight.float(), (len(z), len(z)), check_invariants=False)
        return torch.sparse.mm(adj, z)

    class GraphNet(nn.Module):
        """MLP on node features, residual graph layers, and a head for the likelihood."""

        def __init__(self, n_in, n_targets, *, hidden, n_layers, conv, dropout, likelihood):
            super().__init__()
            self.likelihood = likelihood
            self.n_targets = n_targets
            self.n_out = n_targets * (2 if likelihood == "zinb" else 1)
            self.mlp = nn.Sequential(
                nn.Linear(n_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            )  # fmt: skip
            self.layers = nn.ModuleList([GraphLayer(hidden, conv, dropout) for _ in range(n_layers)])
            self.head = nn.Linear(hidden, self.n_out)
            if likelihood != "mse":
                self.log_theta = nn.Parameter(torch.full((n_targets,), 1.0))

        def init_bias(self, log_rate):
            if log_rate is not None:
                with torch.no_grad():
                    self.head.bias[: self.n_targets] = torch.as_tensor(log_rate)
                    self.head.weight[: self.n_targets].mul_(0.1)
                    if self.likelihood == "zinb":
                        self.head.bias[self.n_targets :] = -3.0

        def forward(self, x, src, dst, weight):
            h = self.mlp(x)
            for layer in self.layers:
                h = h + layer(h, src, dst, weight)
            return self.head(h)

        def loss(self, out, y, log_lib):
            out = out.float()
            g = self.n_targets
            if self.likelihood == "mse":
                return F.mse_loss(out, y)
            log_mu = out[:, :g].clamp(max=20.0) + log_lib[:, None]
            theta = torch.exp(self.log_theta)
            log_theta_mu = torch.logaddexp(torch.log(theta), log_mu)
            # log NB(y; mu, theta)
            nb = (
                theta * (torch.log(theta) - log_theta_mu)
                + y * (log_mu - log_theta_mu)
                + torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1.0)
            )  # fmt: skip
            if self.likelihood == "nb":
                return -nb.mean()
            logit = out[:, g:]
            nb_zero = theta * (torch.log(theta) - log_theta_mu)
            log_zero = torch.logaddexp(logit, nb_zero) - F.softplus(logit)
            log_pos = nb - F.softplus(logit)
            return -torch.where(y < 0.5, log_zero, log_pos).mean()

    return GraphNet


_NET = None


def _GraphNet(*args, **kwargs):
    """Build the network (the class is defined on first use, with torch)."""
    global _NET
    if _NET is None:
        _NET = _make_net()
    return _NET(*args, **kwargs)
