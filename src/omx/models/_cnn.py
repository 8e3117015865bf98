"""CNN regression from patches to expression (ST-Net-like), trained from scratch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from omx._utils import seed_everything
from omx.metrics import pearson
from omx.models._base import TorchModel
from omx.models._context import Context

if TYPE_CHECKING:
    import torch

    from omx.encoders import TorchEncoder


class CNNRegressor(TorchModel):
    """A small residual CNN with a linear head, trained end to end from patches to standardised targets.

    Targets are standardised per column on the training rows (mean squared error on that scale) and
    predictions come back on the original scale. Inputs are scaled to ``[0, 1]`` and normalised per channel
    with the training patches' statistics. Training uses Adam, augmentation (random flips and 90-degree
    rotations, mild jitter of the H, E and DAB stain concentrations), and early stopping on a validation split
    (whole groups when `groups` holds two or more, else a random `val_fraction` of the rows), restoring the
    weights of the best epoch. On CUDA it runs in mixed precision with pinned host memory; on the CPU two fits
    with the same seed give identical predictions.

    How it compares with the other model families on her2st: see "Model families on her2st" in the guide.

    Parameters
    ----------
    patch_px
        Side in pixels of the patches (fit and predict check it).
    width
        Channels of the first CNN stage (see `~omx.encoders.SmallCNN`).
    epochs
        Maximum number of epochs.
    batch_size
        Patches per step.
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
        Augment training patches.
    seed
        Seed of initialisation, splits, shuffling and augmentation.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
    show_progress_bar
        Show a progress bar over epochs.

    Attributes
    ----------
    module_
        The trained network, ``Sequential(SmallCNN, Linear)``.
    history_
        ``"train_loss"`` and ``"val_loss"`` per epoch (mean squared error on standardised targets).
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
    """

    input = "patches"
    target = "log"
    uses = frozenset({"groups"})
    supports_ddp = True

    def __init__(
        self,
        *,
        patch_px: int = 64,
        width: int = 32,
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
        if patch_px < 16:
            raise ValueError(f"patch_px must be at least 16, got {patch_px}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if epochs < 1 or batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2.")
        self.patch_px = int(patch_px)
        self.width = int(width)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.patience = None if patience is None else int(patience)
        self.val_fraction = float(val_fraction)
        self.augment = bool(augment)
        super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)

    def _build(self, n_targets: int) -> torch.nn.Module:
        from torch import nn

        from omx.encoders._torch import SmallCNN

        backbone = SmallCNN(None, width=self.width)
        return nn.Sequential(backbone, nn.Linear(backbone.dim, n_targets))

    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        import torch
        from torch.nn import functional as F

        from omx.encoders._torch import to_tensor

        device = self._torch_device()
        seed_everything(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        groups = context.groups
        train_idx, val_idx = self._validation_split(len(X), groups, self.val_fraction, rng)

        self.input_mean_, self.input_std_ = _channel_stats(X, train_idx)
        self.target_mean_ = Y[train_idx].mean(0)
        std = Y[train_idx].std(0)
        self.target_std_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        Yz = torch.from_numpy((Y - self.target_mean_) / self.target_std_).to(device)
        mean, std = self._input_norm(device)

        self.module_ = self._build(Y.shape[1]).to(device)

        def batch_loss(net: torch.nn.Module, rows: np.ndarray, train: bool) -> torch.Tensor:
            x = to_tensor(X[rows], device)
            if train and self.augment:
                x = augment_patches(x, generator)
            pred = net((x - mean) / std)
            return F.mse_loss(pred.float(), Yz[rows])

        val_groups = groups[val_idx] if groups is not None else np.zeros(len(val_idx))

        def val_score() -> float:
            """Mean per-gene Pearson r on the validation rows, within each validation group.

            Pearson r ignores the offset of a whole held-out section, which the loss does not; it is also the
            score the model is judged by.
            """
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

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        import torch

        from omx.encoders._torch import to_tensor

        device = self._torch_device()
        module = self.module_.to(device).eval()
        mean, std = self._input_norm(device)
        out = []
        with torch.inference_mode(), self._autocast(device):
            for start in range(0, len(X), self.batch_size):
                x = to_tensor(X[start : start + self.batch_size], device)
                out.append(module((x - mean) / std).float().cpu().numpy())
        return np.concatenate(out) * self.target_std_ + self.target_mean_

    def _input_norm(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        mean = torch.as_tensor(self.input_mean_, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.input_std_, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return mean, std

    def as_encoder(self, **kwargs: Any) -> TorchEncoder:
        """Return the trained CNN without its head as a frozen `~omx.encoders.TorchEncoder`.

        Parameters
        ----------
        **kwargs
            Passed to `TorchEncoder` (e.g. ``batch_size``, ``device``).

        Returns
        -------
        An encoder of ``4 * width`` features per patch, with this model's input normalisation.
        """
        from omx.encoders._torch import TorchEncoder

        self._check_fitted()
        params = {"patch_px": self.patch_px, "mean": self.input_mean_.tolist(), "std": self.input_std_.tolist()}
        return TorchEncoder(self.module_[0], **{**params, "name": "cnn", "device": self.device, **kwargs})

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {
            "input_mean": self.input_mean_,
            "input_std": self.input_std_,
            "target_mean": self.target_mean_,
            "target_std": self.target_std_,
        }
        return {"best_epoch_": int(self.best_epoch_)}, arrays

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.best_epoch_ = state["best_epoch_"]
        self.input_mean_, self.input_std_ = arrays["input_mean"], arrays["input_std"]
        self.target_mean_, self.target_std_ = arrays["target_mean"], arrays["target_std"]
        self.module_ = self._build(len(self.target_mean_))


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
