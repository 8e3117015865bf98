"""Patch encoders: image patches ``(n, H, W, 3)`` uint8 -> feature vectors ``(n, d)`` float32.

`HandcraftedEncoder` needs only numpy, scipy and scikit-image. Pathology foundation models come by name
(`get_encoder`, `registered`, `describe`; a `FoundationEncoder`), timm models as ``"timm:<architecture>"``
(`TimmEncoder`), and any torch module through `TorchEncoder`. The torch encoders are imported on first use, so
``import omx.encoders`` does not import torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import pandas as pd

from omx.encoders._base import Encoder, check_patches, resize_patches
from omx.encoders._handcrafted import HandcraftedEncoder

_LAZY = {
    "TorchEncoder": "._torch",
    "SmallCNN": "._torch",
    "FoundationEncoder": "._foundation",
    "EncoderSpec": "._foundation",
    "TimmEncoder": "._timm",
}

__all__ = [
    "Encoder",
    "EncoderSpec",
    "FoundationEncoder",
    "HandcraftedEncoder",
    "SmallCNN",
    "TimmEncoder",
    "TorchEncoder",
    "check_patches",
    "describe",
    "get_encoder",
    "registered",
    "resize_patches",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def get_encoder(
    spec: str | Encoder | Any = "handcrafted", weights: str | os.PathLike | None = None, **kwargs: Any
) -> Encoder:
    """Return an encoder from a name, an encoder, a torch module or the output of `Encoder.get_params`.

    Parameters
    ----------
    spec
        - ``"handcrafted"``: colour and texture features (`HandcraftedEncoder`), no torch needed;
        - a pathology foundation model by name: ``"uni"``, ``"uni2_h"``, ``"h_optimus_0"``, ``"h_optimus_1"``,
          ``"virchow2"``, ``"phikon_v2"``, ``"gigapath"``, ``"conch"`` (see `registered` and `describe`), with
          its architecture, preprocessing, pooling and native resolution (a `FoundationEncoder`);
        - ``"timm:<architecture>"``: any timm model (e.g. ``"timm:resnet50"``), pooled as timm pools it;
        - ``"hf-hub:<org>/<name>"``: a timm model published on the Hugging Face hub with its ``config.json``;
        - an `Encoder` (returned as is); a `torch.nn.Module` (wrapped in a `TorchEncoder`);
        - a dict with ``"class"`` as written by `Encoder.get_params`.
    weights
        For a named, ``timm:`` or ``hf-hub:`` encoder: a local weight file (``.safetensors``, ``.bin``,
        ``.pth``, ``.pt``) or a folder holding one (for ``hf-hub:``, the downloaded repository with its
        ``config.json``); None downloads the published weights (needs network; a token for gated models);
        ``"random"`` keeps random weights (tests and speed measurements only).
    **kwargs
        Passed to the encoder class (e.g. ``batch_size=``, ``device=``, ``token=``).

    Returns
    -------
    The encoder.

    Examples
    --------
    >>> import omx
    >>> omx.encoders.get_encoder("handcrafted").name
    'handcrafted'
    >>> uni = omx.encoders.get_encoder("uni", weights="weights/MahmoodLab/UNI/pytorch_model.bin")  # doctest: +SKIP
    """
    if isinstance(spec, Encoder):
        if kwargs or weights is not None:
            raise ValueError("`weights=` and keyword arguments apply only to a name or a module, not an Encoder.")
        return spec
    if isinstance(spec, str):
        if spec.lower() == "handcrafted":
            if weights is not None:
                raise ValueError("The handcrafted encoder has no weights; drop `weights=`.")
            return HandcraftedEncoder(**kwargs)
        if spec.lower().startswith(("timm:", "hf-hub:", "hf_hub:")):
            from omx.encoders._timm import TimmEncoder

            return TimmEncoder(spec, weights=weights, **kwargs)
        from omx.encoders._foundation import get_spec, registered

        if get_spec(spec) is not None:
            from omx.encoders._foundation import FoundationEncoder

            return FoundationEncoder(spec, weights=weights, **kwargs)
        raise ValueError(
            f"Unknown encoder {spec!r}. Use 'handcrafted', a pathology foundation model ({', '.join(registered())}), "
            "'timm:<architecture>', 'hf-hub:<org>/<name>', an omx Encoder, or a torch.nn.Module."
        )
    if isinstance(spec, dict):
        params = {**spec, **kwargs}
        cls = params.pop("class", None)
        if weights is not None:
            params["weights"] = weights
        if cls == "HandcraftedEncoder":
            return HandcraftedEncoder(**params)
        if cls == "FoundationEncoder":
            from omx.encoders._foundation import FoundationEncoder

            return FoundationEncoder(params.pop("encoder"), **params)
        if cls == "TimmEncoder":
            from omx.encoders._timm import TimmEncoder

            return TimmEncoder(params.pop("encoder"), **params)
        if cls == "TorchEncoder":
            raise ValueError(
                f"This encoder wrapped a torch module ({params.get('module')}) that cannot be rebuilt from its "
                "parameters. Build the module, load its weights and pass `TorchEncoder(module, ...)` instead."
            )
        raise ValueError(f"Cannot rebuild an encoder from {spec!r}; expected a dict with 'class'.")
    torch = sys.modules.get("torch")  # a module can only exist when torch was imported already
    if torch is not None and isinstance(spec, torch.nn.Module):
        if weights is not None:
            raise ValueError("Load the weights into your module yourself; `weights=` applies to named encoders.")
        from omx.encoders._torch import TorchEncoder

        return TorchEncoder(spec, **kwargs)
    raise TypeError(f"Cannot make an encoder from a {type(spec).__name__}; pass a name, an Encoder or a torch module.")


def registered() -> list[str]:
    """Names of the pathology foundation encoders `get_encoder` knows.

    Returns
    -------
    Canonical names, sorted.
    """
    from omx.encoders._foundation import registered as names

    return names()


def describe() -> pd.DataFrame:
    """A table of the registered foundation encoders: hub id, licence, input, resolution, embedding, pooling.

    Returns
    -------
    One row per encoder, indexed by name.
    """
    from omx.encoders._foundation import REGISTRY

    rows = {}
    for spec in REGISTRY.values():
        rows[spec.name] = {
            "description": spec.description,
            "hub_id": spec.hub_id,
            "hub_file": spec.hub_file,
            "licence": spec.licence,
            "architecture": spec.arch,
            "patch_px": spec.patch_px,
            "mpp": spec.mpp,
            "patch_um": spec.patch_um,
            "dim": spec.dim,
            "pooling": spec.pooling,
            "n_params": spec.n_params,
        }
    return pd.DataFrame.from_dict(rows, orient="index").sort_index()
