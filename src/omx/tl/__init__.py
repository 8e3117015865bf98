"""Tools: fit models on sections with expression, predict from H&E, evaluate without leakage."""

from omx.tl._deconvolve import assign_cells, deconvolve, signatures_from_proportions
from omx.tl._evaluate import cross_validate
from omx.tl._image_types import predict_proportions
from omx.tl._predict import fit_predict, predict_expression
from omx.tl._superres import super_resolve

__all__ = [
    "assign_cells",
    "cross_validate",
    "deconvolve",
    "fit_predict",
    "predict_expression",
    "predict_proportions",
    "signatures_from_proportions",
    "super_resolve",
]
