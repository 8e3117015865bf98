"""CNN regression from patches to expression (ST-Net-like), from scratch or on a foundation backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from omx._docs import doc_params
from omx._utils import seed_everything
from omx.metrics import pearson
from omx.models._backbone import backbone_tower, check_finetune, resolve_backbone, trained_patches
from omx.models._base import TorchModel
from omx.models._context import Context
from omx.models._standardize import GroupStandardizer

if TYPE_CHECKING:
    import torch

    from omx.encoders import Encoder, TorchEncoder


@doc_params()
class CNNRegressor(TorchModel):
    """A network from patches (or a foundation backbone's features) to standardised targets, trained end to end.

    Without a `backbone` it is a small residual CNN (`~omx.encoders.SmallCNN`) with a linear head, trained from
    scratch on patches of `patch_px` pixels scaled to ``[0, 1]`` and normalised per channel with the training
    patches' statistics. With a foundation `backbone` the head is an MLP (one hidden layer of `hidden` units,
    dropout) on the backbone's embedding, and `finetune` says what trains with it: nothing (``"frozen"``: a
    feature model on the backbone's features, standardised per group as `Ridge` does, with no image pass in
    training), the last blocks (``"last_blocks"``) or LoRA adapters (``"lora"``), on patches at the backbone's
    size, resolution and normalisation.

    Targets are standardised per column on the training rows (mean squared error on that scale) and predictions
    come back on the original scale. Training uses Adam, augmentation of patches (random flips and 90-degree
    rotations, mild jitter of the H, E and DAB stain concentrations), and early stopping on the mean per-gene
    Pearson r of a validation split (whole groups when `groups` holds two or more, else a random `val_fraction`
    of the rows), restoring the weights of the best epoch. On CUDA it runs in mixed precision (bfloat16 where
    supported) with pinned host memory; on the CPU two fits with the same seed give identical predictions.

    How it compares with the other model families on her2st: see "Model families on her2st" in the guide.

    Parameters
    ----------
    patch_px
        Side in pixels of the patches (fit and predict check it). None: 64 without a backbone, the backbone's
        ``patch_px`` with one (a trained backbone takes no other).
    width
        Channels of the first CNN stage (see `~omx.encoders.SmallCNN`); without a backbone only.
    {backbone}
    {finetune}
    {n_blocks}
    {lora_rank}
    {gradient_checkpointing}
    hidden
        Hidden units of the MLP head on a backbone (0: a linear head).
    dropout
        Dropout of the MLP head on a backbone.
    epochs
        Maximum number of epochs.
    batch_size
        Patches (or feature rows) per step.
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay (L2).
    patience
        Epochs without validation improvement before stopping; 0 or None trains all `epochs`.
    val_fraction
        Share of rows for validation (at least that much, in whole groups when there are groups); 0 disables
        validation and early stopping.
    augment
        Augment training patches (not features).
    seed
        Seed of initialisation, splits, shuffling and augmentation.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
    show_progress_bar
        Show a progress bar over epochs.

    Attributes
    ----------
    input
        ``"features"`` with a frozen backbone, else ``"patches"``.
    encoder
        The backbone, whose features the model takes (frozen backbone only).
    mpp
        The backbone's native resolution in microns per pixel with a trained backbone (`omx.tl` cuts patches of
        ``patch_px * mpp`` microns), else None.
    module_
        The trained network: ``Sequential(SmallCNN, Linear)``; ``Sequential(BackboneTower, head)`` with a trained
        backbone; the head alone with a frozen one.
    standardizer_
        Per-group standardisation of the features (frozen backbone only).
    history_
        ``"train_loss"`` and ``"val_loss"`` per epoch (mean squared error on standardised targets) and
        ``"val_score"`` (validation Pearson r).
    best_epoch_
        Epoch (from 0) whose weights were kept.

    Examples
    --------
    >>> import numpy as np
    >>> from omx.models import CNNRegressor
    >>> rng = np.random.default_rng(0)
    >>> patches = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    >>> Y = patches.mean(axis=(1, 2)) / 255.0
    >>> model = CNNRegressor(patch_px=32, epochs=2, show_progress_bar=False).fit(patches, Y)
    >>> model.predict(patches).shape
    (64, 3)

    UNI with LoRA adapters, on a GPU (the weights downloaded beforehand):

    >>> from omx.encoders import get_encoder
    >>> uni = get_encoder("uni", weights="weights/MahmoodLab/UNI/pytorch_model.bin")  # doctest: +SKIP
    >>> model = CNNRegressor(backbone=uni, finetune="lora", lora_rank=8, lr=1e-4)  # doctest: +SKIP
    """

    input = "patches"
    target = "log"
    uses = frozenset({"groups"})
    supports_ddp = True

    def __init__(
        self,
        *,
        patch_px: int | None = None,
        width: int = 32,
        backbone: str | Encoder | Any | None = None,
        finetune: Literal["frozen", "last_blocks", "lora"] = "frozen",
        n_blocks: int = 2,
        lora_rank: int = 8,
        gradient_checkpointing: bool = False,
        hidden: int = 256,
        dropout: float = 0.1,
        epochs: int = 40,
        batch_size: int = 64,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        patience: int | None = 8,
        val_fraction: float = 0.1,
        augment: bool = True,
        seed: int = 0,
        device: str = "auto",
        show_progress_bar: bool = True,
    ):
        if patch_px is not None and patch_px < 16:
            raise ValueError(f"patch_px must be at least 16, got {patch_px}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if epochs < 1 or batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2.")
        if hidden < 0 or not 0 <= dropout < 1:
            raise ValueError(f"hidden must be >= 0 and dropout in [0, 1), got {hidden} and {dropout}.")
        check_finetune(finetune, n_blocks, lora_rank, has_backbone=backbone is not None)
        self.backbone = (
            None if backbone is None else resolve_backbone(backbone, finetune, n_blocks=n_blocks, owner="CNNRegressor")
        )
        self.finetune = finetune
        self.n_blocks, self.lora_rank = int(n_blocks), int(lora_rank)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.mpp = None
        if self.backbone is None:
            self.patch_px = 64 if patch_px is None else int(patch_px)
        elif finetune == "frozen":
            self.input, self.uses = "features", frozenset({"groups", "group_stats"})
            self.encoder = self.backbone
            self.patch_px = int(self.backbone.patch_px)
        else:
            self.patch_px, self.mpp = trained_patches(self.backbone, patch_px)
        self.width = int(width)
        self.hidden, self.dropout = int(hidden), float(dropout)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.patience = None if patience is None else int(patience)
        self.val_fraction = float(val_fraction)
        self.augment = bool(augment)
        super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)

    @property
    def _trains_backbone(self) -> bool:
        return self.backbone is not None and self.finetune != "frozen"

    def _build(self, n_targets: int, d_in: int | None = None) -> torch.nn.Module:
        from torch import nn

        if self.backbone is None:
            from omx.encoders._torch import SmallCNN

            backbone = SmallCNN(None, width=self.width)
            return nn.Sequential(backbone, nn.Linear(backbone.dim, n_targets))
        from omx.models._finetune_net import mlp_head

        if self.finetune == "frozen":  # the head alone, on the features the backbone made
            return mlp_head(d_in, n_targets, hidden=self.hidden, dropout=self.dropout)
        tower = backbone_tower(
            self.backbone, self.finetune, n_blocks=self.n_blocks, lora_rank=self.lora_rank,
            gradient_checkpointing=self.gradient_checkpointing,
        )  # fmt: skip
        return nn.Sequential(tower, mlp_head(tower.dim, n_targets, hidden=self.hidden, dropout=self.dropout))

    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        import torch
        from torch.nn import functional as F

        device = self._torch_device()
        seed_everything(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        groups = context.groups
        train_idx, val_idx = self._validation_split(len(X), groups, self.val_fraction, rng)

        if self.input == "features":
            self.standardizer_ = GroupStandardizer().fit(X)
            Xs = torch.from_numpy(self.standardizer_.transform(X, groups).astype(np.float32))
        elif self._trains_backbone:  # the backbone's own normalisation
            self.input_mean_ = np.asarray(self.backbone.mean, dtype=np.float32)
            self.input_std_ = np.asarray(self.backbone.std, dtype=np.float32)
        else:
            self.input_mean_, self.input_std_ = _channel_stats(X, train_idx)
        self.target_mean_ = Y[train_idx].mean(0)
        std = Y[train_idx].std(0)
        self.target_std_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        Yz = torch.from_numpy((Y - self.target_mean_) / self.target_std_).to(device)

        self.module_ = self._build(Y.shape[1], X.shape[1] if self.input == "features" else None).to(device)

        def batch_loss(net: torch.nn.Module, rows: np.ndarray, train: bool) -> torch.Tensor:
            if self.input == "features":
                x = Xs[rows].to(device, non_blocking=True)
            else:
                x = self._patches(X[rows], device, generator=generator if train and self.augment else None)
            return F.mse_loss(net(x).float(), Yz[rows])

        val_groups = groups[val_idx] if groups is not None else np.zeros(len(val_idx))

        def val_score() -> float:
            """Mean per-gene Pearson r on the validation rows, within each validation group.

            Pearson r ignores the offset of a whole held-out section, which the loss does not; it is also the
            score the model is judged by.
            """
            if self.input == "features":
                pred = self._forward(Xs[val_idx].numpy(), device)
            else:
                pred = self._predict(X[val_idx], Context())
            masks = [val_groups == g for g in np.unique(val_groups)]
            scores = np.array([np.nanmean(pearson(Y[val_idx][m], pred[m])) for m in masks])
            return float(np.nanmean(scores)) if np.isfinite(scores).any() else -np.inf

        self._train(
            batch_loss,
            train_idx,
            val_idx,
            val_score=val_score,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            patience=self.patience,
            generator=generator,
            device=device,
        )

    def _patches(
        self, patches: np.ndarray, device: torch.device, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised float patches ``(b, 3, H, H)`` on `device`, augmented when a `generator` is given."""
        from omx.encoders._torch import to_tensor

        x = to_tensor(patches, device)
        if generator is not None:
            x = augment_patches(x, generator)
        mean, std = self._input_norm(device)
        return (x - mean) / std

    def _forward(self, X: np.ndarray, device: torch.device) -> np.ndarray:
        """Predictions on the targets' scale from patches, or from standardised features, in batches."""
        import torch

        module = self.module_.to(device).eval()
        out = []
        with torch.inference_mode(), self._autocast(device):
            for start in range(0, len(X), self.batch_size):
                chunk = X[start : start + self.batch_size]
                if self.input == "features":
                    x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
                else:
                    x = self._patches(chunk, device)
                out.append(module(x).float().cpu().numpy())
        return np.concatenate(out) * self.target_std_ + self.target_mean_

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        if self.input == "features":
            X = self.standardizer_.transform(X, context.groups, context.group_stats)
        return self._forward(X, self._torch_device())

    def _input_norm(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        mean = torch.as_tensor(self.input_mean_, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.input_std_, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return mean, std

    def as_encoder(self, **kwargs: Any) -> TorchEncoder:
        """Return the trained image network without its head as a frozen `~omx.encoders.TorchEncoder`.

        Parameters
        ----------
        **kwargs
            Passed to `TorchEncoder` (e.g. ``batch_size``, ``device``).

        Returns
        -------
        An encoder of the CNN's ``4 * width`` features per patch (or the fine-tuned backbone's embedding), with
        this model's input normalisation (and the backbone's native resolution as its ``mpp``).
        """
        from omx.encoders._torch import TorchEncoder

        self._check_fitted()
        if self.input == "features":
            raise ValueError(
                "This CNNRegressor trains no image network (finetune='frozen'): its features come from "
                "`model.encoder`, the backbone itself."
            )
        params = {"patch_px": self.patch_px, "mean": self.input_mean_.tolist(), "std": self.input_std_.tolist()}
        name = "cnn" if self.backbone is None else f"{self.backbone.name}_{self.finetune}"
        encoder = TorchEncoder(self.module_[0], **{**params, "name": name, "device": self.device, **kwargs})
        encoder.mpp = self.mpp
        return encoder

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"target_mean": self.target_mean_, "target_std": self.target_std_}
        if self.input == "features":
            arrays.update(x_mean=self.standardizer_.mean_, x_scale=self.standardizer_.scale_)
        else:
            arrays.update(input_mean=self.input_mean_, input_std=self.input_std_)
        return {"best_epoch_": int(self.best_epoch_)}, arrays

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.best_epoch_ = state["best_epoch_"]
        self.target_mean_, self.target_std_ = arrays["target_mean"], arrays["target_std"]
        if self.input == "features":
            self.standardizer_ = GroupStandardizer().set_state({"mean": arrays["x_mean"], "scale": arrays["x_scale"]})
        else:
            self.input_mean_, self.input_std_ = arrays["input_mean"], arrays["input_std"]
        self.module_ = self._build(len(self.target_mean_), getattr(self, "n_features_in_", None))


def _channel_stats(X: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 patches ``X[rows]`` scaled to [0, 1], in chunks (no float copy of X)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for start in range(0, len(rows), chunk):
        x = X[rows[start : start + chunk]].reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), np.where(std > 1e-3, std, 1.0).astype(np.float32)


def augment_patches(
    x: torch.Tensor, generator: torch.Generator, *, stain_scale: float = 0.05, stain_shift: float = 0.02
) -> torch.Tensor:
    """Randomly flip, rotate by multiples of 90 degrees and stain-jitter a batch ``(b, 3, H, H)`` in ``[0, 1]``.

    Each patch gets one of the 8 symmetries of the square, and its H, E and DAB concentrations (colour
    deconvolution of the optical density) are scaled by ``1 +- stain_scale`` and shifted by ``+- stain_shift``.
    Random numbers come from the CPU `generator`, so results do not depend on the device.
    """
    import torch

    from omx.encoders._handcrafted import HED_FROM_RGB

    b = x.shape[0]
    dev = x.device
    u = torch.rand(b, 9, generator=generator).to(dev)
    flips = u[:, :3] < 0.5
    with torch.autocast(device_type=dev.type, enabled=False):
        x = x.float()
        x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
        x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
        x = torch.where(flips[:, 2, None, None, None], x.transpose(-1, -2), x)
        hed_from_rgb = torch.as_tensor(HED_FROM_RGB, device=dev)
        rgb_from_hed = torch.linalg.inv(hed_from_rgb)
        od = -torch.log((x * 255.0 + 1.0) / 256.0)
        conc = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
        scale = 1.0 + stain_scale * (2.0 * u[:, 3:6] - 1.0)
        shift = stain_shift * (2.0 * u[:, 6:9] - 1.0)
        conc = conc * scale[:, :, None, None] + shift[:, :, None, None]
        od = torch.einsum("bdhw,dc->bchw", conc, rgb_from_hed)
        x = ((256.0 * torch.exp(-od) - 1.0) / 255.0).clamp_(0.0, 1.0)
    return x
