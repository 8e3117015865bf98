"""Plots: expression, cell types and uncertainty over the tissue; per-gene scores; training curves."""

from omx.pl._expression import expression
from omx.pl._history import history
from omx.pl._maps import cell_types, uncertainty
from omx.pl._scores import gene_scores

__all__ = ["cell_types", "expression", "gene_scores", "history", "uncertainty"]
