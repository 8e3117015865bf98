"""Bayesian cell-type deconvolution of spot counts (Spotiphy / cell2location-like), in Pyro: arrays in, arrays out.

Spot ``s``, gene ``g``, cell type ``k``::

    counts[s, g] ~ NegativeBinomial(mean = efficiency * n_cells[s] * sum_k p[s, k] * S[k, g] * platform[g],
                                    dispersion[g])
    p[s]         ~ Dirichlet(alpha)                  # cell-type proportions (of cells, not of mRNA)
    n_cells[s]   ~ LogNormal(log nuclei[s], 0.5)     # the nucleus count from the H&E as prior, when given
    platform[g]  ~ LogNormal(0, platform_sd)         # per-gene difference between reference and spots
    efficiency   ~ LogNormal(init, 2)                # capture of spots relative to the reference

``S[k, g]`` are the reference signatures: mean counts per cell of each type, so types with more mRNA per cell
contribute more reads per cell and ``p`` counts cells. The per-gene dispersion is estimated once, by the method
of moments around the starting fit (empirical Bayes), and held fixed: the likelihood then needs no log-gamma
per spot and gene, which makes a step several times cheaper. Inference is stochastic variational inference with a
mean-field normal guide (`pyro.infer.autoguide.AutoNormal`), started from non-negative least squares with a
moment-matched platform effect; credible intervals come from samples of the guide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from omx._utils import check_counts, get_device, logger, progress

__all__ = ["DeconvolutionModel", "jsd", "nnls_proportions", "signatures_from_reference"]

#: Most rows a reference of signatures (``labels_key=None``) may have: more are single cells without labels.
_MAX_SIGNATURE_TYPES = 200


def signatures_from_reference(
    reference: AnnData, labels_key: str | None, *, min_cells_per_type: int = 10, layer: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """Mean counts per cell of each cell type, ``(n_types, n_genes)``, and the type names.

    With ``labels_key=None`` the reference already holds one row per cell type (its ``obs_names``).
    """
    X = reference.layers[layer] if layer is not None else reference.X
    if X is None:
        raise ValueError("The reference has no values in X; pass `layer=` naming its counts.")
    check_counts(X, name="reference counts")
    if labels_key is None:
        if reference.n_obs > _MAX_SIGNATURE_TYPES:
            columns = [c for c in reference.obs.columns if not pd.api.types.is_numeric_dtype(reference.obs[c])]
            raise ValueError(
                f"labels_key=None reads the reference as signatures, one row per cell type, but it has "
                f"{reference.n_obs} rows (more than {_MAX_SIGNATURE_TYPES} types): it looks like single cells. Pass "
                f"the obs column with their cell types as `labels_key=` (text columns: {columns or 'none'}; add one "
                "if the reference has no labels)."
            )
        names = [str(n) for n in reference.obs_names]
        if len(set(names)) != len(names):
            raise ValueError("The reference signatures have duplicate cell type names (obs_names); make them unique.")
        S = X.toarray() if sparse.issparse(X) else np.asarray(X)
        return S.astype(np.float64), names
    if labels_key not in reference.obs:
        raise KeyError(
            f"The reference has no obs column {labels_key!r} (columns: {list(reference.obs.columns)}). Pass the "
            "column with the cell types as `labels_key=`, or `labels_key=None` for a reference of signatures."
        )
    labels = reference.obs[labels_key]
    if labels.isna().any():
        raise ValueError(f"reference.obs[{labels_key!r}] holds {int(labels.isna().sum())} missing labels; drop them.")
    labels = labels.astype(str).to_numpy()
    names, inverse, n = np.unique(labels, return_inverse=True, return_counts=True)
    few = {str(t): int(c) for t, c in zip(names, n, strict=True) if c < min_cells_per_type}
    if few:
        raise ValueError(
            f"Cell types with fewer than min_cells_per_type={min_cells_per_type} cells in the reference: {few}. "
            "Drop or merge them, or lower `min_cells_per_type=`."
        )
    onehot = sparse.csr_matrix(
        (np.ones(len(labels)), (inverse, np.arange(len(labels)))), shape=(len(names), len(labels))
    )
    S = onehot @ X
    S = np.asarray(S.toarray() if sparse.issparse(S) else S, dtype=np.float64) / n[:, None]
    return S, [str(t) for t in names]


def nnls_proportions(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Non-negative least squares of each spot's counts on the signatures, normalised to proportions of cells."""
    from scipy.optimize import nnls

    Y = np.asarray(Y.toarray() if sparse.issparse(Y) else Y, dtype=np.float64)
    A = np.asarray(S, dtype=np.float64).T
    out = np.zeros((Y.shape[0], A.shape[1]))
    for s in range(Y.shape[0]):
        out[s] = nnls(A, Y[s], maxiter=50 * A.shape[1])[0]
    total = out.sum(1, keepdims=True)
    return np.divide(out, total, out=np.full_like(out, 1.0 / A.shape[1]), where=total > 0)


def jsd(P: Any, Q: Any) -> np.ndarray:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between rows of two proportion matrices."""
    P, Q = np.asarray(P, dtype=float), np.asarray(Q, dtype=float)
    P = P / np.clip(P.sum(1, keepdims=True), 1e-12, None)
    Q = Q / np.clip(Q.sum(1, keepdims=True), 1e-12, None)
    M = (P + Q) / 2

    def kl(A, B):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(A > 0, A * np.log2(A / np.where(B > 0, B, 1)), 0.0).sum(1)

    return np.clip(0.5 * kl(P, M) + 0.5 * kl(Q, M), 0, 1)


def _moment_dispersion(Y: np.ndarray, mu: np.ndarray, lo: float = 0.5, hi: float = 1e3) -> np.ndarray:
    """Per-gene NB dispersion (inverse overdispersion ``r``: variance = mu + mu^2 / r) by the method of moments."""
    excess = ((Y - mu) ** 2 - mu).sum(0)
    r = np.divide((mu**2).sum(0), excess, out=np.full(Y.shape[1], hi), where=excess > 0)
    return np.clip(r, lo, hi)


class DeconvolutionModel:
    """Bayesian deconvolution of spot counts into cell-type proportions (see the module docstring for the model).

    Parameters
    ----------
    alpha
        Concentration of the Dirichlet prior on each spot's proportions (below 1 favours few types per spot).
    platform_sd
        Prior standard deviation of the per-gene log platform effect.
    n_cells_sd
        Prior standard deviation of log cells per spot around the nucleus count.
    n_steps
        Maximum SVI steps; fitting stops earlier when the loss stops improving.
    lr
        Adam learning rate.
    batch_size
        Spots per SVI step (all when the data have fewer); mini-batches keep big data sets fast.
    n_samples
        Guide samples for the credible intervals.
    tol
        Stop when the mean loss (per spot and gene) of the last 100 steps has not improved by this much for 200
        steps; 0 runs all ``n_steps``.
    seed
        Random seed; the same seed gives the same result on the CPU.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    show_progress_bar
        Show a progress bar over SVI steps.

    Attributes
    ----------
    proportions_
        Posterior mean proportions ``(n_spots, n_types)`` (mean of guide samples).
    q05_, q95_
        5 % and 95 % posterior quantiles of the proportions.
    n_cells_
        Posterior mean cells per spot.
    platform_
        Posterior median platform effect per gene.
    history_
        ``{"loss": [...]}``: the ELBO loss per step, per spot and gene.
    n_steps_
        Steps run.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        platform_sd: float = 0.5,
        n_cells_sd: float = 0.5,
        n_steps: int = 3000,
        lr: float = 0.02,
        batch_size: int = 1024,
        n_samples: int = 200,
        tol: float = 5e-5,
        seed: int = 0,
        device: str = "auto",
        show_progress_bar: bool = True,
    ):
        if alpha <= 0 or platform_sd <= 0 or n_cells_sd <= 0:
            raise ValueError("alpha, platform_sd and n_cells_sd must be positive.")
        if n_steps < 1 or batch_size < 1 or n_samples < 2:
            raise ValueError("n_steps and batch_size must be >= 1 and n_samples >= 2.")
        self.alpha, self.platform_sd, self.n_cells_sd = float(alpha), float(platform_sd), float(n_cells_sd)
        self.n_steps, self.lr, self.batch_size, self.n_samples = (
            int(n_steps),
            float(lr),
            int(batch_size),
            int(n_samples),
        )
        self.tol = float(tol)
        self.seed, self.device, self.show_progress_bar = seed, device, show_progress_bar
        self.init_params_ = {
            "alpha": self.alpha, "platform_sd": self.platform_sd, "n_cells_sd": self.n_cells_sd,
            "n_steps": self.n_steps, "lr": self.lr, "batch_size": self.batch_size, "n_samples": self.n_samples,
            "tol": self.tol, "seed": seed,
        }  # fmt: skip

    @property
    def n_steps_run(self) -> int:
        """Steps run by the last fit."""
        return self.n_steps_

    def fit(self, Y: Any, signatures: np.ndarray, *, n_cells: np.ndarray | None = None) -> DeconvolutionModel:
        """Fit the model to counts ``Y`` ``(n_spots, n_genes)`` with ``signatures`` ``(n_types, n_genes)``.

        ``n_cells`` are the nuclei counted in each spot (e.g. ``obs["omx_n_nuclei"]``), or None.
        """
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal, init_to_value

        Y = np.asarray(Y.toarray() if sparse.issparse(Y) else Y, dtype=np.float64)
        S = np.asarray(signatures, dtype=np.float64)
        check_counts(Y, name="spot counts")
        check_counts(S, name="signatures")
        if Y.ndim != 2 or S.ndim != 2 or Y.shape[1] != S.shape[1]:
            raise ValueError(f"Counts {Y.shape} and signatures {S.shape} must share the genes (second axis).")
        lib = Y.sum(1)
        if (lib <= 0).any():
            raise ValueError(f"{int((lib <= 0).sum())} spots have no counts in the shared genes; drop them first.")
        empty = np.flatnonzero(S.sum(1) <= 0)
        if len(empty):
            raise ValueError(
                f"Cell types at positions {empty.tolist()} of the signatures express none of the {S.shape[1]} shared "
                "genes; a type with no profile would still take a share of every spot. Drop them from the reference."
            )
        keep_gene = S.sum(0) > 0
        if not keep_gene.all():
            logger.info("Left out %d genes that no cell type expresses.", int((~keep_gene).sum()))
            Y, S = Y[:, keep_gene], S[:, keep_gene]
        n, K = Y.shape[0], S.shape[0]
        if K > _MAX_SIGNATURE_TYPES:
            raise ValueError(
                f"The signatures have {K} cell types (more than {_MAX_SIGNATURE_TYPES}); proportions over that many "
                "types are not a simplex in float32. Were single cells passed as signatures? Average them by type "
                "first (`signatures_from_reference(reference, labels_key)`)."
            )
        if n_cells is not None:
            n_cells = np.asarray(n_cells, dtype=np.float64)
            if n_cells.shape != (n,) or not np.all(np.isfinite(n_cells)) or (n_cells < 0).any():
                raise ValueError(f"n_cells must be {n} finite non-negative counts, one per spot.")

        # start: NNLS against signatures corrected by a moment-matched platform effect
        gamma = np.ones(S.shape[1])
        for _ in range(3):
            p0 = nnls_proportions(Y, S * gamma)
            mix = (p0 @ (S * gamma)) * (lib / np.clip((p0 @ (S * gamma)).sum(1), 1e-12, None))[:, None]
            gamma = gamma * np.clip(Y.sum(0) / np.clip(mix.sum(0), 1e-12, None), 0.05, 20)
        gamma = gamma / np.exp(np.mean(np.log(gamma)))
        self.init_proportions_ = p0
        p0 = 0.9 * p0 + 0.1 / K
        per_cell = (p0 @ (S * gamma)).sum(1)  # expected reads per cell before capture
        if n_cells is not None:
            n0 = np.maximum(n_cells, 0.5)
            eff0 = float(np.median(lib / (n0 * per_cell)))
        else:
            eff0 = float(np.median(lib / (10.0 * per_cell)))
            n0 = lib / (eff0 * per_cell)
        n_loc = np.log(n0)
        n_start = lib / (eff0 * per_cell)
        dispersion = _moment_dispersion(Y, p0 @ (S * gamma) * (lib / per_cell)[:, None])
        self.dispersion_ = np.full(keep_gene.shape, np.nan)
        self.dispersion_[keep_gene] = dispersion

        dev = get_device(self.device)
        pyro.clear_param_store()
        pyro.set_rng_seed(self.seed)
        np.random.seed(self.seed)
        f32 = {"dtype": torch.float32, "device": dev}
        Yt, St = torch.as_tensor(Y, **f32), torch.as_tensor(S, **f32)
        n_loc_t = torch.as_tensor(n_loc, **f32)
        alpha = torch.full((K,), self.alpha, **f32)
        disp = torch.as_tensor(dispersion, **f32)
        G = S.shape[1]
        batch = min(self.batch_size, n)
        platform_sd, n_cells_sd = self.platform_sd, self.n_cells_sd

        def model(idx=None):
            platform = pyro.sample("platform", dist.LogNormal(torch.zeros(G, **f32), platform_sd).to_event(1))
            eff = pyro.sample("efficiency", dist.LogNormal(torch.tensor(np.log(eff0), **f32), 2.0))
            with pyro.plate("spots", n, subsample=idx) as ind:
                p = pyro.sample("proportions", dist.Dirichlet(alpha))
                cells = pyro.sample("n_cells", dist.LogNormal(n_loc_t[ind], n_cells_sd))
                mu = (eff * cells[:, None]) * (p @ (St * platform)) + 1e-8
                y = Yt[ind]
                # NB log-likelihood with the dispersion fixed: the terms in lgamma are constant and left out
                pyro.factor("counts", (y * torch.log(mu) - (y + disp) * torch.log(disp + mu)).sum(-1))

        init = {
            "platform": torch.as_tensor(gamma, **f32),
            "efficiency": torch.tensor(eff0, **f32),
            "proportions": torch.as_tensor(p0, **f32),
            "n_cells": torch.as_tensor(n_start, **f32),
        }
        guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.05)
        optim = pyro.optim.ClippedAdam({"lr": self.lr, "clip_norm": 10.0})
        svi = SVI(model, guide, optim, loss=Trace_ELBO())
        guide(None if batch >= n else torch.arange(n, device=dev))  # set up full-size local parameters
        scale = 1.0 / (n * G)
        losses: list[float] = []
        rng = torch.Generator().manual_seed(self.seed)
        best, since = np.inf, 0
        window = 100
        bar = progress(range(self.n_steps), show=self.show_progress_bar, desc="deconvolution", unit="step")
        for _ in bar:
            idx = None if batch >= n else torch.randperm(n, generator=rng)[:batch].to(dev)
            losses.append(svi.step(idx) * scale * (n / (batch if idx is not None else n)))
            if len(losses) >= window and len(losses) % 50 == 0:
                recent = float(np.mean(losses[-window:]))
                if recent < best - self.tol:
                    best, since = recent, 0
                else:
                    since += 50
                    if since >= 200 and self.tol > 0:  # no improvement over 200 steps
                        break
        self.n_steps_ = len(losses)
        self.history_ = {"loss": losses}

        with torch.no_grad():
            draws = [guide() for _ in range(self.n_samples)] if batch >= n else None
            if draws is None:  # the guide's local sites hold all spots: sample them without subsampling
                draws = [guide(torch.arange(n, device=dev)) for _ in range(self.n_samples)]
            P = torch.stack([d["proportions"] for d in draws]).cpu().numpy().astype(np.float64)
            cells = torch.stack([d["n_cells"] for d in draws]).cpu().numpy()
            plat = torch.stack([d["platform"] for d in draws]).cpu().numpy()
        self.proportions_ = P.mean(0)
        self.q05_, self.q95_ = np.quantile(P, 0.05, axis=0), np.quantile(P, 0.95, axis=0)
        self.n_cells_ = cells.mean(0)
        platform = np.full(keep_gene.shape, np.nan)
        platform[keep_gene] = np.median(plat, axis=0)
        self.platform_ = platform
        self.is_fitted_ = True
        return self

    def to_frames(self, index: pd.Index, types: list[str]) -> dict[str, pd.DataFrame]:
        """Proportions and their 5 % and 95 % quantiles as DataFrames."""
        return {
            "mean": pd.DataFrame(self.proportions_, index=index, columns=types),
            "q05": pd.DataFrame(self.q05_, index=index, columns=types),
            "q95": pd.DataFrame(self.q95_, index=index, columns=types),
        }
