"""What every plot does at its end: save the figure, show it or hand back the axes, as scanpy does."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from omx._settings import settings
from omx._utils import logger

A = TypeVar("A", Axes, list)

#: Resolution of saved figures.
SAVE_DPI = 150


def axes_list(ax: Axes | Sequence[Axes] | None) -> list[Axes] | None:
    """``ax`` as a flat list (one Axes, a list or a numpy array of them), or None."""
    if ax is None:
        return None
    if isinstance(ax, Axes):
        return [ax]
    import numpy as np

    return list(np.ravel(np.asarray(ax, dtype=object)))


def finish(axes: A, *, show: bool | None, save: str | os.PathLike | bool | None, name: str) -> A | None:
    """Save the figure of ``axes`` (``save``), then show it and return None, or return ``axes`` (``show=False``).

    ``save=True`` writes ``omx.settings.figdir / f"{name}.png"``; a path is used as it is (its suffix picks
    the format). ``show=None`` follows ``omx.settings.autoshow``. A figure that is shown is not closed here:
    `matplotlib.pyplot.show` (or the notebook's inline backend) owns it then.
    """
    first = axes if isinstance(axes, Axes) else axes[0]
    fig = first.figure
    if save is not None and save is not False:
        path = settings.figdir / f"{name}.png" if save is True else Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=SAVE_DPI, bbox_inches="tight")
        logger.info("Saved the figure to %s", path)
    if settings.autoshow if show is None else show:
        plt.show()
        return None
    return axes
