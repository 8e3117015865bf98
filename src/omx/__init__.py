"""omx: predict molecular profiles from histology, inside the scverse ecosystem.

Submodules are imported on first use, so ``import omx`` stays light and never imports torch. ``omx.settings``
(verbosity of the ``"omx"`` logger, plot defaults) and `omx.OmxWarning` come from a small module that imports
only the standard library; importing it gives the ``"omx"`` logger its one handler (see `omx.settings`).
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

from omx._settings import OmxWarning, settings

try:
    __version__ = version("omx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_SUBMODULES = ("datasets", "encoders", "get", "io", "metrics", "models", "pl", "pp", "tl")

__all__ = [*_SUBMODULES, "OmxWarning", "__version__", "settings"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"omx.{name}")
    raise AttributeError(f"module 'omx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
