"""Graph neural network over the spot graph (Hist2ST / THItoGene family): message passing, MSE or count heads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse

from omx._docs import doc_params
from omx._utils import logger, seed_everything
from omx.encoders import Encoder, get_encoder
from omx.metrics import pearson
from omx.models._base import TorchModel
from omx.models._context import Context
from omx.models._gnn_net import graph_net
from omx.models._neighbors import check_graph, median_spacing, spatial_graph
from omx.models._standardize import GroupStandardizer

if TYPE_CHECKING:
    import torch

#: Message passing layers accepted by `SpatialGraph` (`conv=`).
CONVS = ("gcn", "attention")
#: Heads accepted by `SpatialGraph` (`likelihood=`).
LIKELIHOODS = ("mse", "nb", "zinb")
#: Scale of count-model predictions: log1p(counts / library size * TARGET_SUM).
TARGET_SUM = 1e4
#: Spots whose predictions are computed together at prediction time (each with its k-hop halo).
PREDICT_CHUNK = 8192


@doc_params()
class SpatialGraph(TorchModel):
    """A graph neural network over the graph of neighbouring spots, from encoder features to expression.

    Each section (group) gets its own graph, built from the spot centres in microns with squidpy
    (`squidpy.gr.spatial_neighbors_knn`, ``_radius`` or ``_delaunay`` on a small AnnData per section), so no
    edge joins two sections. Every spot also links to itself. Features are z-scored within each section (as in
    `Ridge`), pass through a two-layer MLP (LayerNorm, GELU, dropout) and then `n_layers` residual graph layers
    ``h <- h + dropout(gelu(norm(W aggregate(h))))``: ``conv="gcn"`` takes the mean over the spot and its
    neighbours, ``conv="attention"`` a single-head GAT-style attention-weighted sum. ``n_layers=0`` gives the
    same network without the graph (a plain MLP on each spot), the baseline a graph must beat. `GraphRidge`
    propagates a ridge's predictions over the same graph instead of training a network; how the two compare on
    her2st: see "Model families on her2st" in the guide.

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
    {encoder_features}
    {graph}
    {n_neighbors}
    {radius}
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
        check_graph(graph, n_neighbors, radius)
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}.")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        if n_layers < 0 or hidden < 1 or tile_size < 1 or batch_size < 2 or epochs < 1:
            raise ValueError("hidden, tile_size and epochs must be >= 1, n_layers >= 0 and batch_size >= 2.")
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
        return spatial_graph(coords, groups, kind=self.graph, n_neighbors=self.n_neighbors, radius=self.radius)

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
            side = np.sqrt(self.tile_size) * median_spacing(c)
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
        return graph_net(
            n_features, n_targets, hidden=self.hidden, n_layers=self.n_layers, conv=self.conv,
            dropout=self.dropout, likelihood=self.likelihood,
        )  # fmt: skip

    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        groups, coords = context.groups, context.coords
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

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        return self._to_output(self._raw(X, context.groups, context.coords))

    def _predict_var(self, X: np.ndarray, context: Context) -> tuple[np.ndarray, np.ndarray]:
        raw = self._raw(X, context.groups, context.coords)
        return self._to_output(raw), self._variance(raw, context.library_size)

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
        lib = torch.as_tensor(np.array(lib, np.float64))  # a copy: a broadcast view is read-only
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
        return state, arrays

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if "ridge" in state:  # saved by an older omx, whose SpatialGraph predicted with a ridge by default
            raise ValueError(
                "This SpatialGraph was saved by an older omx with its ridge predictor, which is now its own class, "
                "GraphRidge (model='graph'): fit a GraphRidge instead."
            )
        self.best_epoch_ = state["best_epoch_"]
        self.library_size_ = state.get("library_size_")
        self.standardizer_ = GroupStandardizer().set_state({"mean": arrays["x_mean"], "scale": arrays["x_scale"]})
        self.target_mean_, self.target_std_ = arrays["target_mean"], arrays["target_std"]
        self.module_ = self._build(self.n_features_in_, len(self.target_mean_))
