"""Observed against predicted expression over the tissue of one section."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from scipy import sparse
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._settings import warn
from omx._utils import as_list, check_counts, log_normalize, logger, resolve_table
from omx.metrics import pearson
from omx.pl._tissue import canvas, robust_norm
from omx.pl._utils import axes_list, finish
from omx.pp._spots import section_column

_PANEL_IN = 3.6


def _dense_columns(M, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``M[rows][:, cols]`` as a dense float64 array, for dense or sparse ``M``."""
    sub = M[rows][:, cols]
    sub = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)
    return sub.astype(np.float64, copy=False)


def _observed(table: AnnData, rows: np.ndarray, cols: np.ndarray, observed_layer: str | None) -> np.ndarray:
    """Observed values of genes ``cols`` for table rows ``rows``: ``observed_layer`` or log1p(CP10k) of X."""
    if observed_layer is not None:
        if observed_layer not in table.layers:
            raise KeyError(
                f"The table has no layer {observed_layer!r} (layers: {list(table.layers.keys())}). "
                "Pass one of them as `observed_layer=`, or None to log-normalise the counts in X."
            )
        return _dense_columns(table.layers[observed_layer], rows, cols)
    X = table.X[rows]
    check_counts(X, name="counts in table.X")
    data = X.data if sparse.issparse(X) else np.asarray(X)
    if data.size and not np.allclose(data, np.round(data)):
        warn("table.X does not hold integer counts; pass `observed_layer=` if it is already normalised.")
    return log_normalize(X, columns=cols).astype(np.float64)  # totals over all genes; plotted genes made dense


def _check_genes(table: AnnData, genes: list[str]) -> np.ndarray:
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        names = list(map(str, table.var_names))
        hints = {g: difflib.get_close_matches(g, names, n=3) for g in missing}
        hints = {g: h for g, h in hints.items() if h}
        hint = f" Close matches: {hints}." if hints else ""
        hint += f" Its genes include {names[:5]}{' ...' if len(names) > 5 else ''}."
        raise KeyError(f"Gene(s) {missing} are not in the table ({table.n_vars} genes).{hint}")
    return table.var_names.get_indexer(genes)


def _pick_section(values: np.ndarray, has_pred: np.ndarray, section: str | None, source: str, column: str) -> str:
    """The section to draw: ``section``, or the one section with values; ``source`` names where they are.

    ``source`` starts a sentence in the messages, e.g. ``"Layer 'omx_pred'"``.
    """
    all_sections = sorted({str(s) for s in values})
    predicted = sorted({str(s) for s in values[has_pred]})
    if section is None:
        if len(predicted) == 1:
            return predicted[0]
        if not predicted:
            raise ValueError(
                f"{source} holds no predictions (all NaN) for these genes; were they among the modelled "
                "genes (see table.uns['omx'][key]['genes'])?"
            )
        raise ValueError(f"Ambiguous section: {source} holds predictions for {predicted}. Pass `section=`.")
    section = str(section)
    if section not in all_sections:
        raise KeyError(f"There is no section {section!r} in table.obs[{column!r}]. Sections: {all_sections}.")
    if section not in predicted:
        raise ValueError(
            f"{source} holds no predictions for section {section!r} (all NaN); it has predictions for "
            f"{predicted}. Predict that section first (omx.tl.fit_predict(..., predict=[{section!r}]))."
        )
    return section


def _layout(n_genes: int, ncols: int, aspect: float) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, n_genes))
    nrows = math.ceil(n_genes / ncols)
    panel_h = min(max(_PANEL_IN * aspect, 1.5), 2.5 * _PANEL_IN) + 0.45
    fig = plt.figure(figsize=(ncols * (2 * _PANEL_IN + 0.9), nrows * panel_h + 0.4), layout="constrained")
    grid = fig.subplots(nrows, 2 * ncols, squeeze=False)
    axes = list(grid.ravel())
    for extra in axes[2 * n_genes :]:
        extra.remove()
    return fig, axes[: 2 * n_genes]


@doc_params()
def expression(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    table_key: str | None = None,
    section_key: str = "section",
    section: str | None = None,
    layer: str = "omx_pred",
    image_key: str | None = None,
    shapes_key: str | None = None,
    observed_layer: str | None = None,
    ncols: int = 1,
    cmap: str | Colormap = "viridis",
    spot_size: float | None = None,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | PathLike | bool | None = None,
) -> list[Axes] | None:
    """Plot observed and predicted expression side by side over the H&E of one section.

    For each gene, two panels show the spots of the section as circles of their true size over a
    low-resolution copy of the image: the observed expression on the left, the prediction on the right.
    Both panels of a gene share one colour scale (the 1st to 99th percentile of the observed and
    predicted values together) and one colourbar, so that a prediction that is too flat looks flat. The
    title gives the Pearson correlation between the two over the spots drawn.

    Parameters
    ----------
    sdata
        The SpatialData object, with the predictions in a layer of the table (see
        :func:`omx.tl.fit_predict`).
    genes
        One gene name or a list of them.
    {table_key}
    {section_key_pl}
    {section_pl}
    layer
        The table layer with the predictions. Rows that are NaN (spots of sections that were not
        predicted) are skipped.
    {image_key}
    shapes_key
        The spots of the section; omitted, the shapes element the table annotates for these rows.
    observed_layer
        Table layer with the observed values on the scale of the predictions. Omitted, the counts in
        ``table.X`` are log-normalised as ``log1p(counts / total * 1e4)``, with the total over all genes,
        the usual target of omx models.
    ncols
        Genes per row of the figure (each gene takes two panels).
    cmap
        Colour map of the expression.
    spot_size
        Spot diameter in the units of the plot (microns when the coordinate system is in microns),
        overriding the true size.
    ax
        ``2 * len(genes)`` axes to draw into, observed and predicted for each gene in turn. Omitted, a new
        figure is made.
    {show}
    {save}

    Returns
    -------
    With ``show=False``, the ``2 * len(genes)`` panel axes (observed and predicted for each gene in turn; the
    figure is ``axes[0].figure``); otherwise None.

    Examples
    --------
    >>> omx.tl.fit_predict(sdata, train=["C2", "C3"], predict=["C4"])  # doctest: +SKIP
    >>> omx.pl.expression(sdata, ["GNAS", "SCD"], section="C4")  # doctest: +SKIP
    """
    genes = as_list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    table_key, table = resolve_table(sdata, table_key)
    cols = _check_genes(table, genes)
    if layer not in table.layers:
        raise KeyError(
            f"The table {table_key!r} has no layer {layer!r} (layers: {list(table.layers.keys())}). "
            "omx.tl.fit_predict (or omx.tl.predict_expression) writes the predictions to "
            "table.layers['omx_pred']; run it first, or pass the layer that holds them as `layer=`."
        )
    if ncols < 1:
        raise ValueError(f"`ncols` must be at least 1, got {ncols}.")
    ax = axes_list(ax)
    if ax is not None:
        if len(ax) != 2 * len(genes):
            n = 2 * len(genes)
            raise ValueError(f"Pass {n} axes as `ax=` (observed and predicted for each gene), got {len(ax)}.")

    column = section_column(table, section_key)
    section_values = table.obs[column].astype(str).to_numpy()
    pred_all = _dense_columns(table.layers[layer], np.arange(table.n_obs), cols)
    has_pred = ~np.isnan(pred_all).all(axis=1)
    section = _pick_section(section_values, has_pred, section, f"Layer {layer!r}", column)
    frame = canvas(
        sdata,
        table_key,
        (section_values == section) & has_pred,
        what=f"predicted spots of section {section!r}",
        image_key=image_key,
        shapes_key=shapes_key,
        spot_size=spot_size,
    )
    rows = frame.rows
    predicted = pred_all[rows]
    if unpredicted := [g for g, empty in zip(genes, np.isnan(predicted).all(axis=0), strict=True) if empty]:
        raise ValueError(
            f"Layer {layer!r} holds no predictions for {unpredicted} in section {section!r} (all NaN): they were "
            "not among the modelled genes (see table.uns['omx'][key]['genes'])."
        )
    observed = _observed(table, rows, cols, observed_layer)

    made_figure = ax is None
    if made_figure:
        fig, ax = _layout(len(genes), ncols, frame.aspect)
    else:
        fig = ax[0].figure
    cmap = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    cbar_label = observed_layer if observed_layer is not None else "log1p(CP10k)"

    for j, gene in enumerate(genes):
        ok = np.isfinite(observed[:, j]) & np.isfinite(predicted[:, j])
        obs_j, pred_j = observed[ok, j], predicted[ok, j]
        norm = robust_norm(obs_j, pred_j)
        r = pearson(obs_j, pred_j) if ok.sum() > 1 else float("nan")
        pair = ax[2 * j : 2 * j + 2]
        for a, values, what in ((pair[0], obs_j, "observed"), (pair[1], pred_j, "predicted")):
            frame.draw(a, values, ok, cmap=cmap, norm=norm)
            title = f"{gene}, {what}" if what == "observed" else f"{gene}, predicted (r = {r:.2f})"
            a.set_title(title, fontsize=10)
        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(pair), shrink=0.85, pad=0.02, aspect=25)
        cbar.set_label(cbar_label, fontsize=8)
        cbar.ax.tick_params(labelsize=8)
    if made_figure:
        fig.suptitle(f"Section {section}: observed vs predicted ({layer!r}), {len(rows)} spots", fontsize=11)
    logger.debug("Plotted %d genes over %d spots of section %r.", len(genes), len(rows), section)
    return finish(list(ax), show=show, save=save, name="expression")
