"""Tools: fit models on sections with expression, predict from H&E, evaluate without leakage."""

from omx.tl._evaluate import cross_validate
from omx.tl._predict import fit_predict, predict_expression

__all__ = ["cross_validate", "fit_predict", "predict_expression"]
