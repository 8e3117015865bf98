"""The base every omx model shares: its declared contract, checks, fit / predict with a context, save / load."""

from __future__ import annotations

import functools
import inspect
import json
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from omx._settings import warn
from omx._utils import check_counts, get_device, logger
from omx.encoders._base import check_patches
from omx.models._context import Context
from omx.models._files import (
    PARAMS_FILE,
    ModelFileError,
    check_files,
    read_npz,
    read_params,
    warn_if_newer,
    write_model_folder,
    written_by_newer,
)
from omx.models._training import BatchLoss, Checkpoints, autocast, train

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from omx.encoders import Encoder

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
    #: Native resolution in microns per pixel of a patch model whose image tower has one (a foundation backbone
    #: fine-tuned at its own magnification): `omx.tl` then cuts patches of ``patch_px * mpp`` microns. None: patches
    #: span the spot (times the context).
    mpp: float | None = None
    #: The encoder that makes a feature model's features from patches (`omx.tl` encodes with it).
    encoder: Encoder
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
        self._fit_checked(X, Y, context)
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

    def _fit_checked(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        """``_fit`` on checked inputs, with what the kind of model sets up around it (torch models: checkpoints)."""
        self._fit(X, Y, context)

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

    def _export_state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The fitted state as part of another model's: its values, and its arrays named ``prefix + name``."""
        state, arrays = self._get_state()
        return state, {f"{prefix}{k}": v for k, v in arrays.items()}

    def _restore_state(
        self, state: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, *, n_targets: int, n_features_in: int
    ) -> Model:
        """Make this unfitted model the part that `_export_state` saved under ``prefix``; returns it."""
        self._set_state(state, {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        self.n_targets_, self.n_features_in_ = n_targets, n_features_in
        self.is_fitted_ = True
        return self

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the fitted model to the directory `path`: ``params.json`` and the weights.

        ``params.json`` records the model-file format, the omx version, the model's class, parameters and fitted
        state, and the byte size and sha256 of the weights file, which :meth:`load` checks. The files are written
        under temporary names and moved into place, ``params.json`` last: a save cut short leaves no model that loads.

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
        json.dumps(meta)  # before creating anything, so an un-serialisable value leaves no debris
        path.mkdir(parents=True, exist_ok=True)
        write_model_folder(path, meta, {self._weights_file: lambda file: self._save_arrays(file, arrays)})

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> Model:
        """Rebuild a model saved with :meth:`save`, whatever its class.

        Before anything is built, the folder is checked: ``params.json`` must be an omx model's, of a format this omx
        reads, and the weights file must have the size and sha256 recorded there (folders saved before omx recorded
        them load without this check). Arrays are read without pickle. A model written by a newer omx loads with an
        `omx.OmxWarning`, unless it has parameters this omx does not know.

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

        Raises
        ------
        FileNotFoundError
            When `path` holds no ``params.json``.
        ModelFileError
            When the folder is damaged (unreadable ``params.json``, a weights file missing, truncated or corrupt,
            fitted state missing), foreign (not an omx model, pickled objects) or too new for this omx.
        """
        from omx import __version__

        path = Path(path)
        meta = read_params(path)
        params = path / PARAMS_FILE
        newer = written_by_newer(meta)
        by = f"omx {meta.get('omx_version')}, newer than this omx ({__version__})"
        klass = Model._registry.get(meta["class"])
        if klass is None:
            fix = (
                f"It was written by {by}: upgrade omx."
                if newer
                else "Is it a model class of your own? Import it first."
            )
            raise ModelFileError(f"{params} holds a {meta['class']!r}, which this omx does not know. {fix}")
        if not issubclass(klass, cls):
            raise TypeError(f"{path} holds a {klass.__name__}, not a {cls.__name__}; use `omx.models.load(path)`.")
        saved = dict(meta["init_params"])
        accepted = inspect.signature(klass).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            if unknown := sorted(set(saved) - set(accepted)):
                if newer:
                    raise ModelFileError(
                        f"{params} was written by {by}, with parameters {unknown} that this omx's {klass.__name__} "
                        "does not take; loading without them could predict differently. Upgrade omx to load it."
                    )
                warn(  # saved by an older omx
                    f"{path} was saved with parameters {unknown} that {klass.__name__} no longer takes; they are "
                    "ignored."
                )
                saved = {k: v for k, v in saved.items() if k in accepted}
        weights = check_files(path, meta)
        model = klass(**{**saved, **overrides})
        try:
            arrays = model._load_arrays(weights)
        except ModelFileError:
            raise
        except Exception as err:
            unchecked = " (it was saved before omx recorded checksums, so nothing caught it sooner)"
            raise ModelFileError(
                f"{weights} cannot be read as the weights of a {klass.__name__}: {type(err).__name__}: {err}. It is "
                f"damaged{unchecked if meta['format'] == 0 else ' or was not written by omx'}. Save the model again."
            ) from err
        _set_saved_state(model, dict(meta["state"]), arrays, params, weights)
        model.history_ = {k: list(v) for k, v in meta["history"].items()}
        model.meta_ = meta.get("meta")
        model.is_fitted_ = True
        warn_if_newer(path, meta)
        return model

    def _save_arrays(self, file: Path, arrays: dict[str, np.ndarray]) -> None:
        with open(file, "wb") as f:  # a file object: `np.savez` would add ".npz" to a name without it
            np.savez(f, **arrays)

    def _load_arrays(self, file: Path) -> dict[str, np.ndarray]:
        return read_npz(file)


def _set_saved_state(model: Model, state: dict[str, Any], arrays: dict[str, Any], params: Path, weights: Path) -> None:
    """Give `model` its saved state; a `ModelFileError` lists every saved value missing that it needs."""
    missing = [key for key in ("n_targets", "n_features_in") if key not in state]
    model.n_targets_ = state.pop("n_targets", None)
    if (n_features_in := state.pop("n_features_in", None)) is not None:
        model.n_features_in_ = n_features_in
    first_missing: KeyError | None = None
    failure: Exception | None = None
    for _ in range(len(state) + len(arrays) + 32):  # each round finds one more missing value
        try:
            model._set_state(state, arrays)
        except KeyError as err:
            key = err.args[0] if err.args else None
            if not isinstance(key, str) or key in state or key in arrays:  # not a saved value that is missing
                failure = err
                break
            missing.append(key)
            first_missing = first_missing or err
            state, arrays = {**state, key: None}, {**arrays, key: None}  # stand-ins, to find the next one missing
        except Exception as err:  # noqa: BLE001 (raised below, as a ModelFileError)
            failure = err
            break
        else:
            break
    if missing:
        raise ModelFileError(
            f"The saved model in {params.parent} lacks the fitted values {missing} that {type(model).__name__} needs "
            f"(neither in the 'state' of {params.name} nor in {weights.name}): it is damaged or was written by "
            "another version of omx. Save the model again."
        ) from first_missing or failure
    if isinstance(failure, RuntimeError):
        # a network refusing its weights already names the cause (e.g. an override such as n_blocks= that does not
        # fit what was saved); calling the file damaged would mislead
        raise failure
    if failure is not None:
        raise ModelFileError(
            f"The saved state in {params.parent} does not fit this omx's {type(model).__name__} "
            f"({type(failure).__name__}: {failure}): it is damaged or was written by another version of omx. Save "
            "the model again."
        ) from failure


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


class TorchModel(Model):
    """Base of the torch models: the network (`module_`), its device, mixed precision on CUDA, and its state.

    Subclasses build their network in ``_fit`` (as `module_`) and train it with :meth:`_train`, which runs the one
    training loop of `omx.models._training` (early stopping, checkpoints, DDP); ``_get_state`` returns their extra
    arrays (the module's weights are saved here), and ``_set_module_state`` rebuilds `module_` from the saved state
    before its weights are loaded.
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

    _autocast = staticmethod(autocast)

    def _fit_checked(self, X: np.ndarray, Y: np.ndarray, context: Context) -> None:
        """``_fit``, with the checkpoints of this fit (one per training run) when `checkpoint_dir` is set."""
        self._checkpoints = None
        if self.checkpoint_dir is not None:
            params = {k: v for k, v in self.init_params_.items() if k not in ("device", "show_progress_bar")}
            self._checkpoints = Checkpoints(self.checkpoint_dir, name=type(self).__name__, params=params, X=X, Y=Y)
        try:
            self._fit(X, Y, context)
        finally:
            del self._checkpoints

    def _train(
        self,
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
    ) -> None:
        """Train `module_` with the one training loop (`omx.models._training.train`); set `history_`, `best_epoch_`.

        ``batch_loss(net, rows, train)`` returns the mean loss of the rows (indices into the training arrays);
        ``net`` is `module_`, or its DistributedDataParallel wrapper under torch.distributed (`supports_ddp`).
        """
        checkpoint = None if self._checkpoints is None else self._checkpoints.next_run(train_idx, val_idx)
        result = train(
            self.module_, batch_loss, train_idx, val_idx, epochs=epochs, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, patience=patience, generator=generator, device=device, val_score=val_score,
            checkpoint=checkpoint, ddp=self.supports_ddp, name=type(self).__name__,
            show_progress_bar=self.show_progress_bar,
        )  # fmt: skip
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch

    def _save_arrays(self, file: Path, arrays: dict[str, np.ndarray]) -> None:
        import torch

        from omx.models._finetune_net import trained_state_dict

        torch.save(
            {
                "module": trained_state_dict(self.module_),  # a frozen backbone is rebuilt from its own weights
                "arrays": {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()},
            },
            file,
        )

    def _load_arrays(self, file: Path) -> dict[str, Any]:
        import torch

        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            raise ModelFileError(
                f"{file} holds pickled Python objects besides tensors{f' ({found[1]})' if found else ''}, which omx "
                "never loads: unpickling can run any code, so omx reads weights with `weights_only=True`. An omx "
                "model's weights are tensors only; save the model again with omx."
            ) from err
        if not (
            isinstance(data, dict)
            and isinstance(data.get("module"), dict)
            and isinstance(data.get("arrays"), dict)
            and all(isinstance(v, torch.Tensor) for v in [*data["module"].values(), *data["arrays"].values()])
        ):
            raise ModelFileError(
                f"{file} is not the weights file of an omx torch model (a dict of 'module' and 'arrays' tensors). "
                "Save the model again with omx."
            )
        return {**{k: v.numpy() for k, v in data["arrays"].items()}, "__module__": data["module"]}

    def _set_state(self, state: dict[str, Any], arrays: dict[str, Any]) -> None:
        from omx.models._finetune_net import load_trained_state

        arrays = dict(arrays)
        weights = arrays.pop("__module__")
        self._set_module_state(state, arrays)
        load_trained_state(self.module_, weights)
        self.module_.eval()

    def _set_module_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Rebuild `module_` (weights not loaded yet) and the other fitted attributes from a saved state."""
        raise NotImplementedError
