"""Plots: expression over the tissue and per-gene scores."""

from omx.pl._expression import expression
from omx.pl._scores import gene_scores

__all__ = ["expression", "gene_scores"]
