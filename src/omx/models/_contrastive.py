"""Contrastive image-expression model (BLEEP / mclSTExp family) with a leakage-safe reference bank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._utils import logger, seed_everything
from ..encoders import Encoder, get_encoder
from ..metrics import pearson
from ._base import TorchModel
from ._cnn import _channel_stats, augment_patches
from ._ridge import DEFAULT_ALPHAS, Ridge, _fit_ridge, _safe_scale

if TYPE_CHECKING:
    import torch

#: Blend weights of retrieval (vs. the regression head) searched on the validation groups with ``blend="auto"``.
BLEND_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Rows of queries scored against the bank at a time.
QUERY_CHUNK = 1024


class Contrastive(TorchModel):
    """Contrastive image-expression model: a shared embedding of H&E and expression, predicting two ways.

    An image tower (an MLP on precomputed features, or `~omx.encoders.SmallCNN` on patches, trained from
    scratch) and an expression tower (an MLP on the standardised targets) each end in a projection head onto a
    shared, L2-normalised embedding; a symmetric InfoNCE loss (BLEEP, CLIP) with a learned or fixed temperature
    pulls each spot's image and expression embeddings together. Optionally (``neighbors > 0``), the image
    embedding of a spot attends to those of its nearest spots in the same section (mclSTExp's idea); the model
    then takes the spot centres (``coords``) and is spatial.

    Prediction, both exposed:

    - **retrieval** (:meth:`retrieve`): the similarity-weighted (softmax at the learned temperature) average of
      the expression of the `k` reference spots whose expression embeddings are nearest the query's image
      embedding. The reference bank is the training spots only, with their group labels. A query never
      retrieves a bank row of its own group (section) nor, when `patients` maps groups to patients and
      ``exclude="patient"``, of any section of its own patient.
    - **regression**: a linear head on the image embedding (before normalisation), trained jointly with the
      InfoNCE loss (mean squared error, on `n_components` principal components of the targets); with
      ``head="ridge"`` or ``"ridge+features"`` it is then replaced by closed-form ridge (see `head`).

    ``blend`` mixes the two: ``w * retrieval + (1 - w) * regression``; ``"auto"`` (the default) picks ``w`` from
    0, 0.25, ..., 1 on the validation groups. The default regression head is ``"ridge+features"``: after the
    towers are trained (InfoNCE plus the head's squared error), ridge regression in closed form from the image
    embedding and the standardised features, its penalty chosen on the validation groups. On her2st it did
    better than retrieval, so ``"auto"`` chose ``w = 0`` in most folds. Mean per-gene Pearson r, handcrafted
    features of the spot and its surroundings (x1, x2, x3), leave-one-section-out over the held-out C sections
    (panel of 785 genes; ex50: 50 most expressed; var50: 50 most variable) and cross-patient (train C, test
    B4, panel), seed 0, CPU:

    ==============================================  ======  ======  ======  =============
    model                                           panel   ex50    var50   cross-patient
    ==============================================  ======  ======  ======  =============
    ridge (foundation's best)                       0.165   0.393   0.397   0.131
    this model, defaults (blend "auto": mostly 0)   0.163   0.390   0.398   0.125
    its retrieval alone (``mode="retrieval"``)      0.117   0.366   0.370   0.094
    fixed blend 0.5                                 0.144   0.389   0.396   0.110
    head "trained", linear tower, refit             0.152   0.384   0.390   0.114
    head "trained", MLP tower, no refit             0.112   0.311   0.314   0.089
    ==============================================  ======  ======  ======  =============

    It does not beat ridge on her2st (about 370 to 550 training spots per fold): see the benchmark.

    Features (``image="features"``) are standardised per group like `Ridge` (pass whole sections with
    `groups`); patches (``image="patches"``) are normalised per channel and augmented in training (flips,
    90-degree rotations, HED stain jitter). Targets are standardised per column on the training rows and
    predictions come back on their scale. Training uses Adam with early stopping on the mean per-gene Pearson
    r of the validation groups (whole groups when `groups` holds two or more), restoring the best epoch. On
    CUDA it runs in mixed precision with pinned host memory; on the CPU two fits with the same seed give
    identical predictions.

    Parameters
    ----------
    image
        ``"features"``: an MLP on features made by `encoder` (callers such as `omx.tl` encode the patches);
        ``"patches"``: a CNN from scratch on uint8 patches of `patch_px` pixels.
    encoder
        The encoder of ``image="features"`` (``"handcrafted"``, an `~omx.encoders.Encoder` or a torch module).
    patch_px
        Side of the patches of ``image="patches"``.
    width
        Channels of the first CNN stage (``image="patches"``).
    hidden
        Width of the hidden layers of the MLP towers.
    embed_dim
        Dimension of the shared embedding.
    dropout
        Dropout in the MLP towers.
    temperature
        Initial (``learn_temperature=True``) or fixed InfoNCE temperature.
    learn_temperature
        Learn the temperature (as CLIP does) or keep it fixed.
    contrastive_weight
        Weight of the InfoNCE loss against the regression loss (0 trains the regression head alone).
    n_components
        Principal components of the training targets the regression head predicts (None: the genes).
    head
        The regression head: ``"trained"`` (the linear head trained with the towers) or ``"ridge"`` (after
        training, ridge regression from the image embedding in closed form, its penalty chosen on the validation
        rows).
    k
        Reference spots averaged by retrieval.
    blend
        Weight of retrieval in the prediction (0: regression head only, 1: retrieval only), or ``"auto"``.
    exclude
        Bank rows a query never retrieves: ``"patient"`` (its patient's sections, where `patients` knows the
        patient, else its section) or ``"group"`` (its own section only).
    patients
        Patient of each group label, e.g. ``{"C2": "C", "C3": "C", "B4": "B"}``; labels it lacks are their own
        patient.
    neighbors
        Neighbouring spots (nearest, within the same group and 2.5 spot spacings) whose image embeddings each spot
        attends to; 0 switches spot context off. With neighbours the model needs `coords`.
    epochs
        Maximum number of epochs.
    batch_size
        Spots per step (the InfoNCE negatives are the other spots of the batch).
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay.
    patience
        Epochs without validation improvement before stopping; 0 or None trains all `epochs`.
    val_fraction
        Share of rows for validation (whole groups when there are groups); 0 disables validation.
    refit
        After early stopping, train again from scratch on all rows (validation rows included) for the best
        number of epochs; the retrieval weight stays the one chosen on validation.
    augment
        Augment training inputs: flips, rotations and stain jitter of patches; Gaussian noise (0.1) on
        standardised features.
    seed
        Seed of initialisation, splits, shuffling and augmentation.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
    show_progress_bar
        Show a progress bar over epochs.

    Attributes
    ----------
    module_
        The networks: ``image``, ``expression``, ``head``, optional ``context`` and the log temperature.
    bank_embedding_
        Expression embeddings of the reference spots ``(n_bank, embed_dim)``.
    bank_targets_
        Their targets ``(n_bank, g)``, on the scale given to :meth:`fit`.
    bank_groups_
        Their group labels ``(n_bank,)`` (all ``""`` when fitted without groups).
    blend_
        The retrieval weight used.
    history_
        ``"train_loss"``, ``"val_loss"``, ``"val_score"`` (validation Pearson r) per epoch, ``"blend_score"``
        (validation Pearson r per weight of `BLEND_GRID`) with ``blend="auto"``.
    best_epoch_
        Epoch (from 0) whose weights were kept.
    """

    def __init__(
        self,
        *,
        image: Literal["features", "patches"] = "features",
        encoder: str | Encoder | Any = "handcrafted",
        patch_px: int = 64,
        width: int = 32,
        hidden: int = 256,
        embed_dim: int = 128,
        dropout: float = 0.2,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        contrastive_weight: float = 1.0,
        n_components: int | None = 20,
        head: Literal["trained", "ridge", "ridge+features"] = "ridge+features",
        k: int = 50,
        blend: float | Literal["auto"] = "auto",
        exclude: Literal["patient", "group"] = "patient",
        patients: Mapping[str, str] | None = None,
        neighbors: int = 0,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        patience: int | None = 10,
        val_fraction: float = 0.2,
        refit: bool = True,
        augment: bool = True,
        seed: int = 0,
        device: str = "auto",
        show_progress_bar: bool = True,
    ):
        if image not in ("features", "patches"):
            raise ValueError(f"image must be 'features' or 'patches', got {image!r}.")
        if head not in ("trained", "ridge", "ridge+features") or (head == "ridge+features" and image != "features"):
            raise ValueError(
                f"head must be 'trained', 'ridge' or (with image='features') 'ridge+features', got {head!r}."
            )
        if exclude not in ("patient", "group"):
            raise ValueError(f"exclude must be 'patient' or 'group', got {exclude!r}.")
        if blend != "auto" and not (isinstance(blend, int | float) and 0 <= blend <= 1):
            raise ValueError(f"blend must be in [0, 1] or 'auto', got {blend!r}.")
        if k < 1 or neighbors < 0 or temperature <= 0 or contrastive_weight < 0:
            raise ValueError("k must be >= 1, neighbors >= 0, temperature > 0 and contrastive_weight >= 0.")
        if n_components is not None and n_components < 1:
            raise ValueError(f"n_components must be a positive integer or None, got {n_components!r}.")
        if image == "patches" and patch_px < 16:
            raise ValueError(f"patch_px must be at least 16, got {patch_px}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if epochs < 1 or batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2.")
        self.image = image
        self.input = image  # what fit / predict take (the base class and omx.tl read it)
        self.spatial = neighbors > 0
        self.encoder = get_encoder(encoder) if image == "features" else None
        if self.encoder is None:
            encoder = None
        self.patch_px = int(patch_px)
        self.width, self.hidden, self.embed_dim = int(width), int(hidden), int(embed_dim)
        self.dropout, self.temperature = float(dropout), float(temperature)
        self.learn_temperature = bool(learn_temperature)
        self.contrastive_weight = float(contrastive_weight)
        self.n_components = None if n_components is None else int(n_components)
        self.head = head
        self.k, self.blend, self.exclude = int(k), blend if blend == "auto" else float(blend), exclude
        self.patients = None if patients is None else {str(g): str(p) for g, p in patients.items()}
        self.neighbors = int(neighbors)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.weight_decay = float(weight_decay)
        self.patience = None if patience is None else int(patience)
        self.val_fraction, self.refit, self.augment = float(val_fraction), bool(refit), bool(augment)
        self.standardize = "group"  # read by the shared per-group feature standardisation of Ridge
        super().__init__(
            seed=seed,
            device=device,
            show_progress_bar=show_progress_bar,
            image=image,
            encoder=encoder if isinstance(encoder, str) or self.encoder is None else self.encoder.get_params(),
            patch_px=self.patch_px,
            width=self.width,
            hidden=self.hidden,
            embed_dim=self.embed_dim,
            dropout=self.dropout,
            temperature=self.temperature,
            learn_temperature=self.learn_temperature,
            contrastive_weight=self.contrastive_weight,
            n_components=self.n_components,
            head=self.head,
            k=self.k,
            blend=self.blend,
            exclude=self.exclude,
            patients=self.patients,
            neighbors=self.neighbors,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            patience=self.patience,
            val_fraction=self.val_fraction,
            refit=self.refit,
            augment=self.augment,
        )

    def _live_params(self) -> dict[str, Any]:
        return {"encoder": self.encoder} if self.encoder is not None else {}

    _standardise = Ridge._standardise  # per-group z-scores of features (uses x_mean_, x_scale_, standardize)

    # ------------------------------------------------------------------ networks
    def _build(self, d_in: int, n_targets: int, n_out: int) -> torch.nn.Module:
        import torch
        from torch import nn

        def mlp(d: int) -> nn.Module:
            if not self.hidden:  # linear tower
                return nn.Sequential(nn.Dropout(self.dropout), nn.Linear(d, self.embed_dim))
            return nn.Sequential(
                nn.Linear(d, self.hidden),
                nn.LayerNorm(self.hidden),
                nn.GELU(),
                nn.Dropout(self.dropout),
                nn.Linear(self.hidden, self.embed_dim),
            )

        if self.image == "patches":
            from ..encoders._torch import SmallCNN

            cnn = SmallCNN(None, width=self.width)
            image = nn.Sequential(cnn, mlp(cnn.dim))
        else:
            image = mlp(d_in)
        module = nn.ModuleDict(
            {
                "image": image,
                "expression": mlp(n_targets),
                "head": nn.Linear(self.embed_dim, n_out),
            }
        )
        if self.neighbors:
            module["context"] = _context_layer(self.embed_dim)
        module.register_parameter(
            "log_temperature",
            nn.Parameter(torch.tensor(float(np.log(self.temperature))), requires_grad=self.learn_temperature),
        )
        return module

    def _image_embed(self, x: torch.Tensor, nbr: torch.Tensor | None = None, nbr_mask=None) -> torch.Tensor:
        """Image embedding (unnormalised) of ``x``; with context, attending to the neighbours' embeddings."""
        h = self.module_["image"](x)
        if nbr is None:
            return h
        b, k = nbr_mask.shape
        hn = self.module_["image"](nbr).view(b, k, -1)
        return self.module_["context"](h, hn, nbr_mask)

    # ------------------------------------------------------------------ inputs
    def _prepare(self, X: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        """Model-ready inputs on the host: standardised float32 features, or the uint8 patches as they are."""
        if self.image == "patches":
            return X
        return self._standardise(X, groups).astype(np.float32)

    def _to_device(self, X: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        import torch

        from ..encoders._torch import to_tensor

        if self.image == "patches":
            x = to_tensor(X[rows], device)
            mean = torch.as_tensor(self.input_mean_, device=device).view(1, 3, 1, 1)
            std = torch.as_tensor(self.input_std_, device=device).view(1, 3, 1, 1)
            return x, mean, std
        x = torch.from_numpy(X[rows])
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        return x.to(device), None, None

    def _embed_rows(self, X, rows, nbrs, device, *, generator=None) -> torch.Tensor:
        """Image embeddings of ``rows`` (with their neighbours when there is context); augmented with a generator."""
        import torch

        nbr_rows = nbr_mask = None
        if nbrs is not None:
            idx, mask = nbrs
            nbr_rows, nbr_mask = idx[rows].ravel(), torch.from_numpy(mask[rows]).to(device)
            rows = np.concatenate([rows, nbr_rows])
        x, mean, std = self._to_device(X, rows, device)
        if generator is not None and self.augment:
            if self.image == "patches":
                x = augment_patches(x, generator)
            else:
                x = x + 0.1 * torch.randn(x.shape, generator=generator).to(device)
        if mean is not None:
            x = (x - mean) / std
        if nbrs is None:
            return self._image_embed(x)
        b = len(rows) - len(nbr_rows)
        return self._image_embed(x[:b], x[b:], nbr_mask)

    # ------------------------------------------------------------------ fit
    def _fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None, coords: np.ndarray | None = None) -> None:
        if self.k > len(X):
            raise ValueError(f"k={self.k} is larger than the reference bank ({len(X)} training rows); lower `k`.")
        rng = np.random.default_rng(self.seed)
        train_idx, val_idx = self._validation_split(len(X), groups, self.val_fraction, rng)
        self.head_alpha_ = None
        self._fit_rows(X, Y, groups, coords, train_idx, val_idx, epochs=self.epochs, patience=self.patience)
        if self.refit and len(val_idx):
            history, best, blend = self.history_, self.best_epoch_, self.blend_
            logger.info("Contrastive: refitting on all %d rows for %d epochs.", len(X), best + 1)
            self._fit_rows(X, Y, groups, coords, np.arange(len(X)), val_idx[:0], epochs=best + 1, patience=None)
            self.history_ = {**history, "refit_train_loss": self.history_["train_loss"]}
            self.best_epoch_, self.blend_ = best, blend

    def _fit_rows(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        groups: np.ndarray | None,
        coords: np.ndarray | None,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        epochs: int,
        patience: int | None,
    ) -> None:
        """Train on ``train_idx`` with early stopping on ``val_idx``; the bank holds every row."""
        import torch
        from torch.nn import functional as F

        device = self._torch_device()
        seed_everything(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        if self.image == "features":
            self.x_mean_, self.x_scale_ = X.mean(0), _safe_scale(X.std(0))
        else:
            self.input_mean_, self.input_std_ = _channel_stats(X, train_idx)
        Xp = self._prepare(X, groups)
        self.target_mean_ = Y[train_idx].mean(0)
        std = Y[train_idx].std(0)
        self.target_std_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        Yz = ((Y - self.target_mean_) / self.target_std_).astype(np.float32)
        self.components_ = None
        if self.n_components is not None and self.n_components < Y.shape[1]:
            _, _, vt = np.linalg.svd(Yz[train_idx] - Yz[train_idx].mean(0), full_matrices=False)
            self.components_ = vt[: self.n_components].astype(np.float32)
        R = Yz if self.components_ is None else Yz @ self.components_.T
        Yz_t = torch.from_numpy(Yz).to(device)
        R_t = torch.from_numpy(R.astype(np.float32)).to(device)
        nbrs = _neighbours(coords, groups, self.neighbors) if self.neighbors else None

        self.module_ = self._build(Xp.shape[1] if Xp.ndim == 2 else 0, Y.shape[1], R.shape[1]).to(device)
        labels_cache: dict[int, torch.Tensor] = {}

        def batch_loss(rows: np.ndarray, train: bool) -> torch.Tensor:
            h = self._embed_rows(Xp, rows, nbrs, device, generator=generator if train else None)
            loss = F.mse_loss(self.module_["head"](h).float(), R_t[rows])
            if self.contrastive_weight > 0:
                e = self.module_["expression"](Yz_t[rows])
                scale = torch.exp(-self.module_.log_temperature.clamp(np.log(0.01), np.log(1.0)))
                logits = F.normalize(h.float(), dim=1) @ F.normalize(e.float(), dim=1).T * scale
                target = labels_cache.setdefault(len(rows), torch.arange(len(rows), device=device))
                nce = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
                loss = loss + self.contrastive_weight * nce
            return loss

        bank = groups if groups is not None else np.full(len(X), "", dtype=object)
        val_groups = bank[val_idx]

        def score(pred: np.ndarray) -> float:
            scores = [np.nanmean(pearson(Yz[val_idx][m], pred[m])) for m in (val_groups == g for g in set(val_groups))]
            return float(np.nanmean(scores)) if np.isfinite(scores).any() else -np.inf

        def val_preds() -> tuple[np.ndarray, np.ndarray]:
            self._set_bank(Yz[train_idx], bank[train_idx], device)
            q = self._embed(Xp, val_idx, nbrs, device)
            reg = self._regress(q, Xp[val_idx])
            # without groups the validation rows are random rows, which no bank row shares a label with
            ret = self._retrieve(q, val_groups if groups is not None else None)[0] if self.k <= len(train_idx) else reg
            return reg, ret

        def val_score() -> float:
            reg, ret = val_preds()
            w = 0.5 if self.blend == "auto" else self.blend
            return score(w * ret + (1 - w) * reg)

        self._train(
            batch_loss,
            train_idx,
            val_idx,
            val_score=val_score,
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            patience=patience,
            generator=generator,
            device=device,
        )
        self.head_ridge_ = None
        if self.head in ("ridge", "ridge+features"):
            self._fit_ridge_head(Xp, Yz, train_idx, val_idx, nbrs, device, score)
        self.blend_ = 0.5 if self.blend == "auto" else self.blend
        if len(val_idx) and self.blend == "auto":
            reg, ret = val_preds()
            self.history_["blend_score"] = [score(w * ret + (1 - w) * reg) for w in BLEND_GRID]
            self.blend_ = float(BLEND_GRID[int(np.argmax(self.history_["blend_score"]))])
            logger.info("Contrastive: retrieval weight %.2f chosen on the validation groups.", self.blend_)
        # the reference bank: every training row (validation rows included), with its group label
        self._set_bank(Yz, bank, device)
        self.bank_targets_ = Y.astype(np.float32)

    def _head_inputs(self, Xp: np.ndarray, rows: np.ndarray, nbrs, device) -> np.ndarray:
        """What the ridge head reads: the image embedding, with the standardised features for ``"ridge+features"``."""
        H = self._embed(Xp, rows, nbrs, device).astype(np.float64)
        return np.concatenate([H, Xp[rows]], axis=1) if self.head == "ridge+features" else H

    def _fit_ridge_head(self, Xp, Yz, train_idx, val_idx, nbrs, device, score) -> None:
        """Replace the trained head by ridge on the image embeddings, its penalty chosen on the validation rows."""
        H = self._head_inputs(Xp, train_idx, nbrs, device)
        alphas = DEFAULT_ALPHAS if len(val_idx) else (self.head_alpha_ or 1.0,)
        z_mean, coefs, intercept, _ = _fit_ridge(H, Yz[train_idx].astype(np.float64), alphas, self.n_components)
        if len(val_idx):
            Hv = self._head_inputs(Xp, val_idx, nbrs, device) - z_mean
            scores = [score(Hv @ c + intercept) for c in coefs]
            self.history_["head_alpha_score"] = scores
            best = int(np.argmax(scores))
        else:
            best = 0
        self.head_alpha_ = float(alphas[best])
        self.head_ridge_ = {"mean": z_mean, "coef": coefs[best], "intercept": intercept}

    def _set_bank(self, Yz: np.ndarray, groups: np.ndarray, device: torch.device) -> None:
        import torch

        self.module_.eval()
        out = []
        with torch.inference_mode(), self._autocast(device):
            for start in range(0, len(Yz), QUERY_CHUNK):
                e = self.module_["expression"](torch.from_numpy(Yz[start : start + QUERY_CHUNK]).to(device))
                out.append(torch.nn.functional.normalize(e.float(), dim=1).cpu().numpy())
        self.bank_embedding_ = np.concatenate(out).astype(np.float32)
        self.bank_groups_ = np.asarray(groups).astype(str)
        self._bank_z = Yz.astype(np.float32)

    # ------------------------------------------------------------------ predict
    def _embed(self, Xp: np.ndarray, rows: np.ndarray, nbrs, device) -> np.ndarray:
        """Unnormalised image embeddings of ``rows``, in eval mode."""
        import torch

        self.module_.eval()
        out = []
        with torch.inference_mode(), self._autocast(device):
            for start in range(0, len(rows), self.batch_size):
                out.append(self._embed_rows(Xp, rows[start : start + self.batch_size], nbrs, device).float().cpu())
        return torch.cat(out).numpy()

    def _regress(self, h: np.ndarray, xp: np.ndarray) -> np.ndarray:
        """Standardised targets predicted by the regression head from embeddings ``h`` (and inputs ``xp``)."""
        import torch

        if getattr(self, "head_ridge_", None) is not None:
            r = self.head_ridge_
            if self.head == "ridge+features":
                h = np.concatenate([h, xp], axis=1)
            return ((h - r["mean"]) @ r["coef"] + r["intercept"]).astype(np.float32)
        head = self.module_["head"]
        with torch.inference_mode():
            w = head.weight.detach().float().cpu().numpy()
            b = head.bias.detach().float().cpu().numpy()
        out = h @ w.T + b
        return out if self.components_ is None else out @ self.components_

    def _allowed(self, query_group: str) -> np.ndarray:
        """Bank rows a query of ``query_group`` may retrieve."""
        bank = self.bank_groups_
        if query_group is None:
            return np.ones(len(bank), bool)
        keep = bank != query_group
        if self.exclude == "patient" and self.patients:
            patient = self.patients.get(query_group, query_group)
            keep &= np.array([self.patients.get(g, g) != patient for g in bank])
        return keep

    def _retrieve(self, h: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Retrieval from embeddings: (standardised prediction, bank indices (n, k), weights (n, k))."""
        q = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
        tau = float(np.exp(np.clip(float(self.module_.log_temperature.detach()), np.log(0.01), 0.0)))
        n, k = len(q), self.k
        pred = np.zeros((n, self._bank_z.shape[1]), np.float32)
        index = np.zeros((n, k), np.int64)
        weight = np.zeros((n, k), np.float32)
        labels = [None] if groups is None else np.unique(groups)
        for g in labels:
            rows = np.arange(n) if g is None else np.flatnonzero(groups == g)
            allowed = np.flatnonzero(self._allowed(g))
            if len(allowed) < k:
                raise ValueError(
                    f"Only {len(allowed)} reference spots may be retrieved for group {g!r} (its own section"
                    f"{' and patient' if self.exclude == 'patient' and self.patients else ''} excluded), fewer "
                    f"than k={k}. Lower `k`, or fit on more sections."
                )
            keys = self.bank_embedding_[allowed]
            for start in range(0, len(rows), QUERY_CHUNK):
                r = rows[start : start + QUERY_CHUNK]
                sim = q[r] @ keys.T
                top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
                s = np.take_along_axis(sim, top, axis=1)
                order = np.argsort(-s, axis=1, kind="stable")
                top, s = np.take_along_axis(top, order, axis=1), np.take_along_axis(s, order, axis=1)
                w = np.exp((s - s[:, :1]) / tau)
                w /= w.sum(1, keepdims=True)
                index[r], weight[r] = allowed[top], w
                pred[r] = np.einsum("nk,nkg->ng", w, self._bank_z[allowed[top]])
        return pred, index, weight

    def _queries(self, X: np.ndarray, groups: np.ndarray | None, coords: np.ndarray | None = None):
        """Image embeddings of the rows of ``X``, and the model-ready inputs."""
        device = self._torch_device()
        self.module_.to(device)
        nbrs = _neighbours(coords, groups, self.neighbors) if self.neighbors else None
        Xp = self._prepare(X, groups)
        return self._embed(Xp, np.arange(len(X)), nbrs, device), Xp

    def _predict(self, X: np.ndarray, groups: np.ndarray | None, coords: np.ndarray | None = None) -> np.ndarray:
        h, Xp = self._queries(X, groups, coords)
        w = self.blend_
        pred = self._regress(h, Xp) if w < 1 else 0.0
        if w > 0:
            pred = w * self._retrieve(h, groups)[0] + (1 - w) * pred
        return pred * self.target_std_ + self.target_mean_

    def predict(
        self,
        X: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        group_stats: dict[str, tuple[np.ndarray, np.ndarray, int]] | None = None,
        mode: Literal["default", "retrieval", "regression"] = "default",
    ) -> np.ndarray:
        """Predict targets by the fitted blend, by retrieval alone or by the regression head alone.

        Parameters
        ----------
        X
            Features or patches, as in :meth:`fit`.
        groups
            Label of each row (its section): features are standardised per group, and retrieval never returns a
            bank row of the row's group (nor of its patient, see `exclude`). Without groups nothing is excluded.
        coords
            Spot centres ``(n, 2)`` in microns, with ``neighbors > 0``.
        group_stats
            Feature statistics of whole groups predicted in chunks, as in `Model.predict`.
        mode
            ``"default"`` (the fitted `blend_`), ``"retrieval"`` or ``"regression"``.

        Returns
        -------
        Predictions, ``float32`` ``(n, g)`` on the scale of the targets given to :meth:`fit`.
        """
        if mode not in ("default", "retrieval", "regression"):
            raise ValueError(f"mode must be 'default', 'retrieval' or 'regression', got {mode!r}.")
        if mode == "default":
            return super().predict(X, groups=groups, coords=coords, group_stats=group_stats)
        blend = getattr(self, "blend_", None)
        try:
            self.blend_ = 1.0 if mode == "retrieval" else 0.0
            return super().predict(X, groups=groups, coords=coords, group_stats=group_stats)
        finally:
            self.blend_ = blend

    def retrieve(
        self, X: np.ndarray, *, groups: np.ndarray | None = None, coords: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Retrieve the `k` nearest reference spots of each row, leaving out its own section (and patient).

        Parameters
        ----------
        X, groups, coords
            As in :meth:`predict`.

        Returns
        -------
        The retrieval prediction ``(n, g)`` (on the targets' scale), the bank rows retrieved ``(n, k)`` (indices
        into `bank_targets_`, most similar first) and their weights ``(n, k)`` (rows sum to 1).
        """
        self._check_fitted()
        X = self._check_X(X)
        groups = self._check_groups(groups, len(X))
        h, _ = self._queries(X, groups, *self._spatial_args(coords, len(X)))
        pred, index, weight = self._retrieve(h, groups)
        return (pred * self.target_std_ + self.target_mean_).astype(np.float32), index, weight

    def set_device(self, device: str) -> None:
        """Run later predictions on `device` (``"auto"``, ``"cpu"``, ``"cuda"``)."""
        self.device = str(device)

    # ------------------------------------------------------------------ state
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        labels, codes = np.unique(self.bank_groups_, return_inverse=True)
        arrays = {
            "target_mean": self.target_mean_,
            "target_std": self.target_std_,
            "bank_embedding": self.bank_embedding_,
            "bank_targets": self.bank_targets_,
            "bank_z": self._bank_z,
            "bank_group_codes": codes.astype(np.int64),
        }
        if self.components_ is not None:
            arrays["components"] = self.components_
        if self.head_ridge_ is not None:
            arrays.update({f"head_ridge_{k}": np.asarray(v) for k, v in self.head_ridge_.items()})
        if self.image == "features":
            arrays.update(x_mean=self.x_mean_, x_scale=self.x_scale_)
        else:
            arrays.update(input_mean=self.input_mean_, input_std=self.input_std_)
        state = {
            "best_epoch_": int(getattr(self, "best_epoch_", 0)),
            "blend_": float(self.blend_),
            "bank_group_labels": labels.tolist(),
            "n_out": int(self.module_["head"].out_features),
            "d_in": int(self.n_features_in_) if self.image == "features" else 0,
        }
        return state, arrays

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.best_epoch_, self.blend_ = state["best_epoch_"], state["blend_"]
        self.target_mean_, self.target_std_ = arrays["target_mean"], arrays["target_std"]
        self.bank_embedding_, self.bank_targets_ = arrays["bank_embedding"], arrays["bank_targets"]
        self._bank_z = arrays["bank_z"]
        self.bank_groups_ = np.asarray(state["bank_group_labels"], dtype=str)[arrays["bank_group_codes"]]
        self.components_ = arrays.get("components")
        ridge = {k: arrays[f"head_ridge_{k}"] for k in ("mean", "coef", "intercept") if f"head_ridge_{k}" in arrays}
        self.head_ridge_ = ridge or None
        if self.image == "features":
            self.x_mean_, self.x_scale_ = arrays["x_mean"], arrays["x_scale"]
        else:
            self.input_mean_, self.input_std_ = arrays["input_mean"], arrays["input_std"]
        self.module_ = self._build(state["d_in"], len(self.target_mean_), state["n_out"])


def _neighbours(coords: np.ndarray, groups: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest spots of each spot in its group within 2.5 spot spacings: (indices (n, k), valid mask)."""
    from scipy.spatial import cKDTree

    n = len(coords)
    index = np.tile(np.arange(n)[:, None], (1, k))
    mask = np.zeros((n, k), bool)
    labels = np.zeros(n, int) if groups is None else np.unique(groups, return_inverse=True)[1]
    for g in np.unique(labels):
        rows = np.flatnonzero(labels == g)
        if len(rows) < 2:
            continue
        tree = cKDTree(coords[rows])
        m = min(k + 1, len(rows))
        dist, nn = tree.query(coords[rows], k=m)
        spacing = np.median(dist[:, 1])
        dist, nn = dist[:, 1:], nn[:, 1:]
        ok = dist <= 2.5 * spacing
        index[rows, : m - 1] = np.where(ok, rows[nn], rows[:, None])
        mask[rows, : m - 1] = ok
    return index, mask


def _context_layer(dim: int, heads: int = 4) -> torch.nn.Module:
    """One attention layer: a spot's embedding attends to itself and its neighbours (residual, layer norm)."""
    import torch
    from torch import nn

    class Context(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.norm = nn.LayerNorm(dim)

        def forward(self, h: torch.Tensor, hn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            tokens = torch.cat([h[:, None], hn], dim=1)
            pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
            out, _ = self.attn(h[:, None], tokens, tokens, key_padding_mask=pad, need_weights=False)
            return self.norm(h + out[:, 0])

    return Context()
