"""Plots: expression, predictions on grids and nuclei, cell types and uncertainty over the tissue; scores; training.

Every function follows scanpy: ``ax=`` draws into given axes (a sequence of axes for the multi-panel plots,
which say how many), ``save=`` writes the figure (a path, or True for ``omx.settings.figdir``), and ``show=``
shows it and returns None, or with ``show=False`` returns the axes drawn into: one `~matplotlib.axes.Axes` for
:func:`history`, the list of panel axes for the others (their figure is ``axes[0].figure``). Tables are found as
in ``omx.tl`` (``table_key=None``: the one measured table) and sections by ``section_key="section"``.
"""

from omx.pl._expression import expression
from omx.pl._history import history
from omx.pl._maps import cell_types, uncertainty
from omx.pl._prediction_map import prediction_map
from omx.pl._scores import gene_scores

__all__ = ["cell_types", "expression", "gene_scores", "history", "prediction_map", "uncertainty"]
