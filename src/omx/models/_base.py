"""The base every omx model shares: input checks, fit / predict, validation splits, save / load, torch training."""

from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from omx._utils import check_counts, get_device, logger, progress
from omx.encoders._base import check_patches
from omx.models._context import Context

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

PARAMS_FILE = "params.json"
#: What each `Context` field is, and how to pass it, for the error of a missing required field.
_FIELD_HELP = {
    "groups": "the section of each row",
    "patients": "the patient of each row",
    "coords": "spot centres in microns",
    "library_size": "each spot's total count",
    "group_stats": "feature statistics of whole groups",
}
_FIELD_HOW = {
    "groups": "`groups=` or `Context(groups=...)`",
    "coords": "`coords=` (shape (n, 2)) or `Context(coords=...)`",
}


class Model:
    """Base class of the omx models: arrays in, arrays out, and a declared contract with their callers.

    A model declares at class level (or as a property where it depends on constructor arguments) what it takes
    and gives: `input`, `target`, `uses`, `requires` and `provides_variance`. Callers (`omx.tl`, a user) hand it
    the inputs ``X``, the targets ``Y`` and one `~omx.models.Context` with everything else it may need about the
    rows; nothing else is ever set on a model from outside.

    Subclasses implement ``_fit(X, Y, context)``, ``_predict(X, context)`` (and ``_predict_var`` when they provide
    a variance), ``_get_state`` and ``_set_state``. Everything else (checks, errors, the context, devices, save /
    load, validation splits) lives here. A subclass's constructor stores its arguments (``self.alpha = alpha``) and
    calls ``super().__init__(seed=seed, device=device, show_progress_bar=show_progress_bar)``; the arguments it was
    called with (defaults included) are recorded once, from its signature, in `init_params_`.

    Parameters
    ----------
    seed
        Random seed for initialisation, shuffling, splits and augmentation.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``; torch models only (see :meth:`to`).
    show_progress_bar
        Show a progress bar over long loops (epochs, folds).

    Attributes
    ----------
    init_params_
        Constructor arguments, recorded from the call of the model's own constructor (defaults included), as
        written to ``params.json`` and used by :meth:`load`; live objects (an encoder) are held by their JSON-able
        description (see ``_describe_param``), while :meth:`clone` passes the objects themselves.
    history_
        Per-epoch losses (torch models) or cross-validation scores (ridge).
    n_targets_
        Number of target columns seen in :meth:`fit`.
    meta_
        The JSON-able description of the data given to :meth:`fit` as ``Context(meta=...)`` (`omx.tl` keeps gene
        names and target scaling there); saved and loaded with the model. None when none was given.
    """

    #: What :meth:`fit` and :meth:`predict` take: feature vectors ``(n, d)`` made by `encoder` (``"features"``) or
    #: uint8 RGB patches ``(n, patch_px, patch_px, 3)`` (``"patches"``).
    input: ClassVar[Literal["features", "patches"]] = "features"
    #: What :meth:`fit` is trained on: log-normalised expression, standardised per section by `omx.tl` (``"log"``),
    #: or the raw counts of the genes (``"counts"``; `omx.tl` then also gives ``Context.library_size``).
    #: Predictions are on the log-normalised scale either way.
    target: ClassVar[Literal["log", "counts"]] = "log"
    #: The `Context` fields the model reads; the others are dropped before it sees the context.
    uses: ClassVar[frozenset[str]] = frozenset()
    #: The `Context` fields without which the model cannot run (:meth:`fit` and :meth:`predict` raise).
    requires: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``predict(..., return_var=True)`` also returns a predictive variance.
    provides_variance: ClassVar[bool] = False
    #: Side in pixels of the patches a patch model takes.
    patch_px: int
    _registry: ClassVar[dict[str, type[Model]]] = {}
    _weights_file: ClassVar[str] = "weights.npz"

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        Model._registry[cls.__name__] = cls
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init_params(cls.__init__)

    def __init__(self, *, seed: int = 0, device: str = "auto", show_progress_bar: bool = True):
        self.seed = int(seed)
        self.device = str(device)
        self.show_progress_bar = bool(show_progress_bar)
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
        return type(self)(**{**self._init_args, **overrides})

    def _describe_param(self, name: str, value: Any) -> Any:
        """The JSON-able description of the constructor argument `name` kept in `init_params_`.

        Numbers, strings, None, and lists, tuples and dicts of them are kept (tuples and arrays as lists); a live
        object whose model attribute of the same name has ``get_params`` (an encoder given as an object or a torch
        module) is described by those parameters. Subclasses override it for other live objects.
        """
        if isinstance(value, np.generic | np.ndarray):
            return value.tolist()
        if value is None or isinstance(value, str | bool | int | float):
            return value
        if isinstance(value, list | tuple):
            return [self._describe_param(name, v) for v in value]
        if isinstance(value, dict):
            return {str(k): self._describe_param(name, v) for k, v in value.items()}
        live = getattr(self, name, value)
        if hasattr(live, "get_params"):
            return live.get_params()
        return value

    def to(self, device: str) -> Model:
        """Run later fits and predictions on `device`.

        Parameters
        ----------
        device
            ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``. Torch models move
            their network there; numpy models (e.g. `Ridge`) only record it.

        Returns
        -------
        The model itself.
        """
        self.device = str(device)
        return self

    # ------------------------------------------------------------------ fit / predict
    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        context: Context | None = None,
        *,
        groups: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> Model:
        """Fit the model.

        Parameters
        ----------
        X
            Features ``(n, d)`` (feature models) or uint8 RGB patches ``(n, patch_px, patch_px, 3)`` (patch models).
        Y
            Targets ``(n, g)``, no NaN: normalised expression (e.g. log1p of normalised counts), or raw counts for
            models whose `target` is ``"counts"``.
        context
            What the model may need about the rows besides ``X`` and ``Y`` (groups, patients, coordinates, library
            sizes, the data description kept as `meta_`); see `~omx.models.Context`. The model reads the fields
            in `uses` and raises without those in `requires`.
        groups
            Shorthand for ``Context(groups=groups)``: the label of each row (e.g. the section). Validation splits
            hold out whole groups when there are two or more, and feature models standardise each group on its own.
        coords
            Shorthand for ``Context(coords=coords)``: spot centres ``(n, 2)`` in microns, for spatial models.

        Returns
        -------
        The fitted model.
        """
        X = self._check_X(X, fitting=True)
        Y = self._check_Y(Y, len(X))
        context = self._context(context, groups, coords, len(X))
        if len(X) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 rows to fit, got {len(X)}.")
        if self.target == "counts":
            check_counts(Y, name="counts Y")
        self.history_ = {}
        self.n_targets_ = Y.shape[1]
        self._fit_data = (X, Y)  # what a checkpoint of this fit must match (see TorchModel.checkpoint_dir)
        self._n_train_calls = 0
        try:
            self._fit(X, Y, context)
        finally:
            del self._fit_data
        self.meta_ = None if context.meta is None else dict(context.meta)
        self.is_fitted_ = True
        return self

    def predict(
        self,
        X: np.ndarray,
        context: Context | None = None,
        *,
        groups: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        return_var: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predict targets.

        Parameters
        ----------
        X
            Features or patches, as in :meth:`fit`.
        context
            What the model may need about the rows, as in :meth:`fit`. Feature models standardise each group with
            its own statistics, or with ``context.group_stats`` for groups predicted a chunk of rows at a time.
        groups
            Shorthand for ``Context(groups=groups)``.
        coords
            Shorthand for ``Context(coords=coords)``.
        return_var
            Also return the predictive variance (models with `provides_variance` only).

        Returns
        -------
        Predictions, ``float32`` of shape ``(n, g)`` on the scale of the targets given to :meth:`fit` (on the
        log-normalised scale for count models); with ``return_var``, also their variance ``(n, g)``.
        """
        self._check_fitted()
        if return_var and not self.provides_variance:
            raise ValueError(
                f"This {type(self).__name__} gives no predictive variance (provides_variance is False); "
                f"call predict without `return_var`.{self._variance_hint()}"
            )
        X = self._check_X(X)
        context = self._context(context, groups, coords, len(X))
        if len(X) == 0:
            empty = np.zeros((0, self.n_targets_), dtype=np.float32)
            return (empty, empty.copy()) if return_var else empty
        if return_var:
            pred, var = self._predict_var(X, context)
            return np.asarray(pred, dtype=np.float32), np.asarray(var, dtype=np.float32)
        return np.asarray(self._predict(X, context), dtype=np.float32)

    def _fit(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        raise NotImplementedError

    def _predict(self, X: np.ndarray, context: Context) -> np.ndarray:
        raise NotImplementedError

    def _predict_var(self, X: np.ndarray, context: Context) -> tuple[np.ndarray, np.ndarray]:
        """Predictions and their variance (models with `provides_variance`)."""
        raise NotImplementedError

    def _variance_hint(self) -> str:
        """What to change for a predictive variance (appended to the error of ``return_var``)."""
        return ""

    def _context(
        self, context: Context | None, groups: np.ndarray | None, coords: np.ndarray | None, n: int
    ) -> Context:
        """The context of ``n`` rows from `context` or the shorthands, checked, holding only the fields in `uses`."""
        if context is None:
            context = Context(groups=groups, coords=coords)
        elif groups is not None or coords is not None:
            raise ValueError(
                "Pass the context either as `context=` or through the `groups=` / `coords=` shorthands, not both: "
                "put them in the Context."
            )
        elif not isinstance(context, Context):
            raise TypeError(f"`context` must be an omx.models.Context, got {type(context).__name__}.")
        context = context.checked(n)
        for name in sorted(self.requires):
            if getattr(context, name) is None:
                raise ValueError(
                    f"{type(self).__name__} cannot run without `{name}` ({_FIELD_HELP.get(name, name)}): "
                    f"pass {_FIELD_HOW.get(name, f'`Context({name}=...)`')}."
                )
        unused = {name: None for name in context.given() if name not in self.uses and name != "meta"}
        return replace(context, **unused) if unused else context

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


def _recording_init_params(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a model's ``__init__`` so that the outermost constructor records the arguments it was called with.

    The arguments are bound to the signature with its defaults applied (as scvi-tools records its models' from
    ``locals()``), kept as given for `Model.clone` and described as JSON for `Model.init_params_`: each model
    writes its parameters once, in its signature.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Model, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__init__ is not __init__:  # a subclass's constructor called this one: it records
            return
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        params: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:  # without self
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"{type(self).__name__} takes keyword arguments only (got *{name}).")
            params.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        self._init_args = params
        self.init_params_ = {name: self._describe_param(name, value) for name, value in params.items()}

    return __init__


Model.__init__ = _recording_init_params(Model.__init__)


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

    def to(self, device: str) -> TorchModel:
        """Run later fits and predictions on `device`, moving the fitted network there.

        Parameters
        ----------
        device
            ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``.

        Returns
        -------
        The model itself.
        """
        target = get_device(device)  # checked before anything changes
        super().to(device)
        if getattr(self, "module_", None) is not None:
            self.module_.to(target)
        return self

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
