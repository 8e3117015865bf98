"""Training curves of a fitted model."""

from __future__ import annotations

from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from omx._docs import doc_params
from omx.pl._utils import finish


@doc_params()
def history(
    model, *, ax: Axes | None = None, show: bool | None = None, save: str | PathLike | bool | None = None
) -> Axes | None:
    """Plot how a model was fitted: losses per epoch, or a cross-validation curve.

    Torch models: training and validation loss per epoch (left axis), the validation score that early stopping
    followed (mean per-gene Pearson r, right axis) and the epoch whose weights were kept (for `Contrastive`, those
    of its first cross-fitting fold). Ridge: the
    cross-validated mean Pearson r against alpha, one line per number of target components, with the choice
    marked. `GraphRidge`: the cross-validated mean Pearson r against the neighbour share of the propagation, with
    the choice marked.

    Parameters
    ----------
    model
        A fitted :class:`omx.models.Model` (or its ``history_`` dict).
    ax
        Axes to draw into; a new figure when omitted.
    {show}
    {save}

    Returns
    -------
    With ``show=False``, the axes (one panel; a torch model's validation score is on its twin axes, in
    ``ax.figure.axes``); otherwise None.
    """
    hist = model if isinstance(model, dict) else getattr(model, "history_", None)
    if not hist:
        raise ValueError("The model has no training history: fit it first (a ridge with a fixed alpha has none).")
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    if "alpha" in hist:
        scores = np.atleast_2d(np.asarray(hist["cv_pearson"], dtype=float))
        ranks = hist.get("n_components", [None] * len(scores))
        for row, rank in zip(scores, ranks, strict=True):
            ax.plot(hist["alpha"], row, marker="o", ms=3, label="genes" if rank is None else f"{rank} components")
        best = np.unravel_index(np.nanargmax(scores), scores.shape)
        ax.scatter([hist["alpha"][best[1]]], [scores[best]], s=80, facecolors="none", edgecolors="k", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("alpha")
        ax.set_ylabel("CV mean Pearson r")
        ax.legend(fontsize=8, frameon=False)
        ax.set_title("Ridge: cross-validated penalty (circle: chosen)", fontsize=10)
    elif "propagation" in hist and "cv_pearson" in hist:
        share, scores = np.asarray(hist["propagation"]), np.asarray(hist["cv_pearson"], dtype=float)
        ax.plot(share, scores, marker="o", ms=3)
        chosen = getattr(model, "propagation_", share[np.nanargmax(scores)])
        ax.scatter([chosen], [scores[np.argmin(np.abs(share - chosen))]], s=80, facecolors="none", edgecolors="k")
        ax.set_xlabel("neighbour share of the propagated prediction")
        ax.set_ylabel("CV mean Pearson r")
        ax.set_title("GraphRidge: cross-validated propagation (circle: chosen)", fontsize=10)
    else:
        epochs = np.arange(1, len(hist["train_loss"]) + 1)
        ax.plot(epochs, hist["train_loss"], label="train loss")
        if np.isfinite(hist.get("val_loss", [np.nan])).any():
            ax.plot(epochs, hist["val_loss"], label="validation loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        handles, labels = ax.get_legend_handles_labels()
        if "val_score" in hist:
            twin = ax.twinx()
            (line,) = twin.plot(epochs[: len(hist["val_score"])], hist["val_score"], color="C2", label="val Pearson r")
            twin.set_ylabel("validation mean Pearson r")
            handles, labels = [*handles, line], [*labels, line.get_label()]
        folds = getattr(model, "fold_best_epochs_", None)  # cross-fitted models: the curves are the first fold's
        best = folds[0] if folds else getattr(model, "best_epoch_", None)
        if best is not None:
            ax.axvline(best + 1, color="0.4", ls="--", lw=1)
            handles.append(ax.lines[-1])
            labels.append("kept weights")
        ax.legend(handles, labels, fontsize=8, frameon=False)
        ax.set_title(f"{type(model).__name__}: training{' (first cross-fitting fold)' if folds else ''}", fontsize=10)
    return finish(ax, show=show, save=save, name="history")
