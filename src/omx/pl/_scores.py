"""Distribution of per-gene scores, with the best and worst genes named."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes

import omx
from omx._docs import doc_params
from omx.pl._utils import axes_list, finish

_LABELS = {"pearson": "Pearson r", "spearman": "Spearman ρ", "mse": "mean squared error", "ccc": "Lin's CCC"}
_BEST, _WORST, _MEAN = "#2a7ab0", "#c8553d", "#222222"


def _scores_frame(scores: pd.DataFrame | AnnData, key: str, section: str | None) -> tuple[pd.DataFrame, str]:
    """The scores as one row per gene, and a note on where they come from for the title."""
    note = ""
    if isinstance(scores, AnnData):
        long = omx.get.scores(scores, key, section=section)
        sections = pd.unique(long["section"])
        scores = long.drop(columns=[c for c in ("section", "fold") if c in long]).groupby("gene", sort=False)
        scores = scores.mean(numeric_only=True)  # several held-out sections: each gene's score averaged
        note = f"section {sections[0]}" if len(sections) == 1 else f"mean over {len(sections)} sections"
    elif not isinstance(scores, pd.DataFrame):
        raise TypeError(f"`scores` must be a DataFrame (omx.metrics.gene_scores) or a table, got {type(scores)}.")
    elif section is not None:
        raise ValueError("`section` only applies when `scores` is a table; subset the DataFrame instead.")
    if "gene" in scores.columns:
        scores = scores.set_index("gene")
    return scores, note


def _split(values: pd.Series, n_label: int, higher_is_better: bool) -> tuple[pd.Series, pd.Series]:
    """Best and worst ``n_label`` genes, without overlap when there are few genes."""
    order = values.sort_values(ascending=not higher_is_better, kind="stable")
    n_best = min(n_label, (len(order) + 1) // 2)
    n_worst = min(n_label, len(order) - n_best)
    return order.iloc[:n_best], order.iloc[len(order) - n_worst :]


@doc_params()
def gene_scores(
    scores: pd.DataFrame | AnnData,
    *,
    metric: str = "pearson",
    key: str = "omx_pred",
    section: str | None = None,
    n_label: int = 5,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | PathLike | bool | None = None,
) -> list[Axes] | None:
    """Plot the distribution of a per-gene score and name the best and worst genes.

    A histogram of the score over the genes marks the mean; a bar chart beside it names the
    ``n_label`` best and worst genes. Genes with a NaN score (constant in the measured or predicted
    values) are left out and counted in the title.

    Parameters
    ----------
    scores
        The DataFrame returned by :func:`omx.metrics.gene_scores` (genes in the index or a ``"gene"``
        column), or a table with the scores that :func:`omx.tl.fit_predict` or :func:`omx.tl.cross_validate`
        store in ``uns["omx"][key]`` (per held-out section, each a dict of lists
        ``{"gene": [...], "pearson": [...], ...}``).
    metric
        The score to plot: ``"pearson"``, ``"spearman"``, ``"mse"`` or ``"ccc"`` (any numeric column works).
        Lower is better for ``"mse"``, higher for the others.
    key
        The entry of ``uns["omx"]`` to read when ``scores`` is a table.
    section
        The held-out section whose scores to plot when ``scores`` is a table. Omitted, and several sections
        were scored, each gene's score is averaged over them.
    n_label
        How many of the best and of the worst genes to name; 0 draws the histogram alone.
    ax
        One axes for the histogram (the best and worst genes are then listed inside it), or two axes for
        the histogram and the bar chart. Omitted, a new figure is made.
    {show}
    {save}

    Returns
    -------
    With ``show=False``, the axes drawn into: ``[histogram, bar chart]``, or ``[histogram]`` when one axes was
    given or ``n_label=0`` (the figure is ``axes[0].figure``); otherwise None.

    Examples
    --------
    >>> scores = omx.metrics.gene_scores(y_test, y_pred, genes)  # doctest: +SKIP
    >>> omx.pl.gene_scores(scores, metric="pearson")  # doctest: +SKIP
    """
    df, note = _scores_frame(scores, key, section)
    if metric not in df.columns:
        raise KeyError(f"No score {metric!r}; the scores have the columns {list(df.columns)}. Pass one as `metric=`.")
    if n_label < 0:
        raise ValueError(f"`n_label` must be 0 or more, got {n_label}.")
    values = pd.to_numeric(df[metric], errors="coerce").astype(float)
    values.index = values.index.astype(str)
    n_nan = int(values.isna().sum())
    values = values.dropna()
    if values.empty:
        raise ValueError(f"Every {metric!r} score is NaN (genes constant in the measured or predicted values).")
    higher_is_better = metric != "mse"
    label = _LABELS.get(metric, metric)

    if ax is None:
        bars = n_label > 0
        _, axes = plt.subplots(
            1,
            2 if bars else 1,
            figsize=(9.5 if bars else 5.5, 3.8),
            layout="constrained",
            squeeze=False,
            width_ratios=[1.5, 1] if bars else None,
        )
        ax_hist, ax_bar = axes[0, 0], (axes[0, 1] if bars else None)
    else:
        axs = axes_list(ax)
        if len(axs) not in (1, 2):
            raise ValueError(f"Pass one or two axes as `ax=`, got {len(axs)}.")
        ax_hist, ax_bar = axs[0], (axs[1] if len(axs) == 2 else None)

    mean = float(values.mean())
    n_bins = int(np.clip(np.sqrt(len(values)) * 1.5, 10, 50))
    ax_hist.hist(values, bins=n_bins, color="#9bb7d4", edgecolor="white", linewidth=0.5)
    ax_hist.axvline(mean, color=_MEAN, linestyle="--", linewidth=1.2, label=f"mean = {mean:.3f}")
    if metric in ("pearson", "spearman", "ccc"):
        ax_hist.axvline(0, color="#999999", linewidth=0.8, zorder=0)
    ax_hist.set_xlabel(label)
    ax_hist.set_ylabel("genes")
    details = ", ".join(filter(None, [f"{len(values)} genes", f"{n_nan} NaN left out" if n_nan else "", note]))
    ax_hist.set_title(f"{label} per gene ({details})", fontsize=10)
    ax_hist.legend(loc="upper left", fontsize=8, frameon=False)

    best, worst = _split(values, n_label, higher_is_better)
    if n_label and ax_bar is not None:
        names = list(best.index) + list(worst.index)
        heights = np.concatenate([best.to_numpy(), worst.to_numpy()])
        colors = [_BEST] * len(best) + [_WORST] * len(worst)
        y = np.arange(len(names))[::-1]
        ax_bar.barh(y, heights, color=colors, height=0.7)
        ax_bar.set_yticks(y, names, fontsize=8)
        ax_bar.axvline(mean, color=_MEAN, linestyle="--", linewidth=1)
        if metric in ("pearson", "spearman", "ccc"):
            ax_bar.axvline(0, color="#999999", linewidth=0.8)
        ax_bar.set_xlabel(label)
        ax_bar.set_title(f"{len(best)} best (blue) and {len(worst)} worst (red) genes", fontsize=10)
        ax_bar.tick_params(axis="y", length=0)
        for side in ("top", "right"):
            ax_bar.spines[side].set_visible(False)
    elif n_label:
        text = f"best: {', '.join(best.index)}\nworst: {', '.join(worst.index)}"
        ax_hist.set_ylim(top=ax_hist.get_ylim()[1] * 1.3)  # headroom so the list does not hide the bars
        ax_hist.text(
            0.99,
            0.98,
            text,
            transform=ax_hist.transAxes,
            ha="right",
            va="top",
            multialignment="left",
            fontsize=7,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "#cccccc"},
        )
    for side in ("top", "right"):
        ax_hist.spines[side].set_visible(False)
    return finish([a for a in (ax_hist, ax_bar) if a is not None], show=show, save=save, name="gene_scores")
