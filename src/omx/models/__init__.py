"""Trainable image-to-expression models: arrays in, arrays out, one shared base (fit / predict / save / load).

``import omx.models`` does not import torch; the torch models import it when they are fitted or loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omx.models._assign import CellAssignment, assign_cells
from omx.models._base import Model, TorchModel
from omx.models._cnn import CNNRegressor
from omx.models._composition import CompositionModel
from omx.models._context import Context
from omx.models._contrastive import Contrastive
from omx.models._distributed import fit_distributed
from omx.models._files import ModelFileError
from omx.models._gnn import SpatialGraph
from omx.models._graph_ridge import GraphRidge
from omx.models._retrieval import RetrievalBank
from omx.models._ridge import Ridge
from omx.models._standardize import GroupStandardizer

#: Short names accepted by `get_model` (and by the ``model=`` argument of `omx.tl` functions).
MODELS: dict[str, type[Model]] = {
    "ridge": Ridge,
    "cnn": CNNRegressor,
    "graph": GraphRidge,
    "gnn": SpatialGraph,
    "contrastive": Contrastive,
}

__all__ = [
    "CellAssignment",
    "CNNRegressor",
    "CompositionModel",
    "Context",
    "Contrastive",
    "GraphRidge",
    "GroupStandardizer",
    "MODELS",
    "Model",
    "ModelFileError",
    "RetrievalBank",
    "Ridge",
    "SpatialGraph",
    "TorchModel",
    "assign_cells",
    "fit_distributed",
    "get_model",
    "load",
]


def get_model(spec: str | Model = "ridge", **kwargs: Any) -> Model:
    """Return a model from its short name or a model instance.

    Parameters
    ----------
    spec
        ``"ridge"`` (`Ridge`), ``"cnn"`` (`CNNRegressor`), ``"graph"`` (`GraphRidge`), ``"gnn"`` (`SpatialGraph`),
        ``"contrastive"`` (`Contrastive`), or a `Model` (returned as is).
    **kwargs
        Constructor arguments, when `spec` is a name.

    Returns
    -------
    An unfitted model (or `spec` itself).
    """
    if isinstance(spec, Model):
        if kwargs:
            raise ValueError(
                f"Keyword arguments {sorted(kwargs)} apply only to a model name; set them on the "
                f"{type(spec).__name__} you passed instead."
            )
        return spec
    if isinstance(spec, type) and issubclass(spec, Model):
        return spec(**kwargs)
    if isinstance(spec, str) and spec.lower() in MODELS:
        return MODELS[spec.lower()](**kwargs)
    raise ValueError(f"Unknown model {spec!r}. Use one of {sorted(MODELS)} or an omx.models.Model instance.")


def load(path: str | Path, **overrides: Any) -> Model:
    """Load a model saved with `Model.save`, whatever its class.

    Parameters
    ----------
    path
        Directory written by `Model.save`.
    **overrides
        Constructor arguments to replace (e.g. ``device="cpu"``).

    Returns
    -------
    The fitted model.

    Raises
    ------
    FileNotFoundError
        When `path` holds no ``params.json``.
    ModelFileError
        When the saved model is damaged, foreign or too new for this omx (see `Model.load`).
    """
    return Model.load(path, **overrides)
