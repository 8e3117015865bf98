"""Patch encoders: image patches ``(n, H, W, 3)`` uint8 -> feature vectors ``(n, d)`` float32.

`HandcraftedEncoder` needs only numpy, scipy and scikit-image. `TorchEncoder` (any torch module, e.g. a foundation model
loaded from local weights) and `SmallCNN` are imported on first use, so ``import omx.encoders`` does not
import torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from omx.encoders._base import Encoder, check_patches, resize_patches
from omx.encoders._handcrafted import HandcraftedEncoder

_LAZY = {"TorchEncoder": "._torch", "SmallCNN": "._torch"}

__all__ = [
    "Encoder",
    "HandcraftedEncoder",
    "SmallCNN",
    "TorchEncoder",
    "check_patches",
    "get_encoder",
    "resize_patches",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def get_encoder(spec: str | Encoder | Any = "handcrafted", **kwargs: Any) -> Encoder:
    """Return an encoder from a name, an encoder, a torch module or the output of `Encoder.get_params`.

    Parameters
    ----------
    spec
        ``"handcrafted"``; an `Encoder` (returned as is); a `torch.nn.Module` (wrapped in a `TorchEncoder`); or a
        dict with ``"class"`` as written by `Encoder.get_params` (only `HandcraftedEncoder` can be rebuilt so:
        a `TorchEncoder` needs its module again).
    **kwargs
        Passed to the encoder class when `spec` is a name or a module.

    Returns
    -------
    The encoder.
    """
    if isinstance(spec, Encoder):
        if kwargs:
            raise ValueError("Keyword arguments apply only when `spec` is a name or a module, not an Encoder.")
        return spec
    if isinstance(spec, str):
        if spec.lower() == "handcrafted":
            return HandcraftedEncoder(**kwargs)
        raise ValueError(
            f"Unknown encoder {spec!r}. Use 'handcrafted', an omx Encoder, or a torch.nn.Module "
            "(e.g. a foundation model with weights loaded from a local file)."
        )
    if isinstance(spec, dict):
        params = {**spec, **kwargs}
        cls = params.pop("class", None)
        if cls == "HandcraftedEncoder":
            return HandcraftedEncoder(**params)
        if cls == "TorchEncoder":
            raise ValueError(
                f"This encoder wrapped a torch module ({params.get('module')}) that cannot be rebuilt from its "
                "parameters. Build the module, load its weights and pass `TorchEncoder(module, ...)` instead."
            )
        raise ValueError(f"Cannot rebuild an encoder from {spec!r}; expected a dict with 'class'.")
    torch = sys.modules.get("torch")  # a module can only exist when torch was imported already
    if torch is not None and isinstance(spec, torch.nn.Module):
        from omx.encoders._torch import TorchEncoder

        return TorchEncoder(spec, **kwargs)
    raise TypeError(f"Cannot make an encoder from a {type(spec).__name__}; pass a name, an Encoder or a torch module.")
