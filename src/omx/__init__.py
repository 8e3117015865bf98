"""omx: predict molecular profiles from histology, inside the scverse ecosystem.

Submodules are imported on first use, so ``import omx`` stays light and never imports torch.
"""

import importlib
import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("omx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

logging.getLogger("omx").addHandler(logging.NullHandler())

_SUBMODULES = ("datasets", "encoders", "get", "io", "metrics", "models", "pl", "pp", "tl")

__all__ = [*_SUBMODULES, "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"omx.{name}")
    raise AttributeError(f"module 'omx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
