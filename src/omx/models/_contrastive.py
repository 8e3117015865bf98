"""Contrastive image-expression model (BLEEP / mclSTExp family) with a leakage-safe reference bank."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from omx._docs import doc_params
from omx._utils import logger, seed_everything
from omx.encoders import Encoder, get_encoder
from omx.models._backbone import backbone_tower, check_finetune, resolve_backbone, trained_patches
from omx.models._base import TorchModel
from omx.models._blend import blend_scores, group_score, simplex
from omx.models._cnn import _channel_stats, augment_patches
from omx.models._context import Context
from omx.models._contrastive_net import contrastive_module
from omx.models._neighbors import PROPAGATION_GRID, nearest, neighbour_matrix, propagate
from omx.models._retrieval import QUERY_CHUNK, RetrievalBank
from omx.models._ridge import DEFAULT_ALPHAS, Ridge, _fit_ridge
from omx.models._standardize import GroupStandardizer

if TYPE_CHECKING:
    import torch

#: Step of the grid of part weights (retrieval, head, linear; summing to 1) searched with ``blend="auto"``.
WEIGHT_STEP = 0.1
#: Weights of the parts without validation rows to choose them on.
DEFAULT_WEIGHTS = {"retrieval": 0.5, "head": 0.5, "linear": 0.0}
#: Most cross-fitting folds (groups are pooled into this many when there are more).
MAX_FOLDS = 5
#: Prediction modes of `Contrastive.predict`: the fitted blend, retrieval alone, the regression parts alone.
MODES = ("default", "retrieval", "regression")


@doc_params()
class Contrastive(TorchModel):
    """Contrastive image-expression model: a shared embedding of H&E and expression, predicting two ways.

    An image tower (an MLP on precomputed features, `~omx.encoders.SmallCNN` on patches trained from scratch, or
    a foundation `backbone` whose last blocks or LoRA adapters train with it) and an expression tower (an MLP on
    the standardised targets) each end in a projection head onto a shared, L2-normalised embedding; a symmetric
    InfoNCE loss (BLEEP, CLIP) with a learned or fixed temperature pulls each spot's image and expression
    embeddings together. With spot context (``neighbors > 0``, the
    default), the image embedding of a spot attends to those of its nearest spots in the same section
    (mclSTExp's idea), and the predictions are propagated over the same neighbours; the model then requires the
    spot centres (``Context.coords``). ``neighbors=0`` switches context off.

    The prediction stacks three parts, each exposed:

    - **retrieval** (:meth:`retrieve`, ``mode="retrieval"``): the similarity-weighted (softmax at the learned
      temperature) average of the expression of the `k` reference spots whose expression embeddings are nearest
      the query's image embedding. The reference bank (`RetrievalBank`) is the training spots only, with their
      group labels and patients. A query never retrieves a bank row of its own group (section) nor, when the
      context gives the patient of each row (``Context.patients``, for the bank at fit and for the queries) and
      ``exclude="patient"``, of its own patient.
    - **regression head** (``mode="regression"``, with the linear part): a linear head on the image embedding
      (before normalisation), trained jointly with the InfoNCE loss (mean squared error, on `n_components`
      principal components of the targets); with ``head="ridge"`` or ``"ridge+features"`` (the default) it is
      then replaced by ridge in closed form from the image embedding (and the standardised features).
    - **linear** (features only): `Ridge` on the features, its penalty and components chosen by its own CV.

    Everything is chosen by cross-fitting: each training group (section; pooled into at most 5 folds) is held
    out in turn, the towers are trained on the others with early stopping on it, and the held-out rows are
    predicted by every part. On these out-of-fold predictions ``blend="auto"`` (the default) chooses the
    weights of the parts (a grid of step 0.1 summing to 1), the head's ridge penalty and, with context, the
    neighbours' share of the propagation (the grid `~omx.models.GraphRidge` searches). The towers are then
    trained on all rows for the mean of the folds' best epoch counts. A float `blend` fixes
    ``w * retrieval + (1 - w) * head``.

    How it compares with the other model families on her2st, and what each part and option adds there: see
    "Model families on her2st" in the guide.

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
        ``"patches"``: an image network on uint8 patches of `patch_px` pixels, a CNN from scratch or the trained
        `backbone`, then an MLP. None: ``"patches"`` with a trained backbone, else ``"features"``.
    encoder
        The encoder of ``image="features"`` (``"handcrafted"``, an `~omx.encoders.Encoder` or a torch module). A
        frozen `backbone` is this encoder by another name: pass one or the other.
    patch_px
        Side of the patches of ``image="patches"``. None: 64, or the backbone's ``patch_px`` with a trained
        backbone (which takes no other).
    width
        Channels of the first CNN stage (``image="patches"`` without a backbone).
    {backbone}
    {finetune}
    {n_blocks}
    {lora_rank}
    {gradient_checkpointing}
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
        The regression head: ``"trained"`` (the linear head trained with the towers), ``"ridge"`` (after
        training, ridge regression from the image embedding in closed form, its penalty chosen on the
        cross-fitted rows) or ``"ridge+features"`` (the same from the embedding and the standardised features;
        ``image="features"`` only). None: ``"ridge+features"`` on features, ``"ridge"`` on patches.
    k
        Reference spots averaged by retrieval.
    blend
        ``"auto"``: weights of retrieval, head and linear part chosen on the cross-fitted rows; a number ``w``
        in [0, 1]: ``w * retrieval + (1 - w) * head``, no linear part.
    exclude
        Bank rows a query never retrieves: ``"patient"`` (its patient's rows, where the context gives the
        patients of the bank and of the query, else its section's) or ``"group"`` (its own section only). `omx.tl`
        gives every row's patient from the table's ``obs["patient"]``.
    neighbors
        Neighbouring spots (nearest, within the same group and 2.5 spot spacings) whose image embeddings each spot
        attends to and over which predictions are propagated; 0 switches spot context off. With neighbours the
        model requires ``Context.coords``.
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
        Without two or more groups: the share of rows held out once for validation (with groups, each group is
        held out in turn). 0 disables validation: no early stopping, and the parts weigh `DEFAULT_WEIGHTS`.
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
    mpp
        The backbone's native resolution in microns per pixel with a trained backbone (`omx.tl` cuts patches of
        ``patch_px * mpp`` microns), else None.
    module_
        The networks: ``image`` (with a trained backbone, ``Sequential(BackboneTower, MLP)``), ``expression``,
        ``head``, optional ``context`` and the log temperature.
    bank_
        The reference bank (`RetrievalBank`) of the training spots: their expression embeddings, standardised
        targets, section labels (``""`` when fitted without groups) and patients.
    weights_
        Weight of each part: ``{"retrieval": ..., "head": ..., "linear": ...}`` (summing to 1).
    propagation_
        The neighbours' share of the propagation (0: none).
    head_alpha_
        Penalty of the ridge head.
    linear_
        The linear part (a fitted `Ridge`), or None.
    fold_best_epochs_
        Best epoch (from 0) of each cross-fitting fold.
    history_
        ``"train_loss"``, ``"val_loss"``, ``"val_score"`` (validation Pearson r) per epoch of the first
        cross-fitting fold; ``"refit_train_loss"`` of the final training on all rows; ``"head_alpha_score"``,
        ``"weights_grid"`` / ``"weights_score"`` and ``"share_grid"`` / ``"share_score"``: the mean
        out-of-fold Pearson r of each choice.
    best_epoch_
        Last epoch (from 0) of the final training.
    """

    def __init__(
        self,
        *,
        image: Literal["features", "patches"] | None = None,
        encoder: str | Encoder | Any = "handcrafted",
        patch_px: int | None = None,
        width: int = 32,
        backbone: str | Encoder | Any | None = None,
        finetune: Literal["frozen", "last_blocks", "lora"] = "frozen",
        n_blocks: int = 2,
        lora_rank: int = 8,
        gradient_checkpointing: bool = False,
        hidden: int = 256,
        embed_dim: int = 128,
        dropout: float = 0.2,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        contrastive_weight: float = 1.0,
        n_components: int | None = 20,
        head: Literal["trained", "ridge", "ridge+features"] | None = None,
        k: int = 50,
        blend: float | Literal["auto"] = "auto",
        exclude: Literal["patient", "group"] = "patient",
        neighbors: int = 6,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        patience: int | None = 10,
        val_fraction: float = 0.2,
        augment: bool = True,
        seed: int = 0,
        device: str = "auto",
        show_progress_bar: bool = True,
    ):
        check_finetune(finetune, n_blocks, lora_rank, has_backbone=backbone is not None)
        trains = backbone is not None and finetune != "frozen"
        if image is None:
            image = "patches" if trains else "features"
        if image not in ("features", "patches"):
            raise ValueError(f"image must be 'features' or 'patches', got {image!r}.")
        if backbone is not None and image != ("patches" if trains else "features"):
            takes = "takes patches" if trains else "gives features"
            raise ValueError(f"A backbone with finetune={finetune!r} {takes}, not image={image!r}: leave image=None.")
        if backbone is not None and not trains and not (isinstance(encoder, str) and encoder == "handcrafted"):
            raise ValueError(
                "A frozen backbone is the encoder of the features: pass it as `backbone=` or as `encoder=`, not both."
            )
        if head is None:
            head = "ridge+features" if image == "features" else "ridge"
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
        if patch_px is not None and patch_px < 16:
            raise ValueError(f"patch_px must be at least 16, got {patch_px}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if epochs < 1 or batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2.")
        self.image = image
        self.backbone = (
            None if backbone is None else resolve_backbone(backbone, finetune, n_blocks=n_blocks, owner="Contrastive")
        )
        self.finetune, self.n_blocks, self.lora_rank = finetune, int(n_blocks), int(lora_rank)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.encoder = None
        if image == "features":
            self.encoder = self.backbone if self.backbone is not None else get_encoder(encoder)
        self.mpp = None
        if trains:
            patch_px, self.mpp = trained_patches(self.backbone, patch_px)
        self.patch_px = 64 if patch_px is None else int(patch_px)
        self.width, self.hidden, self.embed_dim = int(width), int(hidden), int(embed_dim)
        self.dropout, self.temperature = float(dropout), float(temperature)
        self.learn_temperature = bool(learn_temperature)
        self.contrastive_weight = float(contrastive_weight)
        self.n_components = None if n_components is None else int(n_components)
        self.head = head
        self.k, self.blend, self.exclude = int(k), blend if blend == "auto" else float(blend), exclude
        self.neighbors = int(neighbors)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.weight_decay = float(weight_decay)
        self.patience = None if patience is None else int(patience)
        self.val_fraction, self.augment = float(val_fraction), bool(augment)
        super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)

    def _describe_param(self, name: str, value: Any) -> Any:
        if name == "encoder" and self.encoder is None:  # image="patches" has no encoder
            return None
        return super()._describe_param(name, value)

    @property
    def input(self) -> str:
        """What :meth:`fit` and :meth:`predict` take: `image` (``"features"`` or ``"patches"``)."""
        return self.image

    @property
    def uses(self) -> frozenset[str]:
        """Groups, patients and group statistics; with spot context (``neighbors > 0``) the coordinates too."""
        return frozenset({"groups", "patients", "group_stats", *(("coords",) if self.neighbors else ())})

    @property
    def requires(self) -> frozenset[str]:
        """The coordinates with spot context (``neighbors > 0``), else nothing."""
        return frozenset({"coords"}) if self.neighbors else frozenset()

    def _standardise(self, X: np.ndarray, groups: np.ndarray | None, group_stats=None) -> np.ndarray:
        """Per-group z-scores of features, as `Ridge` (and so its linear part) standardises them."""
        return self.standardizer_.transform(X, groups, group_stats)

    @property
    def _trains_backbone(self) -> bool:
        return self.backbone is not None and self.finetune != "frozen"

    # ------------------------------------------------------------------ networks
    def _build(self, d_in: int, n_targets: int, n_out: int) -> torch.nn.Module:
        tower = None
        if self._trains_backbone:
            tower = backbone_tower(
                self.backbone, self.finetune, n_blocks=self.n_blocks, lora_rank=self.lora_rank,
                gradient_checkpointing=self.gradient_checkpointing,
            )  # fmt: skip
        return contrastive_module(
            d_in, n_targets, n_out, image=self.image, width=self.width, hidden=self.hidden,
            embed_dim=self.embed_dim, dropout=self.dropout, context=bool(self.neighbors),
            temperature=self.temperature, learn_temperature=self.learn_temperature, tower=tower,
        )  # fmt: skip

    def _image_embed(self, x: torch.Tensor, nbr: torch.Tensor | None = None, nbr_mask=None) -> torch.Tensor:
        """Image embedding (unnormalised) of ``x``; with context, attending to the neighbours' embeddings."""
        h = self.module_["image"](x)
        if nbr is None:
            return h
        b, k = nbr_mask.shape
        hn = self.module_["image"](nbr).view(b, k, -1)
        return self.module_["context"](h, hn, nbr_mask)

    # ------------------------------------------------------------------ inputs
    def _prepare(self, X: np.ndarray, groups: np.ndarray | None, group_stats=None) -> np.ndarray:
        """Model-ready inputs on the host: standardised float32 features, or the uint8 patches as they are."""
        if self.image == "patches":
            return X
        return self._standardise(X, groups, group_stats).astype(np.float32)

    def _to_device(self, X: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        import torch

        from omx.encoders._torch import to_tensor

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
    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        groups, patients, coords = context.groups, context.patients, context.coords
        if self.k > len(X):
            raise ValueError(f"k={self.k} is larger than the reference bank ({len(X)} training rows); lower `k`.")
        rng = np.random.default_rng(self.seed)
        nbrs = nearest(coords, groups, self.neighbors) if self.neighbors else None
        folds = self._folds(len(X), groups, rng)
        oof = [self._fit_fold(X, Y, groups, patients, nbrs, train, val) for train, val in folds]
        first = self.history_ if folds else {}
        self._choose(oof, nbrs)
        epochs = int(round(np.mean(self.fold_best_epochs_))) + 1 if folds else self.epochs
        if folds:
            logger.info("Contrastive: training on all %d rows for %d epochs.", len(X), epochs)
        everything = np.arange(len(X))
        Xp, Yz = self._fit_rows(X, Y, groups, patients, nbrs, everything, everything[:0], epochs=epochs, patience=None)
        if self.head != "trained":
            self._fit_ridge_head(Xp, Yz, everything, nbrs, [self.head_alpha_])
        self.linear_ = self._fit_linear(X, Yz, groups) if self.image == "features" else None
        self.bank_ = self._make_bank(Yz, everything, groups, patients, self._torch_device())
        if folds:
            self.history_ = {**first, "refit_train_loss": self.history_["train_loss"], **self.cv_}
        self.best_epoch_ = epochs - 1

    def _folds(self, n: int, groups: np.ndarray | None, rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
        """Cross-fitting folds: each group held out in turn (at most `MAX_FOLDS`), else one random split."""
        if groups is not None and len(np.unique(groups)) >= 2 and self.val_fraction > 0:
            labels = rng.permutation(np.unique(groups))
            fold_of = {label: i % MAX_FOLDS for i, label in enumerate(labels)}
            assignment = np.array([fold_of[g] for g in groups])
            return [(np.flatnonzero(assignment != f), np.flatnonzero(assignment == f)) for f in np.unique(assignment)]
        train, val = self._validation_split(n, None, self.val_fraction, rng)
        return [(train, val)] if len(val) else []

    def _fit_fold(self, X, Y, groups, patients, nbrs, train_idx, val_idx) -> dict[str, Any]:
        """Train on one fold; return its validation rows' predictions by every part (standardised targets)."""
        Xp, Yz = self._fit_rows(
            X, Y, groups, patients, nbrs, train_idx, val_idx, epochs=self.epochs, patience=self.patience
        )
        device = self._torch_device()
        val_groups = groups[val_idx] if groups is not None else None
        h = self._embed(Xp, val_idx, nbrs, device)
        if self.head == "trained":
            heads = [self._regress(h, Xp[val_idx])]
        else:  # one ridge head per penalty
            heads = []
            for fitted in self._fit_ridge_head(Xp, Yz, train_idx, nbrs, DEFAULT_ALPHAS):
                self.head_ridge_ = fitted
                heads.append(self._regress(h, Xp[val_idx]))
        bank = self._make_bank(Yz, train_idx, groups, patients, device)
        try:
            retrieval = self._retrieve(bank, h, val_groups, _rows(patients, val_idx))[0]
        except ValueError:  # too few rows of other sections (patients) in this fold's bank
            retrieval = None
        linear = None
        if self.image == "features":
            linear = self._fit_linear(X[train_idx], Yz[train_idx], groups[train_idx] if groups is not None else None)
            linear = linear.predict(X[val_idx], groups=val_groups)
        return {
            "rows": val_idx,
            "truth": Yz[val_idx],
            "groups": val_groups if val_groups is not None else np.full(len(val_idx), ""),
            "heads": heads,
            "retrieval": retrieval,
            "linear": linear,
            "best_epoch": self.best_epoch_,
        }

    def _fit_linear(self, X: np.ndarray, Yz: np.ndarray, groups: np.ndarray | None) -> Ridge:
        """The linear part: `Ridge` on the features (its penalty and components chosen by its own CV)."""
        return Ridge(encoder=self.encoder, seed=self.seed, show_progress_bar=False).fit(X, Yz, groups=groups)

    def _choose(self, oof: list[dict[str, Any]], nbrs) -> None:
        """Choose the head's penalty, the weights of the parts and the neighbour share on the cross-fitted rows."""
        self.fold_best_epochs_ = [int(f["best_epoch"]) for f in oof]
        self.head_alpha_, self.weights_, self.propagation_ = 1.0, dict(DEFAULT_WEIGHTS), 0.0
        if self.blend != "auto":
            self.weights_ = {"retrieval": self.blend, "head": 1.0 - self.blend, "linear": 0.0}
        self.cv_ = {}
        if not oof:
            return
        if self.head != "trained":
            head_scores = np.mean([[group_score(f["truth"], p, f["groups"]) for p in f["heads"]] for f in oof], axis=0)
            best = int(np.argmax(head_scores))
            self.head_alpha_ = float(DEFAULT_ALPHAS[best])
            self.cv_["head_alpha_score"] = head_scores.tolist()
        else:
            best = 0
        parts = {"head": [f["heads"][best] for f in oof]}
        if all(f["retrieval"] is not None for f in oof):
            parts["retrieval"] = [f["retrieval"] for f in oof]
        if self.image == "features":
            parts["linear"] = [f["linear"] for f in oof]
        shares = PROPAGATION_GRID if self.neighbors else (0.0,)
        if self.blend == "auto":
            grid = simplex(len(parts), WEIGHT_STEP)
        else:  # the fixed weights, over the parts the folds could score
            total = sum(self.weights_[name] for name in parts) or 1.0
            grid = [[self.weights_[name] / total for name in parts]]
        scores = blend_scores(
            parts,
            [f["truth"] for f in oof],
            [f["groups"] for f in oof],
            grid,
            shares,
            [neighbour_matrix(*nbrs, f["rows"]) for f in oof] if self.neighbors else None,
        )
        s, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        if self.blend == "auto":
            chosen = dict(zip(parts, map(float, grid[j]), strict=True))
            self.weights_ = {"retrieval": 0.0, "head": 0.0, "linear": 0.0, **chosen}
        self.propagation_ = float(shares[s])
        self.cv_.update(
            weights_grid=[dict(zip(parts, map(float, w), strict=True)) for w in grid],
            weights_score=scores[s].tolist(),
            share_grid=list(shares),
            share_score=scores.max(1).tolist(),
        )
        logger.info(
            "Contrastive: weights %s and neighbour share %.1f chosen on %d cross-fitted folds (mean Pearson r %.3f).",
            {k: round(v, 2) for k, v in self.weights_.items()}, self.propagation_, len(oof), scores[s, j],
        )  # fmt: skip

    def _fit_rows(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        groups: np.ndarray | None,
        patients: np.ndarray | None,
        nbrs,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        epochs: int,
        patience: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Train the towers on ``train_idx``, early-stopping on ``val_idx``; return model-ready inputs and targets."""
        import torch
        from torch.nn import functional as F

        device = self._torch_device()
        seed_everything(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        if self.image == "features":
            self.standardizer_ = GroupStandardizer().fit(X)
        elif self._trains_backbone:  # the backbone's own normalisation
            self.input_mean_ = np.asarray(self.backbone.mean, dtype=np.float32)
            self.input_std_ = np.asarray(self.backbone.std, dtype=np.float32)
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

        self.module_ = self._build(Xp.shape[1] if Xp.ndim == 2 else 0, Y.shape[1], R.shape[1]).to(device)
        self.head_ridge_ = None
        labels_cache: dict[int, torch.Tensor] = {}

        def batch_loss(_net, rows: np.ndarray, train: bool) -> torch.Tensor:  # no DDP: calls parts of module_
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

        val_groups, val_patients = _rows(groups, val_idx), _rows(patients, val_idx)

        def val_score() -> float:
            # early stopping follows the trained head and retrieval, half and half
            bank = self._make_bank(Yz, train_idx, groups, patients, device)
            q = self._embed(Xp, val_idx, nbrs, device)
            pred = self._regress(q, Xp[val_idx])
            try:
                pred = 0.5 * pred + 0.5 * self._retrieve(bank, q, val_groups, val_patients)[0]
            except ValueError:  # too few rows of other sections (patients) to retrieve from
                pass
            return group_score(Yz[val_idx], pred, val_groups if groups is not None else np.full(len(val_idx), ""))

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
        return Xp, Yz

    def _head_inputs(self, Xp: np.ndarray, rows: np.ndarray, nbrs, device) -> np.ndarray:
        """What the ridge head reads: the image embedding, with the standardised features for ``"ridge+features"``."""
        H = self._embed(Xp, rows, nbrs, device).astype(np.float64)
        return np.concatenate([H, Xp[rows]], axis=1) if self.head == "ridge+features" else H

    def _fit_ridge_head(self, Xp, Yz, rows, nbrs, alphas) -> list[dict[str, np.ndarray]]:
        """Ridge heads (one per penalty in ``alphas``) on the image embeddings of ``rows``; the first is the head."""
        self.head_ridge_ = None
        H = self._head_inputs(Xp, rows, nbrs, self._torch_device())
        z_mean, coefs, intercept, _ = _fit_ridge(H, Yz[rows].astype(np.float64), alphas, self.n_components)
        fitted = [{"mean": z_mean, "coef": c, "intercept": intercept} for c in coefs]
        self.head_ridge_ = fitted[0]
        return fitted

    def _make_bank(
        self,
        Yz: np.ndarray,
        rows: np.ndarray,
        groups: np.ndarray | None,
        patients: np.ndarray | None,
        device: torch.device,
    ) -> RetrievalBank:
        """The reference bank of ``rows``: their expression embeddings, standardised targets, groups and patients."""
        import torch

        self.module_.eval()
        Yb = Yz[rows]
        out = []
        with torch.inference_mode(), self._autocast(device):
            for start in range(0, len(Yb), QUERY_CHUNK):
                e = self.module_["expression"](torch.from_numpy(Yb[start : start + QUERY_CHUNK]).to(device))
                out.append(torch.nn.functional.normalize(e.float(), dim=1).cpu().numpy())
        labels = groups[rows] if groups is not None else np.full(len(rows), "")
        return RetrievalBank(np.concatenate(out), Yb, labels, _rows(patients, rows), exclude=self.exclude)

    def _retrieve(
        self,
        bank: RetrievalBank,
        h: np.ndarray,
        groups: np.ndarray | None,
        patients: np.ndarray | None,
        strict: bool = True,
    ) -> tuple[np.ndarray, ...]:
        """Retrieval from image embeddings ``h`` at the learned temperature (see `RetrievalBank.query`)."""
        tau = float(np.exp(np.clip(float(self.module_.log_temperature.detach()), np.log(0.01), 0.0)))
        return bank.query(h, k=self.k, temperature=tau, groups=groups, patients=patients, strict=strict)

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

    def _queries(self, X: np.ndarray, context: Context):
        """Image embeddings of the rows of ``X``, the model-ready inputs and the neighbours (None without context)."""
        device = self._torch_device()
        self.module_.to(device)
        groups = context.groups
        nbrs = nearest(context.coords, groups, self.neighbors) if self.neighbors else None
        Xp = self._prepare(X, groups, context.group_stats)
        return self._embed(Xp, np.arange(len(X)), nbrs, device), Xp, nbrs

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        return self._blend(X, context, self.weights_)

    def _blend(self, X: np.ndarray, context: Context, weights: dict[str, float]) -> np.ndarray:
        """The parts' predictions weighted by ``weights``, propagated over the neighbours, on the targets' scale."""
        h, Xp, nbrs = self._queries(X, context)
        pred = np.zeros((len(X), len(self.target_mean_)), np.float32)
        if weights["head"]:
            pred += weights["head"] * self._regress(h, Xp)
        if weights["linear"]:
            linear = self.linear_.predict(X, Context(groups=context.groups, group_stats=context.group_stats))
            pred += weights["linear"] * linear
        if weights["retrieval"]:
            regression = weights["head"] + weights["linear"]
            retrieval, _, _, ok = self._retrieve(self.bank_, h, context.groups, context.patients, regression == 0)
            pred[ok] += weights["retrieval"] * retrieval[ok]
            pred[~ok] /= regression  # rows with nothing to retrieve: the regression parts, reweighted to sum to 1
        if self.propagation_ and nbrs is not None:
            pred = propagate(pred, neighbour_matrix(*nbrs), self.propagation_)
        return pred * self.target_std_ + self.target_mean_

    def _mode_weights(self, mode: str) -> dict[str, float]:
        """The parts' weights of a prediction mode (see :meth:`predict`)."""
        if mode == "default":
            return dict(self.weights_)
        if mode == "retrieval":
            return {"retrieval": 1.0, "head": 0.0, "linear": 0.0}
        total = self.weights_["head"] + self.weights_["linear"]  # the regression parts, in their fitted proportion
        share = self.weights_["linear"] / total if total > 0 else 0.0
        return {"retrieval": 0.0, "head": 1.0 - share, "linear": share}

    def predict(
        self,
        X: np.ndarray,
        context: Context | None = None,
        *,
        groups: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        mode: Literal["default", "retrieval", "regression"] = "default",
    ) -> np.ndarray:
        """Predict targets by the fitted blend, by retrieval alone or by the regression head alone.

        Parameters
        ----------
        X
            Features or patches, as in :meth:`fit`.
        context
            The rows' groups (sections: features are standardised per group, and retrieval never returns a bank
            row of the row's group), patients (nor of its patient, see `exclude`), coordinates (with
            ``neighbors > 0``) and the statistics of groups predicted in chunks; see `Model.predict`. Without
            groups nothing is excluded.
        groups
            Shorthand for ``Context(groups=groups)``.
        coords
            Shorthand for ``Context(coords=coords)``.
        mode
            ``"default"`` (the fitted `weights_`), ``"retrieval"`` (retrieval alone) or ``"regression"`` (the
            head and the linear part in their fitted proportion).

        Returns
        -------
        Predictions, ``float32`` ``(n, g)`` on the scale of the targets given to :meth:`fit`.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be 'default', 'retrieval' or 'regression', got {mode!r}.")
        if mode == "default":
            return super().predict(X, context, groups=groups, coords=coords)
        self._check_fitted()
        weights = self._mode_weights(mode)
        X = self._check_X(X)
        context = self._context(context, groups, coords, len(X))
        return self._blend(X, context, weights).astype(np.float32)

    def retrieve(
        self,
        X: np.ndarray,
        context: Context | None = None,
        *,
        groups: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Retrieve the `k` nearest reference spots of each row, leaving out its own section (and patient).

        Parameters
        ----------
        X, context, groups, coords
            As in :meth:`predict`.

        Returns
        -------
        The retrieval prediction ``(n, g)`` (on the targets' scale), the bank rows retrieved ``(n, k)`` (indices
        of `bank_`, most similar first) and their weights ``(n, k)`` (rows sum to 1).
        """
        self._check_fitted()
        X = self._check_X(X)
        context = self._context(context, groups, coords, len(X))
        h, _, _ = self._queries(X, context)
        pred, index, weight, _ = self._retrieve(self.bank_, h, context.groups, context.patients)
        return (pred * self.target_std_ + self.target_mean_).astype(np.float32), index, weight

    # ------------------------------------------------------------------ state
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        bank_state, bank_arrays = self.bank_.get_state()
        arrays = {
            "target_mean": self.target_mean_,
            "target_std": self.target_std_,
            **{f"bank_{k}": v for k, v in bank_arrays.items()},
        }
        if self.components_ is not None:
            arrays["components"] = self.components_
        if self.head_ridge_ is not None:
            arrays.update({f"head_ridge_{k}": np.asarray(v) for k, v in self.head_ridge_.items()})
        linear_state = None
        if self.linear_ is not None:
            linear_state, linear_arrays = self.linear_._export_state("linear_")
            arrays.update(linear_arrays)
        if self.image == "features":
            arrays.update(x_mean=self.standardizer_.mean_, x_scale=self.standardizer_.scale_)
        else:
            arrays.update(input_mean=self.input_mean_, input_std=self.input_std_)
        state = {
            "best_epoch_": int(getattr(self, "best_epoch_", 0)),
            "weights_": self.weights_,
            "propagation_": self.propagation_,
            "head_alpha_": self.head_alpha_,
            "linear_state": linear_state,
            "bank": bank_state,
            "n_out": int(self.module_["head"].out_features),
            "d_in": int(self.n_features_in_) if self.image == "features" else 0,
        }
        return state, arrays

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.best_epoch_, self.weights_ = state["best_epoch_"], state["weights_"]
        self.propagation_, self.head_alpha_ = state["propagation_"], state["head_alpha_"]
        self.target_mean_, self.target_std_ = arrays["target_mean"], arrays["target_std"]
        bank_arrays = {k[len("bank_") :]: v for k, v in arrays.items() if k.startswith("bank_")}
        self.bank_ = RetrievalBank.from_state(
            state["bank"] if "bank" in state else _old_bank(state, bank_arrays, self.exclude), bank_arrays
        )
        self.components_ = arrays.get("components")
        ridge = {k: arrays[f"head_ridge_{k}"] for k in ("mean", "coef", "intercept") if f"head_ridge_{k}" in arrays}
        self.head_ridge_ = ridge or None
        self.linear_ = None
        if state.get("linear_state") is not None:
            self.linear_ = Ridge(encoder=self.encoder, seed=self.seed, show_progress_bar=False)._restore_state(
                state["linear_state"],
                arrays,
                "linear_",
                n_targets=len(self.target_mean_),
                n_features_in=self.n_features_in_,
            )
        if self.image == "features":
            self.standardizer_ = GroupStandardizer().set_state({"mean": arrays["x_mean"], "scale": arrays["x_scale"]})
        else:
            self.input_mean_, self.input_std_ = arrays["input_mean"], arrays["input_std"]
        self.module_ = self._build(state["d_in"], len(self.target_mean_), state["n_out"])


def _old_bank(state: dict[str, Any], arrays: dict[str, np.ndarray], exclude: str) -> dict[str, Any]:
    """The bank's state from a file saved before the bank was its own object (its arrays renamed in place)."""
    arrays["targets"] = arrays.pop("z")  # retrieval averages the standardised targets
    if state.get("bank_patient_labels") is None:
        warnings.warn(
            "This Contrastive was saved by an older omx, whose bank does not know the patient of each row: its "
            "retrieval leaves out only the query's own section. Fit it again to leave out the query's patient too.",
            stacklevel=4,
        )
    return {
        "exclude": "patient",
        "group_labels": state["bank_group_labels"],
        "patient_labels": state.get("bank_patient_labels"),
    }


def _rows(labels: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    """``labels[rows]``, or None without labels."""
    return None if labels is None else labels[rows]
