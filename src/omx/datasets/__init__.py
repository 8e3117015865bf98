"""Data sets: a synthetic H&E-like toy, the her2st study and a small packaged her2st sample.

All return SpatialData in the layout of `omx.io.read_st`.
"""

from omx.datasets._her2st import download_her2st, her2st, her2st_genes
from omx.datasets._sample import her2st_sample
from omx.datasets._toy import toy_sdata

__all__ = ["download_her2st", "her2st", "her2st_genes", "her2st_sample", "toy_sdata"]
