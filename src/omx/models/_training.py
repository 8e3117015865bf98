"""The one training loop of the torch models: Adam, early stopping, checkpoints to resume from, and DDP."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from omx._utils import logger, progress

if TYPE_CHECKING:
    import torch

#: ``batch_loss(net, rows, train)``: the mean loss of ``rows`` (indices into the training arrays) computed with
#: ``net`` (the module, or its DistributedDataParallel wrapper while training under torch.distributed), in training
#: mode when ``train``.
BatchLoss = Callable[[Any, np.ndarray, bool], "torch.Tensor"]


@dataclass
class TrainResult:
    """What a training run leaves besides the module's weights (the best epoch's, restored)."""

    #: ``"train_loss"`` and ``"val_loss"`` per epoch (NaN without validation rows); ``"val_score"`` with a score.
    history: dict[str, list[float]] = field(default_factory=dict)
    #: Epoch (from 0) whose weights were kept.
    best_epoch: int = 0


def autocast(device: torch.device):
    """Mixed precision on CUDA (bfloat16, else float16); a no-op context on the CPU."""
    import torch

    enabled = device.type == "cuda"
    dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in an initialised torch.distributed group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    module: torch.nn.Module,
    batch_loss: BatchLoss,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int | None,
    generator: torch.Generator,
    device: torch.device,
    val_score: Callable[[], float] | None = None,
    checkpoint: Checkpoint | None = None,
    ddp: bool = False,
    name: str = "model",
    show_progress_bar: bool = True,
) -> TrainResult:
    """Train `module` with Adam; early-stop on the validation rows and restore the best weights.

    Each epoch shuffles the training rows with `generator` and steps over batches of `batch_size` (a last batch
    of one row is left for the next epoch: batch norm needs two). With ``val_score`` (higher is better, computed
    in eval mode) early stopping follows it instead of the validation loss. Under an initialised torch.distributed
    process group, every rank takes its share of the same global batches through DistributedDataParallel
    (``ddp=True`` only: a network trained through its parts cannot be wrapped). With a `checkpoint`, the state
    after every epoch is written there and a run finding one resumes from it, giving the same result as an
    uninterrupted run. Only parameters that require a gradient are optimised; the frozen weights of a fine-tuned
    backbone (see `omx.models._finetune_net`) are left out of the best epoch's copy and of the checkpoints.

    Parameters
    ----------
    module
        The network; its parameters are optimised in place and left at the best epoch's, in eval mode.
    batch_loss
        ``batch_loss(net, rows, train)``, see `BatchLoss`.
    train_idx, val_idx
        Rows to train on and to validate on (none: no early stopping).
    epochs, batch_size, lr, weight_decay, patience
        Most epochs, rows per step, Adam's learning rate and weight decay, and epochs without improvement before
        stopping (0 or None: never).
    generator
        CPU generator of the shuffles (and of whatever else `batch_loss` draws from it).
    device
        Where `module` is.
    val_score
        Validation score to early-stop on, recorded as ``history["val_score"]``.
    checkpoint
        Where to write and resume from, or None.
    ddp
        Whether the model supports DistributedDataParallel.
    name
        The model's name, for the progress bar and errors.
    show_progress_bar
        Show a progress bar over epochs (on rank 0).

    Returns
    -------
    The per-epoch history and the best epoch.
    """
    import torch

    from omx.models._finetune_net import load_trained_state, trained_state_dict

    trainable = [p for p in module.parameters() if p.requires_grad]  # a frozen backbone is left out
    opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    cast = autocast(device)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cast.fast_dtype == torch.float16)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    state = {"epoch": -1, "best": math.inf, "best_state": None, "bad": 0, "best_epoch": epochs - 1, "done": False}
    if checkpoint is not None and checkpoint.file.exists():
        state = checkpoint.resume(module, opt, scaler, generator, history)
    rank, world = distributed_rank()
    net = parallel(module, device, ddp=ddp, name=name) if world > 1 else module
    n_train = len(train_idx)
    bar = progress(range(state["epoch"] + 1, epochs), show=show_progress_bar and rank == 0, desc=name, unit="epoch")
    for epoch in bar:
        if state["done"]:
            break
        module.train()
        order = train_idx[torch.randperm(n_train, generator=generator).numpy()]
        step = batch_size
        if world > 1:  # every rank the same number of steps, each its share of the same global batches
            order, step = order[: n_train - n_train % world], -(-batch_size // world)
            order = order.reshape(-1, world)[:, rank]
        total = torch.zeros((), device=device)
        for start in range(0, len(order), step):
            rows = order[start : start + step]
            if len(rows) < 2 and len(order) >= 2:  # batch norm needs two samples; the row returns next epoch
                continue
            with cast:
                loss = batch_loss(net, rows, True)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach().float() * len(rows)
        if world > 1:
            torch.distributed.all_reduce(total)
        history["train_loss"].append(float(total) / max(1, len(order) * world))
        val_loss = evaluate(module, batch_loss, val_idx, batch_size=batch_size, device=device)
        history["val_loss"].append(val_loss)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(train=f"{history['train_loss'][-1]:.4f}", val=f"{val_loss:.4f}")
        state["epoch"] = epoch
        if len(val_idx):
            criterion = val_loss
            if val_score is not None:
                history.setdefault("val_score", []).append(val_score())
                criterion = -history["val_score"][-1]
            if criterion < state["best"]:
                state.update(best=criterion, bad=0, best_epoch=epoch)
                best = trained_state_dict(module)
                state["best_state"] = {k: v.detach().to("cpu", copy=True) for k, v in best.items()}
            else:
                state["bad"] += 1
                if patience and state["bad"] >= patience:
                    logger.info("Early stopping after epoch %d; best epoch %d.", epoch + 1, state["best_epoch"] + 1)
                    state["done"] = True
        if checkpoint is not None and rank == 0:
            checkpoint.save(state, module, opt, scaler, generator, history)
    if state["best_state"] is not None:
        load_trained_state(module, state["best_state"])
    module.eval()
    return TrainResult(history=history, best_epoch=state["best_epoch"])


def evaluate(
    module: torch.nn.Module, batch_loss: BatchLoss, rows: np.ndarray, *, batch_size: int, device: torch.device
) -> float:
    """Mean loss over `rows` in eval mode, without gradients (NaN when there are none)."""
    import torch

    if len(rows) == 0:
        return float("nan")
    module.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad(), autocast(device):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            total += batch_loss(module, chunk, False).float() * len(chunk)
    return float(total) / len(rows)


def parallel(module: torch.nn.Module, device: torch.device, *, ddp: bool, name: str = "model"):
    """`module` wrapped in DistributedDataParallel, for models whose training calls it as a whole (``ddp``)."""
    from torch.nn.parallel import DistributedDataParallel

    if not ddp:
        raise NotImplementedError(
            f"{name} does not train under torch.distributed yet (its training calls parts of its network); fit it "
            "in one process, or use CNNRegressor."
        )
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class Checkpoints:
    """The checkpoints of one fit, in one directory: one file per training run of the fit (``checkpoint_<i>.pt``).

    Each is fingerprinted by the model's class and parameters and by the data and rows of its run, so a fit
    resumes only from its own checkpoints and refuses another's.

    Parameters
    ----------
    directory
        Where to write (created when needed).
    name
        The model's class name.
    params
        Its constructor parameters (those that change the result).
    X, Y
        The data of the fit.
    """

    def __init__(self, directory: str | Path, *, name: str, params: dict[str, Any], X: np.ndarray, Y: np.ndarray):
        self.directory = Path(directory)
        self.name, self.params, self.X, self.Y = name, params, X, Y
        self.n_runs = 0

    def next_run(self, train_idx: np.ndarray, val_idx: np.ndarray) -> Checkpoint:
        """The checkpoint of the fit's next training run, on these rows."""
        self.n_runs += 1
        X, Y = self.X, self.Y
        crc = 0
        for a in (np.ascontiguousarray(Y), np.ascontiguousarray(train_idx), np.ascontiguousarray(val_idx)):
            crc = zlib.crc32(memoryview(a).cast("B"), crc)
        for start in range(0, len(X), 4096):  # in slices: X may be a large array of patches
            crc = zlib.crc32(memoryview(np.ascontiguousarray(X[start : start + 4096])).cast("B"), crc)
        fingerprint = json.dumps(
            {"class": self.name, "params": self.params, "shapes": [X.shape, Y.shape], "crc": crc}, default=str
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        return Checkpoint(self.directory / f"checkpoint_{self.n_runs}.pt", fingerprint)


@dataclass
class Checkpoint:
    """The file of one training run and the fingerprint of its model and data."""

    file: Path
    fingerprint: str

    def save(self, state: dict, module, opt, scaler, generator, history: dict) -> None:
        """Write everything the run needs to go on after this epoch (atomically: never half a checkpoint)."""
        import torch

        from omx.models._finetune_net import trained_state_dict

        payload = {
            "fingerprint": self.fingerprint,
            "state": state,
            "module": trained_state_dict(module),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
        }
        tmp = self.file.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.file)

    def resume(self, module, opt, scaler, generator, history: dict) -> dict:
        """Restore the run from the file (weights, optimiser, random states, history); return its loop state."""
        import torch

        payload = torch.load(self.file, map_location="cpu", weights_only=True)
        if payload["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"The checkpoint {self.file} comes from another model or other data than this fit. Use another "
                "`checkpoint_dir`, or delete it to start afresh."
            )
        from omx.models._finetune_net import load_trained_state

        load_trained_state(module, payload["module"])
        opt.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        generator.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        history.update(payload["history"])
        logger.info("Resuming from %s after epoch %d.", self.file, payload["state"]["epoch"] + 1)
        return payload["state"]
