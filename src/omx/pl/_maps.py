"""Cell-type proportions and prediction uncertainty over the tissue of one section."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key
from omx._utils import as_list, resolve_table
from omx.pl._expression import _check_genes, _dense_columns, _observed, _pick_section
from omx.pl._tissue import canvas, robust_norm
from omx.pl._utils import axes_list, finish
from omx.pp._spots import section_column

_PANEL_IN = 3.2


def _grid(n: int, ncols: int, aspect: float, axes) -> tuple[Figure, list]:
    axes = axes_list(axes)
    if axes is not None:
        if len(axes) != n:
            raise ValueError(f"Pass {n} axes as `ax=`, got {len(axes)}.")
        return axes[0].figure, axes
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    height = min(max(_PANEL_IN * aspect, 1.5), 2.5 * _PANEL_IN) + 0.5
    fig = plt.figure(figsize=(ncols * (_PANEL_IN + 0.6), nrows * height + 0.4), layout="constrained")
    grid = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for extra in grid[n:]:
        extra.remove()
    return fig, grid[:n]


@doc_params()
def cell_types(
    sdata: SpatialData,
    *,
    key: str = "omx_proportions",
    table_key: str | None = None,
    section_key: str = "section",
    section: str | None = None,
    cell_types: Sequence[str] | None = None,
    cells_key: str | None = "omx_cells",
    image_key: str | None = None,
    shapes_key: str | None = None,
    intervals: bool | None = None,
    ncols: int = 4,
    cmap: str = "magma",
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | PathLike | bool | None = None,
) -> list[Axes] | None:
    """Plot cell-type proportions per spot over the H&E of one section, and how sure they are.

    The first panel colours each spot by its most abundant cell type; when the nuclei of the section's image
    have cell types (:func:`omx.tl.assign_cells`), the next panel draws every nucleus in its type's colour. One
    panel per cell type follows with its proportion, all on one colour scale from 0 to the largest proportion
    drawn. With credible intervals (:func:`omx.tl.deconvolve` writes them beside the proportions), each type's
    panel is followed by the width of its 90 % interval, on a scale of its own: where it is wide, the proportion
    is uncertain.

    Parameters
    ----------
    {sdata}
    key
        ``table.obsm`` entry with the proportions, a DataFrame with one column per cell type (e.g.
        ``"omx_proportions"`` written by omx, or ``"stereoscope_major"`` of the her2st data).
    {table_key}
    {section_key_pl}
    {section_pl}
    cell_types
        Cell types to draw a panel for; all when omitted.
    intervals
        Draw the width of the 90 % credible interval (``obsm[key + "_q95"]`` minus ``obsm[key + "_q05"]``) after each
        type's proportion; None draws them when the table holds them.
    cells_key
        Table of nuclei with ``obs["cell_type"]`` (written by :func:`omx.tl.assign_cells`); its panel is drawn
        when it holds nuclei of this section's image. None leaves it out.
    {image_key}
    shapes_key
        The spots of the section; omitted, the shapes element the table annotates for these rows.
    ncols
        Panels per row.
    cmap
        Colour map of the proportions.
    ax
        As many axes as panels (``1 + len(cell_types)``, or ``1 + 2 * len(cell_types)`` with intervals, plus one
        for the nuclei when they are drawn) to draw into; a new figure when omitted.
    {show}
    {save}

    Returns
    -------
    With ``show=False``, the panel axes in drawing order (most abundant type, nuclei when drawn, then one per
    cell type, or two with intervals: proportion, interval width; the figure is ``axes[0].figure``); otherwise
    None.
    """
    table_key, table = resolve_table(sdata, table_key)
    if key not in table.obsm:
        raise KeyError(
            f"table.obsm has no {key!r} (entries: {list(table.obsm.keys())}). Pass the key of a DataFrame of "
            "proportions (one column per cell type) as `key=`."
        )
    props = table.obsm[key]
    props = props if isinstance(props, pd.DataFrame) else pd.DataFrame(np.asarray(props), index=table.obs_names)
    props.columns = props.columns.astype(str)
    types = list(props.columns) if cell_types is None else as_list(cell_types)
    if missing := [t for t in types if t not in props.columns]:
        raise KeyError(f"Cell types {missing} are not columns of table.obsm[{key!r}]: {list(props.columns)}.")
    values = props.to_numpy(dtype=np.float64)
    bounds = list(Key.quantiles(key))
    has_bounds = all(b in table.obsm for b in bounds)
    if intervals and not has_bounds:
        raise KeyError(
            f"intervals=True needs table.obsm {bounds} (written by omx.tl.deconvolve beside {key!r}); the table has "
            f"{list(table.obsm.keys())}."
        )
    intervals = has_bounds if intervals is None else bool(intervals)
    column = section_column(table, section_key)
    sections = table.obs[column].astype(str).to_numpy()
    has = np.isfinite(values).all(axis=1)
    section = _pick_section(sections, has, section, f"table.obsm[{key!r}]", column)
    frame = canvas(
        sdata, table_key, (sections == section) & has, what=f"spots of section {section!r} with proportions",
        image_key=image_key, shapes_key=shapes_key,
    )  # fmt: skip
    P = values[frame.rows]
    nuclei = _typed_nuclei(sdata, cells_key, frame.image_key)
    n_first = 2 if nuclei is not None else 1
    per_type = 2 if intervals else 1
    fig, axes = _grid(n_first + per_type * len(types), ncols, frame.aspect, ax)

    palette = plt.get_cmap("tab20" if len(props.columns) > 10 else "tab10")
    colours = ListedColormap([palette(i % palette.N) for i in range(len(props.columns))])
    dominant = np.argmax(P, axis=1)
    frame.draw(axes[0], dominant, cmap=colours, norm=BoundaryNorm(np.arange(len(props.columns) + 1) - 0.5, colours.N))
    axes[0].set_title("most abundant type", fontsize=10)
    present = set(np.unique(dominant).tolist())
    if nuclei is not None:
        present |= {list(props.columns).index(t) for t in set(nuclei[2]) if t in props.columns}
    present = sorted(present)
    axes[0].legend(
        handles=[Patch(color=colours(i), label=props.columns[i]) for i in present],
        fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
    )  # fmt: skip
    if nuclei is not None:
        xy, radius, labels = nuclei
        code = np.array([list(props.columns).index(t) if t in props.columns else -1 for t in labels])
        nuclei_frame = replace(frame, rows=np.arange(len(xy)), xy=xy, radius=radius)
        known = code >= 0
        frame_norm = BoundaryNorm(np.arange(len(props.columns) + 1) - 0.5, colours.N)
        nuclei_frame.draw(axes[1], code[known], known, cmap=colours, norm=frame_norm)
        axes[1].set_title(f"nuclei by type ({int(known.sum())})", fontsize=10)
    idx = [list(props.columns).index(t) for t in types]
    norm = Normalize(0.0, float(np.nanmax(P[:, idx])) if len(idx) else 1.0)
    prop_axes = axes[n_first::per_type]
    for a, t, i in zip(prop_axes, types, idx, strict=True):
        frame.draw(a, P[:, i], cmap=cmap, norm=norm)
        a.set_title(t, fontsize=10)
    if intervals:
        lo, hi = (table.obsm[b][props.columns].to_numpy(dtype=np.float64)[frame.rows] for b in bounds)
        width = hi - lo
        width_norm = Normalize(0.0, max(float(np.nanmax(width[:, idx])) if len(idx) else 1.0, 1e-6))
        for a, t, i in zip(axes[n_first + 1 :: per_type], types, idx, strict=True):
            frame.draw(a, width[:, i], cmap="viridis", norm=width_norm)
            a.set_title(f"{t}: 90 % interval width", fontsize=9)
        fig.colorbar(ScalarMappable(norm=width_norm, cmap="viridis"), ax=axes, shrink=0.6, label="90 % interval width")
    if types:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes if intervals else prop_axes, shrink=0.6,
                     label="proportion")  # fmt: skip
    if ax is None:
        fig.suptitle(f"Section {section}: cell-type proportions ({key!r}), {len(frame.rows)} spots", fontsize=11)
    return finish(list(axes), show=show, save=save, name="cell_types")


def _typed_nuclei(sdata: SpatialData, cells_key: str | None, image_key: str):
    """``(centres, radii, cell types)`` in microns of the typed nuclei of ``image_key``, or None."""
    from omx.pp import resolve_spots

    shapes_key = f"{image_key}_nuclei_shapes"
    if cells_key is None or cells_key not in sdata.tables or shapes_key not in sdata.shapes:
        return None
    if "cell_type" not in sdata.tables[cells_key].obs:
        return None
    nuclei = resolve_spots(sdata, image_key=image_key, shapes_key=shapes_key, table_key=cells_key)
    nuclei = nuclei.subset(nuclei.table_rows >= 0)
    labels = sdata.tables[cells_key].obs["cell_type"].astype(str).to_numpy()[nuclei.table_rows]
    return nuclei.centers * nuclei.mpp, nuclei.radius_px * nuclei.mpp, labels


@doc_params()
def uncertainty(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    layer: str = "omx_pred",
    var_layer: str | None = None,
    table_key: str | None = None,
    section_key: str = "section",
    section: str | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    cmap: str = "viridis",
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | PathLike | bool | None = None,
) -> list[Axes] | None:
    """Plot predictions next to their uncertainty, and their error where expression was measured.

    For each gene: the prediction, its predictive standard deviation (the square root of ``var_layer``) and,
    when the table holds counts for the section, the absolute error against the observed log-normalised
    expression. Where the model is uncertain, its errors should be large.

    Parameters
    ----------
    {sdata}
    genes
        One gene or a list of them.
    layer
        Table layer with the predictions.
    var_layer
        Table layer with the predictive variance; ``layer + "_var"`` when omitted.
    {table_key}
    {section_key_pl}
    {section_pl}
    {image_key}
    shapes_key
        The spots of the section; omitted, the shapes element the table annotates for these rows.
    cmap
        Colour map.
    ax
        ``3 * len(genes)`` axes to draw into (``2 * len(genes)`` when the section has no counts); a new figure
        when omitted.
    {show}
    {save}

    Returns
    -------
    With ``show=False``, the panel axes (prediction, SD and, with counts, the error for each gene in turn; the
    figure is ``axes[0].figure``); otherwise None.
    """
    genes = as_list(genes)
    table_key, table = resolve_table(sdata, table_key)
    var_layer = f"{layer}_var" if var_layer is None else var_layer
    for name, what in ((layer, "predictions"), (var_layer, "predictive variances")):
        if name not in table.layers:
            raise KeyError(
                f"The table has no layer {name!r} for the {what} (layers: {list(table.layers.keys())}). Models "
                "with a count likelihood write `key_added` and `key_added + '_var'`."
            )
    cols = _check_genes(table, genes)
    column = section_column(table, section_key)
    sections = table.obs[column].astype(str).to_numpy()
    pred_all = _dense_columns(table.layers[layer], np.arange(table.n_obs), cols)
    has = ~np.isnan(pred_all).all(axis=1)
    section = _pick_section(sections, has, section, f"Layer {layer!r}", column)
    frame = canvas(
        sdata, table_key, (sections == section) & has, what=f"predicted spots of section {section!r}",
        image_key=image_key, shapes_key=shapes_key,
    )  # fmt: skip
    pred = pred_all[frame.rows]
    sd = np.sqrt(np.clip(_dense_columns(table.layers[var_layer], frame.rows, cols), 0, None))
    try:
        error = np.abs(_observed(table, frame.rows, cols, None) - pred)
    except (ValueError, TypeError):  # no counts for this section
        error = None
    per_gene = 3 if error is not None else 2
    fig, axes = _grid(per_gene * len(genes), per_gene, frame.aspect, ax)
    for j, gene in enumerate(genes):
        panels = [(pred[:, j], f"{gene}, predicted", robust_norm(pred[:, j]))]
        spread = robust_norm(sd[:, j], *(() if error is None else (error[:, j],)))
        panels.append((sd[:, j], f"{gene}, predictive SD", spread))
        if error is not None:
            r = np.corrcoef(sd[:, j], error[:, j])[0, 1] if len(sd) > 2 else np.nan
            panels.append((error[:, j], f"{gene}, |error| (r with SD = {r:.2f})", spread))
        for k, (values, title, norm) in enumerate(panels):
            a = axes[per_gene * j + k]
            ok = np.isfinite(values)
            frame.draw(a, values[ok], ok, cmap=cmap, norm=norm)
            a.set_title(title, fontsize=9)
            fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=a, shrink=0.7)
    if ax is None:
        fig.suptitle(f"Section {section}: prediction and uncertainty ({layer!r}, {var_layer!r})", fontsize=11)
    return finish(list(axes), show=show, save=save, name="uncertainty")
