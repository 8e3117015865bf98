"""Settings of omx (``omx.settings``) and how its messages reach people: the ``"omx"`` logger and `OmxWarning`.

Two channels, as in scanpy:

- Things a user must act on (data that look wrong, genes or spots dropped against the request, a setting
  that disagrees with the data) are `warnings.warn` with `OmxWarning`, so they show in notebooks and scripts
  whatever the logging setup, once per place, and can be filtered or turned into errors by category.
- Progress and information (what was read, chosen and written) go to the ``"omx"`` logger, at the level that
  ``omx.settings.verbosity`` sets.

Importing this module adds one handler to the ``"omx"`` logger (never to the root logger) and imports nothing
heavy: no torch, no matplotlib.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path

__all__ = ["OmxWarning", "Verbosity", "settings", "warn"]

logger = logging.getLogger("omx")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class OmxWarning(UserWarning):
    """A warning from omx about something to check or act on (filter it with ``category=omx.OmxWarning``)."""


def warn(message: str, category: type[Warning] = OmxWarning) -> None:
    """`warnings.warn` pointing at the first caller outside omx, so the warning names the user's own line."""
    frame = sys._getframe(1)
    stacklevel = 2  # the caller of `warn`
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame = frame.f_back
        stacklevel += 1
    warnings.warn(message, category, stacklevel=stacklevel - 1 if frame is None else stacklevel)


class Verbosity(IntEnum):
    """How much omx logs: ``error`` (0), ``warning`` (1), ``info`` (2) or ``debug`` (3), as in scanpy."""

    error = 0
    warning = 1
    info = 2
    debug = 3

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return self.name == other.lower()
        return int(self) == other

    __hash__ = IntEnum.__hash__

    @property
    def level(self) -> int:
        """The `logging` level of this verbosity."""
        return {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}[int(self)]


class _Formatter(logging.Formatter):
    """Information as the bare message; other levels prefixed with their name (``WARNING: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


class _Handler(logging.StreamHandler):
    """Writes omx's records to the current ``sys.stderr``, unless the root logger already shows them.

    Records also propagate to the root logger (so ``pytest``'s ``caplog`` and the user's own logging
    configuration receive them); when the root logger has a console handler that takes the record (e.g. after
    ``logging.basicConfig()``), this handler stays silent, so nothing is printed twice.
    """

    def __init__(self):
        logging.Handler.__init__(self)  # no fixed stream: `stream` follows sys.stderr (Jupyter, pytest swap it)
        self.setFormatter(_Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    def filter(self, record: logging.LogRecord) -> bool:
        root = logging.getLogger()
        for handler in root.handlers:
            console = getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
            if console and record.levelno >= handler.level and handler.filter(record):
                return False
        return super().filter(record)


def _handler() -> _Handler:
    """The one handler omx adds to its logger (created on first use, found again after a module reload)."""
    for handler in logger.handlers:
        if type(handler).__name__ == "_Handler" and type(handler).__module__ == __name__:
            return handler
    handler = _Handler()
    logger.addHandler(handler)
    return handler


class Settings:
    """Settings of omx, as ``omx.settings``.

    Attributes
    ----------
    verbosity
        What the ``"omx"`` logger lets through: ``"error"``, ``"warning"``, ``"info"`` (the default) or
        ``"debug"``, or the integers 0 to 3 as in scanpy. Reading it gives a `Verbosity`. The default is
        ``"info"`` because omx logs little and what it logs is what a user looks for after a call: where
        results were written (``Added 187 spots x 785 genes to sdata.tables['table'].layers['omx_pred']``),
        what was chosen (a ridge penalty, the validation sections, early stopping) and per-section scores;
        long loops show progress bars instead, and per-element details are at ``"debug"``. Set
        ``"warning"`` for quiet runs. Things to act on are `warnings.warn` (`OmxWarning`) and are not
        affected by ``verbosity``; filter them with the `warnings` module.
    autoshow
        Whether ``omx.pl`` functions show their figure (and return None) when called without ``show=``;
        True by default, as in scanpy.
    figdir
        Folder where ``omx.pl`` functions save figures when called with ``save=True``; ``"figures"``.

    Notes
    -----
    Setting ``verbosity`` sets the level of the ``"omx"`` logger, which has one handler writing to
    ``sys.stderr`` with a short format; the root logger is never touched. Records propagate to the root
    logger as usual (``pytest``'s ``caplog`` and the user's own handlers receive them); when the root logger
    already has a console handler, omx's handler stays silent so that nothing is printed twice.

    Examples
    --------
    >>> import omx
    >>> omx.settings.verbosity = "warning"  # doctest: +SKIP
    >>> with omx.settings.override(verbosity="debug"):  # doctest: +SKIP
    ...     omx.tl.fit_predict(sdata, train="S1", predict="S2")
    """

    def __init__(self):
        self._verbosity = Verbosity.info
        self.verbosity = Verbosity.info
        self.autoshow = True
        self.figdir = Path("figures")
        self.feature_store = None

    @property
    def verbosity(self) -> Verbosity:
        """What the ``"omx"`` logger lets through (see the class docstring)."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: str | int | Verbosity) -> None:
        if isinstance(value, str) and value.lower() in Verbosity.__members__:
            verbosity = Verbosity[value.lower()]
        elif isinstance(value, str) and value.isdigit() and int(value) in Verbosity._value2member_map_:
            verbosity = Verbosity(int(value))
        elif isinstance(value, int) and not isinstance(value, bool) and value in Verbosity._value2member_map_:
            verbosity = Verbosity(value)
        else:
            raise ValueError(
                f"verbosity must be one of {list(Verbosity.__members__)} or an integer from 0 to 3, got {value!r}."
            )
        self._verbosity = verbosity
        _handler()
        logger.setLevel(verbosity.level)

    @property
    def autoshow(self) -> bool:
        """Whether plots are shown when ``show=`` is omitted."""
        return self._autoshow

    @autoshow.setter
    def autoshow(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"autoshow must be True or False, got {value!r}.")
        self._autoshow = value

    @property
    def figdir(self) -> Path:
        """Folder of the figures saved with ``save=True``."""
        return self._figdir

    @figdir.setter
    def figdir(self, value: str | os.PathLike) -> None:
        self._figdir = Path(value)

    @property
    def feature_store(self) -> Path | None:
        """A folder (zarr) where `omx.pp.encode` and `omx.tl` keep the features of spots no table annotates.

        `omx.tl` reads features from it before encoding, and writes those it computes, so a slow encoder runs
        once per slide and geometry across calls and sessions. None (the default) keeps no store.
        """
        return self._feature_store

    @feature_store.setter
    def feature_store(self, value: str | os.PathLike | None) -> None:
        self._feature_store = None if value is None else Path(value)

    @contextmanager
    def override(self, **values) -> Iterator[Settings]:
        """Change settings inside a ``with`` block and restore them after it, e.g. ``override(verbosity=3)``."""
        names = ("verbosity", "autoshow", "figdir", "feature_store")
        unknown = [k for k in values if k not in names]
        if unknown:
            raise AttributeError(f"omx.settings has no setting(s) {unknown}; settings: {', '.join(names)}.")
        old = {k: getattr(self, k) for k in values}
        try:
            for k, v in values.items():
                setattr(self, k, v)
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)

    def __repr__(self) -> str:
        store = None if self.feature_store is None else str(self.feature_store)
        return (
            f"omx.settings(verbosity={self.verbosity.name!r}, autoshow={self.autoshow}, "
            f"figdir={str(self.figdir)!r}, feature_store={store!r})"
        )


settings = Settings()
