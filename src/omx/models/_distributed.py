"""Training on several processes with torch DistributedDataParallel, behind one call."""

from __future__ import annotations

import socket
import tempfile

import numpy as np

from omx._utils import logger
from omx.models._base import Model, TorchModel
from omx.models._context import Context


def fit_distributed(
    model: TorchModel,
    X: np.ndarray,
    Y: np.ndarray,
    context: Context | None = None,
    *,
    n_procs: int = 2,
    backend: str = "gloo",
    groups: np.ndarray | None = None,
    coords: np.ndarray | None = None,
) -> Model:
    """Fit a copy of ``model`` on ``n_procs`` local processes with torch DistributedDataParallel.

    Every process trains on its share of each batch (the global batch stays ``model.batch_size``) and the
    gradients are averaged across processes, so the model sees the same data per epoch as in one process.
    Validation, early stopping and checkpoints (``model.checkpoint_dir``) work as in :meth:`Model.fit`; rank 0
    writes the checkpoints. On several machines, launch the script with ``torchrun`` and call
    ``torch.distributed.init_process_group`` yourself: ``model.fit`` then trains under DDP on its own.

    Parameters
    ----------
    model
        An unfitted torch model that supports DDP (`CNNRegressor`).
    X, Y, context, groups, coords
        As for :meth:`Model.fit`; each process receives a copy.
    n_procs
        Number of processes (on GPUs with ``backend="nccl"``: one per GPU, ``cuda:0`` ... ``cuda:{n_procs-1}``).
    backend
        ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).

    Returns
    -------
    The fitted model (the weights are the same in every process; a check raises if they are not).
    """
    import torch.multiprocessing as mp

    if not isinstance(model, TorchModel) or not model.supports_ddp:
        raise NotImplementedError(f"{type(model).__name__} does not train under DistributedDataParallel yet.")
    if n_procs < 1:
        raise ValueError(f"n_procs must be at least 1, got {n_procs}.")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}.")
    with tempfile.TemporaryDirectory(prefix="omx_ddp_") as tmp:
        copy = model.clone()
        copy.checkpoint_dir = model.checkpoint_dir
        args = (n_procs, backend, _free_port(), copy, X, Y, context, groups, coords, tmp)
        mp.spawn(_worker, args=args, nprocs=n_procs, join=True)
        from omx.models import load

        fitted = load(f"{tmp}/model", show_progress_bar=model.show_progress_bar, device=model.device)
    logger.info("Fitted %s on %d processes (%s).", type(model).__name__, n_procs, backend)
    return fitted


def _worker(rank, world, backend, port, model, X, Y, context, groups, coords, out) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            model.to(f"cuda:{rank}")
        else:
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        model.fit(X, Y, context, groups=groups, coords=coords)
        checksum = torch.tensor(
            [float(p.detach().double().sum()) for p in model.module_.parameters()], dtype=torch.float64
        ).to(torch.device("cuda", rank) if backend == "nccl" else "cpu")
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError("The processes ended with different weights; distributed training went wrong.")
        if rank == 0:
            model.save(f"{out}/model")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
