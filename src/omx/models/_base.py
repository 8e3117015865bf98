"""The base every omx model shares: input checks, fit / predict, validation splits, save / load, torch training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from omx._utils import get_device, logger, progress
from omx.encoders._base import check_patches

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

PARAMS_FILE = "params.json"


class Model:
    """Base class of the omx models: arrays in, arrays out.

    Subclasses set `input` (``"features"`` or ``"patches"``), call ``super().__init__`` with their constructor
    arguments (recorded in `init_params_`) and implement ``_fit``, ``_predict``, ``_get_state`` and
    ``_set_state``. Everything else (checks, errors, save / load, validation splits) lives here.

    Parameters
    ----------
    seed
        Random seed for initialisation, shuffling, splits and augmentation.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``; torch models only.
    show_progress_bar
        Show a progress bar over long loops (epochs, folds).
    **model_params
        The subclass's own constructor arguments (JSON-able), stored in `init_params_`.

    Attributes
    ----------
    init_params_
        Constructor arguments, as written to ``params.json`` and used by :meth:`load`.
    history_
        Per-epoch losses (torch models) or cross-validation scores (ridge).
    n_targets_
        Number of target columns seen in :meth:`fit`.
    meta_
        Optional JSON-able dict a caller attaches after fitting (`omx.tl` keeps gene names and target scaling
        there); saved and loaded with the model. Absent (None) until set.
    """

    #: What :meth:`fit` and :meth:`predict` take: feature vectors ``(n, d)`` or uint8 patches ``(n, H, W, 3)``.
    input: ClassVar[Literal["features", "patches"]] = "features"
    #: Spatial models also take the spot centres (``coords``) in `fit` and `predict`.
    spatial: ClassVar[bool] = False
    #: Side in pixels of the patches a patch model takes.
    patch_px: int
    _registry: ClassVar[dict[str, type[Model]]] = {}
    _weights_file: ClassVar[str] = "weights.npz"

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        Model._registry[cls.__name__] = cls

    def __init__(self, *, seed: int = 0, device: str = "auto", show_progress_bar: bool = True, **model_params: Any):
        self.seed = int(seed)
        self.device = str(device)
        self.show_progress_bar = bool(show_progress_bar)
        self.init_params_: dict[str, Any] = {
            **model_params,
            "seed": self.seed,
            "device": self.device,
            "show_progress_bar": self.show_progress_bar,
        }
        self.history_: dict[str, list[float]] = {}
        self.meta_: dict[str, Any] | None = None
        self.is_fitted_ = False

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.init_params_.items())
        return f"{type(self).__name__}({params})"

    def clone(self, **overrides: Any) -> Model:
        """Return a new, unfitted model with the same constructor arguments (and the same encoder object).

        Parameters
        ----------
        **overrides
            Constructor arguments to change, e.g. ``seed=1``.

        Returns
        -------
        The unfitted copy.
        """
        return type(self)(**{**self.init_params_, **self._live_params(), **overrides})

    def _live_params(self) -> dict[str, Any]:
        """Constructor arguments that `init_params_` holds only as a description (e.g. a torch encoder)."""
        return {}

    # ------------------------------------------------------------------ fit / predict
    def fit(
        self, X: np.ndarray, Y: np.ndarray, *, groups: np.ndarray | None = None, coords: np.ndarray | None = None
    ) -> Model:
        """Fit the model.

        Parameters
        ----------
        X
            Features ``(n, d)`` (feature models) or uint8 RGB patches ``(n, patch_px, patch_px, 3)`` (patch models).
        Y
            Targets ``(n, g)``, already normalised (e.g. log1p of normalised counts); no NaN.
        groups
            Label of each row (e.g. the section). Validation splits hold out whole groups when there are two or
            more, and feature models standardise each group on its own.
        coords
            Spot centres ``(n, 2)`` in microns, for spatial models (``spatial = True``), which need them to know
            each spot's neighbours (within its group); other models ignore them.

        Returns
        -------
        The fitted model.
        """
        X = self._check_X(X, fitting=True)
        Y = self._check_Y(Y, len(X))
        groups = self._check_groups(groups, len(X))
        if len(X) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 rows to fit, got {len(X)}.")
        self.history_ = {}
        self.n_targets_ = Y.shape[1]
        self._fit_data = (X, Y)  # what a checkpoint of this fit must match (see TorchModel.checkpoint_dir)
        self._n_train_calls = 0
        try:
            self._fit(X, Y, groups, *self._spatial_args(coords, len(X)))
        finally:
            del self._fit_data
        self.is_fitted_ = True
        return self

    def predict(
        self,
        X: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        group_stats: dict[str, tuple[np.ndarray, np.ndarray, int]] | None = None,
    ) -> np.ndarray:
        """Predict targets.

        Parameters
        ----------
        X
            Features or patches, as in :meth:`fit`.
        groups
            Label of each row (e.g. the section); feature models standardise each group with its own statistics.
        coords
            Spot centres ``(n, 2)`` in microns, for spatial models; as in :meth:`fit`.
        group_stats
            Feature statistics of whole groups, ``{group: (X_g.mean(0), X_g.std(0), len(X_g))}``, for predicting a
            group a chunk of rows at a time: models that standardise features per group use them instead of the
            statistics of the rows given, so that chunks give the same predictions as the whole group.

        Returns
        -------
        Predictions, ``float32`` of shape ``(n, g)`` on the scale of the targets given to :meth:`fit`.
        """
        self._check_fitted()
        X = self._check_X(X)
        groups = self._check_groups(groups, len(X))
        if len(X) == 0:
            return np.zeros((0, self.n_targets_), dtype=np.float32)
        self._group_stats = group_stats  # read by the per-group standardisation of feature models
        try:
            return np.asarray(self._predict(X, groups, *self._spatial_args(coords, len(X))), dtype=np.float32)
        finally:
            self._group_stats = None

    def _fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None) -> None:
        raise NotImplementedError

    def _predict(self, X: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _spatial_args(self, coords: np.ndarray | None, n: int) -> tuple:
        """``(coords,)`` for spatial models (checked), ``()`` for the others."""
        if not self.spatial:
            return ()
        if coords is None:
            raise ValueError(f"{type(self).__name__} is a spatial model: pass `coords=` (spot centres in microns).")
        coords = np.asarray(coords, dtype=np.float64)
        if coords.shape != (n, 2) or not np.isfinite(coords).all():
            raise ValueError(f"`coords` must be finite spot centres of shape ({n}, 2), got shape {coords.shape}.")
        return (coords,)

    # ------------------------------------------------------------------ checks
    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise ValueError(
                f"This {type(self).__name__} is not fitted yet. Call `fit(X, Y)` first, or load a fitted model "
                "with `omx.models.load(path)`."
            )

    def _check_X(self, X: np.ndarray, *, fitting: bool = False) -> np.ndarray:
        name = type(self).__name__
        if self.input == "patches":
            return check_patches(X, patch_px=self.patch_px, owner=name)
        X = np.asarray(X)
        if X.ndim != 2:
            hint = ""
            if X.ndim == 4:
                hint = " They look like image patches: encode them first (`model.encoder.transform(patches)`)."
            raise ValueError(f"{name} takes features of shape (n, d), got shape {X.shape}.{hint}")
        if not np.issubdtype(X.dtype, np.number):
            raise ValueError(f"{name} takes numeric features, got dtype {X.dtype}.")
        X = X.astype(np.float64, copy=False)
        if not np.all(np.isfinite(X)):
            raise ValueError(
                f"The features hold {int(np.sum(~np.isfinite(X)))} NaN or infinite values; fill or drop those rows."
            )
        if not fitting and X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"{name} was fitted on {self.n_features_in_} features, got {X.shape[1]}. Use the same encoder as "
                "in `fit`."
            )
        if fitting:
            self.n_features_in_ = X.shape[1]
        return X

    def _check_Y(self, Y: np.ndarray, n: int) -> np.ndarray:
        Y = np.asarray(Y)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2:
            raise ValueError(f"The targets Y must have shape (n, g), got {Y.shape}.")
        if Y.shape[0] != n:
            raise ValueError(
                f"X has {n} rows but Y has {Y.shape[0]}; they must be aligned (one target row per spot / patch)."
            )
        if not np.issubdtype(Y.dtype, np.number):
            raise ValueError(f"The targets Y must be numeric, got dtype {Y.dtype}.")
        Y = Y.astype(np.float32, copy=False)
        if not np.all(np.isfinite(Y)):
            raise ValueError(
                f"The targets Y hold {int(np.sum(~np.isfinite(Y)))} NaN or infinite values; drop those rows or "
                "fill them before fitting."
            )
        return Y

    @staticmethod
    def _check_groups(groups: np.ndarray | None, n: int) -> np.ndarray | None:
        if groups is None:
            return None
        groups = np.asarray(groups)
        if groups.ndim != 1 or len(groups) != n:
            raise ValueError(f"`groups` must hold one label per row ({n}), got shape {groups.shape}.")
        if groups.dtype == object:
            groups = groups.astype(str)
        return groups

    # ------------------------------------------------------------------ splits
    def _validation_split(
        self, n: int, groups: np.ndarray | None, fraction: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (train, validation) row indices: whole groups when there are >= 2, else a random fraction."""
        idx = np.arange(n)
        if fraction <= 0:
            return idx, idx[:0]
        if groups is not None and len(np.unique(groups)) >= 2:
            labels, counts = np.unique(groups, return_counts=True)
            order = rng.permutation(len(labels))
            chosen, total = [], 0
            for i in order[:-1]:  # keep at least one group for training
                chosen.append(labels[i])
                total += counts[i]
                if total >= fraction * n:
                    break
            val = np.isin(groups, chosen)
            logger.info("Validation on held-out group(s) %s (%d of %d rows).", [str(c) for c in chosen], total, n)
            return idx[~val], idx[val]
        n_val = min(n - 1, max(1, round(fraction * n)))
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    # ------------------------------------------------------------------ save / load
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return the fitted state: JSON-able values, and arrays."""
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the fitted model to the directory `path`: ``params.json`` and the weights.

        Parameters
        ----------
        path
            Directory to create.
        overwrite
            Replace the files of a model already saved there.
        """
        self._check_fitted()
        path = Path(path)
        if (path / PARAMS_FILE).exists() and not overwrite:
            raise FileExistsError(f"A model is already saved in {path}; pass `overwrite=True` to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        state, arrays = self._get_state()
        from omx import __version__

        meta = {
            "class": type(self).__name__,
            "omx_version": __version__,
            "init_params": self.init_params_,
            "state": {**state, "n_targets": self.n_targets_, "n_features_in": getattr(self, "n_features_in_", None)},
            "history": self.history_,
            "meta": getattr(self, "meta_", None),
            "weights": self._weights_file,
        }
        text = json.dumps(meta, indent=2)  # before writing anything, so an un-serialisable value leaves no debris
        self._save_arrays(path / self._weights_file, arrays)
        (path / PARAMS_FILE).write_text(text)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> Model:
        """Rebuild a model saved with :meth:`save`, whatever its class.

        Parameters
        ----------
        path
            Directory written by :meth:`save`.
        **overrides
            Constructor arguments to replace, e.g. ``device="cpu"`` or ``encoder=TorchEncoder(module)`` (a torch
            encoder cannot be rebuilt from its parameters).

        Returns
        -------
        The fitted model.
        """
        path = Path(path)
        if not (path / PARAMS_FILE).exists():
            raise FileNotFoundError(f"No {PARAMS_FILE} in {path}; pass a directory written by `model.save(path)`.")
        meta = json.loads((path / PARAMS_FILE).read_text())
        klass = Model._registry.get(meta["class"])
        if klass is None:
            raise ValueError(f"{path} holds a {meta['class']!r}, which this version of omx does not know.")
        if not issubclass(klass, cls):
            raise TypeError(f"{path} holds a {klass.__name__}, not a {cls.__name__}; use `omx.models.load(path)`.")
        model = klass(**{**meta["init_params"], **overrides})
        state = dict(meta["state"])
        model.n_targets_ = state.pop("n_targets")
        n_features_in = state.pop("n_features_in")
        if n_features_in is not None:
            model.n_features_in_ = n_features_in
        model._set_state(state, model._load_arrays(path / meta["weights"]))
        model.history_ = {k: list(v) for k, v in meta["history"].items()}
        model.meta_ = meta.get("meta")
        model.is_fitted_ = True
        return model

    def _save_arrays(self, file: Path, arrays: dict[str, np.ndarray]) -> None:
        np.savez(file, **arrays)

    def _load_arrays(self, file: Path) -> dict[str, np.ndarray]:
        with np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def _distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in an initialised torch.distributed group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TorchModel(Model):
    """Base of the torch models: device choice, mixed precision on CUDA, the training loop with early stopping.

    Subclasses build their network in ``_fit`` (as `module_`) and call :meth:`_train`; ``_get_state`` returns
    their extra arrays (the module's weights are saved here), and ``_set_module_state`` rebuilds `module_` from
    the saved state before its weights are loaded.
    """

    _weights_file = "weights.pt"
    module_: torch.nn.Module
    #: Directory where training writes a checkpoint after every epoch, and from which :meth:`fit` resumes when
    #: it finds one of the same model and data (else it refuses to start); None writes none. Resuming gives the
    #: same result as an uninterrupted fit. Set it on the model: ``model.checkpoint_dir = "ckpt"``.
    checkpoint_dir: str | Path | None = None
    #: Whether training runs under torch DistributedDataParallel when a process group is initialised.
    supports_ddp: ClassVar[bool] = False

    def _torch_device(self) -> torch.device:
        return get_device(self.device)

    @staticmethod
    def _autocast(device: torch.device):
        """Mixed precision on CUDA (bfloat16, else float16); a no-op context on the CPU."""
        import torch

        enabled = device.type == "cuda"
        dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)

    def _train(
        self,
        batch_loss: Callable[[np.ndarray, bool], torch.Tensor],
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
    ) -> None:
        """Train `module_` with Adam; early-stop on the validation rows and restore the best weights.

        ``batch_loss(rows, train)`` returns the mean loss of the rows (indices into the training arrays). Fills
        ``history_["train_loss"]`` and ``history_["val_loss"]`` (NaN without validation rows) per epoch. With
        ``val_score`` (higher is better, computed in eval mode), early stopping follows it instead of the
        validation loss, and ``history_["val_score"]`` records it.
        """
        import torch

        module = self.module_
        opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
        autocast = self._autocast(device)
        scaler = torch.amp.GradScaler(
            device.type, enabled=device.type == "cuda" and autocast.fast_dtype == torch.float16
        )
        history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
        state = {"epoch": -1, "best": math.inf, "best_state": None, "bad": 0, "best_epoch": epochs - 1, "done": False}
        ckpt = self._checkpoint_file(train_idx, val_idx)
        if ckpt is not None and ckpt.exists():
            state = self._resume(ckpt, opt, scaler, generator, history)
        self.history_ = history
        rank, world = _distributed_rank()
        net = self._parallel(module, device) if world > 1 else module
        n_train = len(train_idx)
        bar = progress(
            range(state["epoch"] + 1, epochs),
            show=self.show_progress_bar and rank == 0,
            desc=f"{type(self).__name__}",
            unit="epoch",
        )
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
            self.module_ = net
            try:
                for start in range(0, len(order), step):
                    rows = order[start : start + step]
                    if len(rows) < 2 and len(order) >= 2:  # batch norm needs two samples; the row returns next epoch
                        continue
                    with autocast:
                        loss = batch_loss(rows, True)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    total += loss.detach().float() * len(rows)
            finally:
                self.module_ = module
            if world > 1:
                torch.distributed.all_reduce(total)
            history["train_loss"].append(float(total) / max(1, len(order) * world))
            val_loss = self._evaluate(batch_loss, val_idx, batch_size=batch_size, device=device)
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
                    state["best_state"] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
                else:
                    state["bad"] += 1
                    if patience and state["bad"] >= patience:
                        logger.info("Early stopping after epoch %d; best epoch %d.", epoch + 1, state["best_epoch"] + 1)
                        state["done"] = True
            if ckpt is not None and rank == 0:
                self._save_checkpoint(ckpt, state, opt, scaler, generator, history)
        self.best_epoch_ = state["best_epoch"]
        if state["best_state"] is not None:
            module.load_state_dict(state["best_state"])
        module.eval()

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_file(self, train_idx: np.ndarray, val_idx: np.ndarray) -> Path | None:
        """Path of the checkpoint of this training run (one per `_train` call of a fit); sets its fingerprint."""
        self._n_train_calls = getattr(self, "_n_train_calls", 0) + 1
        if self.checkpoint_dir is None:
            return None
        import zlib

        X, Y = getattr(self, "_fit_data", (np.zeros(0), np.zeros(0)))
        crc = 0
        for a in (np.ascontiguousarray(Y), np.ascontiguousarray(train_idx), np.ascontiguousarray(val_idx)):
            crc = zlib.crc32(memoryview(a).cast("B"), crc)
        for start in range(0, len(X), 4096):  # in slices: X may be a large array of patches
            crc = zlib.crc32(memoryview(np.ascontiguousarray(X[start : start + 4096])).cast("B"), crc)
        params = {k: v for k, v in self.init_params_.items() if k not in ("device", "show_progress_bar")}
        self._fingerprint = json.dumps(
            {"class": type(self).__name__, "params": params, "shapes": [X.shape, Y.shape], "crc": crc}, default=str
        )
        path = Path(self.checkpoint_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path / f"checkpoint_{self._n_train_calls}.pt"

    def _save_checkpoint(self, file: Path, state: dict, opt, scaler, generator, history: dict) -> None:
        import torch

        payload = {
            "fingerprint": self._fingerprint,
            "state": state,
            "module": self.module_.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
        }
        tmp = file.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(file)  # atomic: an interrupted write never leaves a half checkpoint

    def _resume(self, file: Path, opt, scaler, generator, history: dict) -> dict:
        import torch

        payload = torch.load(file, map_location="cpu", weights_only=False)
        if payload["fingerprint"] != self._fingerprint:
            raise ValueError(
                f"The checkpoint {file} comes from another model or other data than this fit. Use another "
                "`checkpoint_dir`, or delete it to start afresh."
            )
        self.module_.load_state_dict(payload["module"])
        opt.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        generator.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        history.update(payload["history"])
        logger.info("Resuming from %s after epoch %d.", file, payload["state"]["epoch"] + 1)
        return payload["state"]

    # ------------------------------------------------------------------ distributed training
    def _parallel(self, module, device):
        """`module` wrapped in DistributedDataParallel, for models whose training calls it as a whole."""
        from torch.nn.parallel import DistributedDataParallel

        if not self.supports_ddp:
            raise NotImplementedError(
                f"{type(self).__name__} does not train under torch.distributed yet (its training calls parts of "
                "its network); fit it in one process, or use CNNRegressor."
            )
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def _evaluate(
        self, batch_loss: Callable[[np.ndarray, bool], torch.Tensor], rows: np.ndarray, *, batch_size: int, device
    ) -> float:
        """Mean loss over `rows` in eval mode (NaN when there are none)."""
        import torch

        if len(rows) == 0:
            return float("nan")
        self.module_.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad(), self._autocast(device):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                total += batch_loss(chunk, False).float() * len(chunk)
        return float(total) / len(rows)

    def _save_arrays(self, file: Path, arrays: dict[str, np.ndarray]) -> None:
        import torch

        torch.save(
            {
                "module": self.module_.state_dict(),
                "arrays": {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()},
            },
            file,
        )

    def _load_arrays(self, file: Path) -> dict[str, Any]:
        import torch

        data = torch.load(file, map_location="cpu", weights_only=True)
        return {**{k: v.numpy() for k, v in data["arrays"].items()}, "__module__": data["module"]}

    def _set_state(self, state: dict[str, Any], arrays: dict[str, Any]) -> None:
        arrays = dict(arrays)
        weights = arrays.pop("__module__")
        self._set_module_state(state, arrays)
        self.module_.load_state_dict(weights)
        self.module_.eval()

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Rebuild `module_` (weights not loaded yet) and the other fitted attributes from a saved state."""
        raise NotImplementedError
