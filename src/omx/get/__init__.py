"""Getters: omx's results as AnnData or tidy DataFrames, ready for scanpy and squidpy.

Like ``scanpy.get``: nobody needs to know where in a SpatialData object omx keeps a result to use it.
"""

from omx.get._getters import predictions, proportions, scores

__all__ = ["predictions", "proportions", "scores"]
