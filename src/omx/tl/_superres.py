"""Super-resolution: expression of units finer than the measured spots (bins, nuclei), trained from the spots alone.

The model is linear in the image features of the fine units, and each spot's inputs are the mean features of the
fine units inside it, standardised with the fine units' own statistics. So the mean of the fine predictions over a
spot's footprint is exactly the prediction the model was fitted to match to that spot's measured expression, as
iStar trains its super-pixel predictions (Zhang et al., Nat Biotechnol 2024), with a closed-form ridge in place of
a neural network. The fitted model is an ordinary `omx.models.Ridge`: `omx.tl.predict_expression` applies it to
any grid or nuclei of another slide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key, add_table, check_free_elements
from omx._utils import as_list, logger, resolve_table
from omx.models import Context
from omx.pp import Spots, resolve_spots
from omx.pp._spots import geometries_in_pixels, to_pixels
from omx.pp._stream import patch_settings
from omx.tl._engine import (
    Moments,
    Section,
    counts,
    fit_sections,
    make_model,
    predict_section,
    prediction_entry,
    prediction_table,
    resolve_sections,
    section_inputs,
    targets,
)

if TYPE_CHECKING:
    from omx.models import Model

#: Fine units per spot diameter of the default bins (a 55 um Visium spot: 13.75 um bins; a 100 um ST spot: 25 um).
BINS_PER_DIAMETER = 4
#: Predicted sections' default bins cover the tissue within this many spot pitches of a spot centre.
REACH_PITCHES = 0.75


@doc_params()
def super_resolve(
    sdata: SpatialData,
    *,
    train: str | Sequence[str],
    predict: str | Sequence[str],
    fine: str | Mapping[str, str] | None = None,
    bin_um: float | None = None,
    model: str | Model = "ridge",
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    table_key: str | None = None,
    section_key: str = "section",
    layer: str | None = None,
    image_key: str | None = None,
    mpp: float | None = None,
    size_um: float | None = None,
    context: Sequence[float] | None = None,
    anchor: bool = True,
    target_norm: str = "section",
    min_counts: int = 10,
    key_added: str = Key.SUPERRES,
    overwrite: bool = False,
    seed: int = 0,
    device: str = "auto",
    show_progress_bar: bool = True,
) -> Model:
    """Predict expression at a finer scale than the spots (bins of a few microns, or nuclei), trained on spots alone.

    Each training spot is covered by fine units (square bins of ``bin_um``, or the units given in ``fine``). The
    model maps the image features of one fine unit to its expression; it is fitted so that the mean of its
    predictions over the units inside a spot matches that spot's measured expression, and it is linear in the
    features, so this holds exactly (as iStar trains super-pixels from spots). It then predicts every fine unit of
    the ``predict`` sections from the image alone. Where a predicted section has measured spots (super-resolving
    a measured section) and ``anchor`` is True, each unit also gets the smoothly interpolated residual of the
    nearby spots (measured minus the mean prediction of their units), so that the map keeps the measured spot
    values at the coarse scale and adds the image's detail within and between spots.

    Parameters
    ----------
    sdata
        SpatialData with H&E images, spots and a table of raw counts.
    train
        Sections whose spots train the model: values of ``table.obs[section_key]``.
    predict
        Sections to super-resolve: values of ``table.obs[section_key]`` (measured sections; they may also be
        training sections, as a measured section's fine-scale truth is never seen), or the name of a shapes
        element of fine units without measurement (e.g. a grid from :func:`omx.pp.tile_grid`, or nuclei from
        :func:`omx.pp.segment_nuclei`), predicted from the image alone.
    fine
        The fine units of each section: a shapes element name, or ``{section: shapes element}``. Sections without
        one get square bins of ``bin_um`` (training sections: bins whose centre lies inside a spot, never written;
        predicted sections: bins over the spots' area, written as shapes ``"<spots>_bins_<bin_um>um"``).
    bin_um
        Side of the default square bins in microns; default a quarter of the spot diameter.
    model
        ``"ridge"``, or an `omx.models.Ridge` with any encoder (e.g. ``Ridge(encoder="uni")``), unfitted. The
        model must be linear in its features for the fine predictions to average to the spot's.
    {genes}
    {n_top_genes}
    table_key
        The table with the spots' counts; may be omitted when there is one.
    {section_key}
    {layer}
    {image_key}
    {mpp}
    size_um
        Patch size of a fine unit in microns; default the unit's diameter (bins: ``bin_um``), or the encoder's
        native field of view for foundation encoders.
    context
        Multiples of ``size_um`` cut around each unit and encoded together (default: 1, 2 and 3 for handcrafted
        features, so each unit sees its neighbourhood; 1 for foundation encoders).
    anchor
        For predicted sections with measured spots, add the interpolated spot residuals (see above).
    {target_norm}
    {min_counts}
    key_added
        Name of the new table of fine-unit predictions (and of its ``uns['omx']`` entry).
    {overwrite}
    {seed}
    {device}
    {show_progress_bar}

    Returns
    -------
    The fitted `omx.models.Ridge` (its ``meta_["superres"]`` records the fine units' size). Writes a new table
    ``sdata.tables[key_added]`` annotating the fine units of the predicted sections: predictions on the scale
    log1p(counts / total x 1e4) in ``X``, ``obs["section"]``, ``obs["omx_spot"]`` (the measured spot a unit lies
    in, where there is one), ``obsm["spatial"]`` (centres in microns) and ``uns['omx'][key_added]`` (the call's
    parameters, the model, the genes, ``anchored`` sections). The spot table is never changed. Default bins of
    predicted sections are added as shapes elements. When the fine units are nuclei of
    :func:`omx.pp.segment_nuclei` (its shapes ``"<image>_nuclei_shapes"``), the predictions go to the nuclei table
    ``sdata.tables["omx_cells"]`` instead: genes in its ``X`` (NaN for nuclei of other images), its morphology
    columns kept, the entry in its ``uns['omx'][key_added]``.
    """
    from omx.models import Ridge

    train, predict = as_list(train), as_list(predict)
    if not train or not predict:
        raise ValueError("Pass at least one section in `train=` and one in `predict=`.")
    table_key, table = resolve_table(sdata, table_key)
    names = list(dict.fromkeys([*train, *predict]))
    sections = resolve_sections(
        sdata, names, table_key=table_key, section_key=section_key, image_key=image_key, mpp=mpp, role="a"
    )
    for name in train:
        if not sections[name].measured:
            raise ValueError(f"Training section {name!r} has no measured expression in table {table_key!r}.")
    model = make_model(model, seed=seed, device=device, show_progress_bar=show_progress_bar)
    if not isinstance(model, Ridge):
        raise TypeError(
            f"super_resolve fits models that are linear in their features, so that the fine predictions average "
            f"exactly to each spot's; got {type(model).__name__}. Pass model='ridge' or an omx.models.Ridge with the "
            "encoder you want (e.g. Ridge(encoder='uni'))."
        )
    if model.standardize != "group":
        model = model.clone(standardize="group")
    fine = _fine_keys(fine, names, sections)
    diameter = float(np.median([sections[n].spots.diameter_um for n in train]))
    if bin_um is None:
        bin_um = diameter / BINS_PER_DIAMETER
    if not np.isfinite(bin_um) or bin_um <= 0:
        raise ValueError(f"bin_um must be a positive number of microns, got {bin_um}.")

    # the fine units of every section, and which spot each lies in
    written_bins: dict[str, tuple[str, object]] = {}
    units: dict[str, Spots] = {}
    for name in names:
        spots = sections[name].spots
        if name in fine:
            units[name] = _units_of(sdata, fine[name], spots.image_key, mpp)
        elif sections[name].measured:
            inside = name in train and name not in predict
            reach = spots.radius_px if inside else np.maximum(spots.radius_px, REACH_PITCHES * _pitch_px(spots))
            key = Key.bins(spots.shapes_key, bin_um)
            units[name], shapes = _square_bins(spots, bin_um, reach, key)
            if name in predict:
                written_bins[name] = (key, shapes)
        else:  # an H&E-only shapes element: its own shapes are the fine units
            units[name] = spots
    cells = _cells_table(sdata, [units[n].shapes_key for n in predict])
    if cells is None:
        check_free_elements(
            sdata, overwrite=overwrite, tables=[key_added], shapes=[k for k, _ in written_bins.values()]
        )
    elif sdata.tables[cells].n_vars and not overwrite:
        raise KeyError(
            f"sdata.tables[{cells!r}] already holds expression of its nuclei; pass `overwrite=True` to replace it."
        )
    fine_diameter = float(np.median([units[n].diameter_um for n in names]))
    size_um, context = patch_settings(model.encoder, fine_diameter, size_um, context)

    # features of the fine units, their statistics per section, and each spot's mean over its units
    # (predicted sections only: streamed at prediction, never held in memory; a feature store keeps them too)
    feats, stats, member, cache = {}, {}, {}, {}
    fine_sections = {n: Section(name=f"{n} (fine)", spots=units[n]) for n in names}
    for name in names:
        if sections[name].measured:
            member[name] = membership(sdata, sections[name].spots, units[name].centers)
        if name in train:
            feats[name] = section_inputs(fine_sections[name], model, size_um, context, show_progress_bar, cache)
            moments = Moments()
            moments.add(feats[name])
            stats[name] = moments.result()
    fit_on, inputs = {}, {}
    for name in train:
        M = member[name]
        has = np.asarray(M.sum(axis=1)).ravel() > 0
        if not has.any():
            raise ValueError(
                f"No fine unit of section {name!r} lies inside its spots; pass smaller `bin_um=` or other `fine=` "
                "units for it."
            )
        if (~has).any():
            logger.info("%s: %d of %d spots hold no fine unit and are left out.", name, int((~has).sum()), len(has))
        fit_on[name] = replace(sections[name], spots=sections[name].spots.subset(has))
        inputs[name] = _mean_rows(M[has]) @ feats[name]
    model, _ = fit_sections(
        sdata, fit_on, train, model, table_key=table_key, genes=genes, n_top_genes=n_top_genes, layer=layer,
        min_counts=min_counts, target_norm=target_norm, size_um=size_um, context=context,
        show_progress_bar=show_progress_bar, inputs=inputs, group_stats={n: stats[n] for n in train},
    )  # fmt: skip
    slopes = None
    if anchor and any(n in member for n in predict):
        slopes = _slopes(
            model, table, fit_on, train, inputs, stats, model.meta_["genes"], layer, min_counts, target_norm
        )
    meta = model.meta_
    meta["superres"] = {"unit_diameter_um": fine_diameter, "bin_um": float(bin_um), "spot_diameter_um": diameter}
    genes = meta["genes"]

    preds, anchored, spot_of = [], [], {}
    for name in predict:
        # training sections' units from this call's memory, the others streamed
        held = cache if name in train else None
        pred = predict_section(model, fine_sections[name], show_progress_bar=show_progress_bar, cache=held)
        if name in member:
            M = member[name]
            spot_of[name] = _first_spot(M, sections[name].spots.index)
            if anchor:
                pred = _anchored(table, sections[name], M, units[name], pred, slopes, genes, layer, min_counts)
                anchored.append(name)
        np.maximum(pred, 0, out=pred)
        preds.append(pred.astype(np.float32))
    for key, shapes in written_bins.values():
        sdata.shapes[key] = shapes
        logger.info("Added %d bins of %g um to sdata.shapes[%r].", len(shapes), bin_um, key)
    params = {
        "train": train, "predict": predict, "fine": fine, "bin_um": bin_um, "genes": genes, "n_top_genes": n_top_genes,
        "table_key": table_key, "section_key": section_key, "layer": layer, "mpp": mpp, "size_um": size_um,
        "context": context, "anchor": anchor, "target_norm": target_norm, "min_counts": min_counts, "seed": seed,
    }  # fmt: skip
    entry = prediction_entry("super_resolve", model, params)
    entry["anchored"] = anchored
    out_sections = [Section(name=n, spots=units[n]) for n in predict]
    new = prediction_table(out_sections, genes, preds, key_added=key_added, uns=entry)
    spot = np.concatenate([spot_of.get(n, np.full(units[n].n_spots, None, dtype=object)) for n in predict])
    new.obs[Key.SPOT] = pd.array(spot, dtype="string")
    if cells is not None:
        _fill_cells(sdata, cells, new, key_added, entry)
    else:
        add_table(sdata, key_added, new, overwrite=overwrite, what="super-resolved predictions")
    return model


def _cells_table(sdata: SpatialData, shapes_keys: list[str]) -> str | None:
    """The nuclei table (``Key.CELLS``) when every predicted unit is a nucleus it annotates, else None."""
    from omx.pp._spots import table_regions

    table = sdata.tables.get(Key.CELLS)
    if table is None or table.uns.get(Key.TABLE_MARK) != "cells":
        return None
    return Key.CELLS if set(shapes_keys) <= set(table_regions(table)[0]) else None


def _fill_cells(sdata: SpatialData, cells_key: str, new, key_added: str, entry: dict) -> None:
    """Write per-nucleus predictions into the nuclei table: genes in ``X`` (NaN for nuclei not predicted).

    The nuclei's rows, ``obs`` (morphology), ``obsm`` and earlier ``uns`` entries stay as they are.
    """
    import anndata as ad
    from spatialdata.models import TableModel

    from omx.pp._spots import table_regions

    cells = sdata.tables[cells_key]
    regions, region_key, instance_key = table_regions(cells)
    row_of = pd.Series(np.arange(cells.n_obs), index=pd.MultiIndex.from_arrays(
        [cells.obs[region_key].astype(str).to_numpy(), cells.obs[instance_key].astype(str).to_numpy()]
    ))  # fmt: skip
    rows = row_of.reindex(
        pd.MultiIndex.from_arrays([new.obs["region"].astype(str).to_numpy(), new.obs["spot_id"].astype(str).to_numpy()])
    ).to_numpy()
    X = np.full((cells.n_obs, new.n_vars), np.nan, dtype=np.float32)
    X[rows.astype(int)] = new.X
    uns = {k: v for k, v in cells.uns.items() if k != "spatialdata_attrs"}
    uns[Key.UNS] = {**uns.get(Key.UNS, {}), key_added: {**new.uns[Key.UNS][key_added], "written": ["X"]}}
    filled = ad.AnnData(X=X, obs=cells.obs.copy(), var=new.var.copy(), obsm=dict(cells.obsm), uns=uns)
    filled = TableModel.parse(filled, region=regions, region_key=region_key, instance_key=instance_key)
    add_table(sdata, cells_key, filled, overwrite=True, what="nuclei with their super-resolved expression")


def _fine_keys(fine, names: list[str], sections: dict[str, Section]) -> dict[str, str]:
    """``{section: shapes key}`` of the fine units given."""
    if fine is None:
        return {}
    if isinstance(fine, str):
        measured = [n for n in names if sections[n].measured]
        if len(measured) != 1:
            raise ValueError(
                f"`fine={fine!r}` names one shapes element, but {len(measured)} measured sections are in play "
                f"({measured}); pass `fine={{section: shapes key}}`."
            )
        return {measured[0]: fine}
    unknown = sorted(set(fine) - set(names))
    if unknown:
        raise KeyError(f"`fine` names sections {unknown} that are neither in `train` nor in `predict` ({names}).")
    return dict(fine)


def _units_of(sdata: SpatialData, shapes_key: str, image_key: str, mpp: float | None) -> Spots:
    """The fine units of a shapes element, placed in the pixels of the section's image (no table rows)."""
    if shapes_key not in sdata.shapes:
        raise KeyError(f"Fine units {shapes_key!r} are not a shapes element; shapes: {list(sdata.shapes.keys())}.")
    units = resolve_spots(sdata, image_key=image_key, shapes_key=shapes_key, mpp=mpp)
    return replace(units, table_key=None, table_rows=np.full(units.n_spots, -1))


def _pitch_px(spots: Spots) -> float:
    """Median distance from a spot to its nearest neighbour, in pixels (twice the diameter for a lone spot)."""
    from scipy.spatial import cKDTree

    if spots.n_spots < 2:
        return float(4 * np.median(spots.radius_px))
    d, _ = cKDTree(spots.centers).query(spots.centers, k=2)
    return float(np.median(d[:, 1]))


def _square_bins(spots: Spots, bin_um: float, reach_px: np.ndarray, key: str):
    """Square bins of ``bin_um`` whose centres lie within ``reach_px`` of a spot centre: ``(units, shapes)``.

    The bins are those of `omx.pp.tile_grid`'s square lattice (anchored at the image's origin); ``shapes`` is
    their shapes element in the image's pixels with the image's transformations, ready to add to the SpatialData.
    """
    import shapely

    from omx.pp._tissue import grid_shapes, lattice

    side = bin_um / spots.mpp
    if side < 1:
        raise ValueError(
            f"bin_um={bin_um} is below one pixel of the image ({spots.mpp:.3g} um per pixel); pass a larger bin_um."
        )
    reach_px = np.broadcast_to(np.asarray(reach_px, dtype=float), (spots.n_spots,))
    region = shapely.union_all(shapely.buffer(shapely.points(spots.centers), reach_px))
    shapely.prepare(region)
    h, w = spots.shape
    r = side / 2
    rows, cols, cx, cy = lattice("square", side, side, (r, r, w - r, h - r), region, over=f"{spots.shapes_key}")
    if len(cx) == 0:
        raise ValueError(f"No bin of {bin_um} um lies within the spots of {spots.shapes_key!r}; pass a smaller bin_um.")
    shapes = grid_shapes("square", rows, cols, cx, cy, side, spots.levels[0])
    units = Spots(
        image_key=spots.image_key,
        shapes_key=key,
        table_key=None,
        coordinate_system=spots.coordinate_system,
        levels=spots.levels,
        level_scales=spots.level_scales,
        centers=np.c_[cx, cy],
        radius_px=np.full(len(cx), side / np.sqrt(np.pi)),
        mpp=spots.mpp,
        index=shapes.index,
        table_rows=np.full(len(cx), -1),
    )
    return units, shapes


def membership(sdata: SpatialData, spots: Spots, centres_px: np.ndarray) -> sparse.csr_matrix:
    """``(n_spots, n_units)`` 0/1 matrix: which unit centres (image pixels) lie inside which spot's footprint.

    Circles test the distance to the centre; polygons are tested exactly (shapely), in the image's pixels.
    """
    import shapely

    shapes = sdata.shapes[spots.shapes_key].loc[spots.index]
    geom = shapes.geometry
    n, m = spots.n_spots, len(centres_px)
    if set(geom.geom_type.unique()) <= {"Point"}:
        from scipy.spatial import cKDTree

        found = cKDTree(centres_px).query_ball_point(spots.centers, r=spots.radius_px)
        rows = np.repeat(np.arange(n), [len(f) for f in found])
        cols = np.concatenate([np.asarray(f, dtype=np.int64) for f in found]) if n else np.zeros(0, np.int64)
    else:
        affine = to_pixels(sdata.shapes[spots.shapes_key], spots.levels[0], spots.coordinate_system)
        polys = geometries_in_pixels(np.asarray(geom.values), affine)
        tree = shapely.STRtree(polys)
        cols, rows = tree.query(shapely.points(centres_px), predicate="within")
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, m))


def _mean_rows(M: sparse.csr_matrix) -> sparse.csr_matrix:
    """``M`` with each non-empty row scaled to sum to 1 (the mean over a spot's units)."""
    total = np.asarray(M.sum(axis=1)).ravel()
    return sparse.diags(np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)) @ M


def _first_row(M: sparse.csr_matrix) -> np.ndarray:
    """For each unit (column of ``M``), the first spot (row) it lies in; -1 outside every spot."""
    C = M.tocsc()
    out = np.full(M.shape[1], -1)
    has = np.diff(C.indptr) > 0
    out[has] = C.indices[C.indptr[:-1][has]]
    return out


def _first_spot(M: sparse.csr_matrix, index: pd.Index) -> np.ndarray:
    """The spot (its shapes index, as a string) that each unit lies in; None outside every spot."""
    first = _first_row(M)
    out = np.full(M.shape[1], None, dtype=object)
    out[first >= 0] = np.asarray(index.astype(str))[first[first >= 0]]
    return out


def _slopes(model, table, fit_on, train, inputs, stats, genes, layer, min_counts, target_norm) -> np.ndarray:
    """Per-gene slope of the spots' measured expression on the model's out-of-fold predictions, within sections.

    Each training section is predicted by the model (its chosen alpha and components) refitted on the other
    sections; the slope of the measured on the predicted deviations from each section's mean, pooled, says how
    far the image's detail is to be trusted per gene: about 0 where the image does not predict a gene, about 1
    where it does. With one training section, 5 folds of its spots stand in for the sections. Clipped to [0, 2].
    """
    from sklearn.model_selection import KFold

    from omx.tl._engine import SectionScaler

    gene_idx = table.var_names.get_indexer(genes)
    X, Y, G = [], [], []
    for name in train:
        c = counts(table, fit_on[name].rows, layer=layer)
        ok = np.asarray(c.sum(axis=1)).ravel() >= min_counts
        X.append(inputs[name][ok])
        Y.append(targets(c, gene_idx)[ok])
        G.append(np.full(int(ok.sum()), name, dtype=object))
    X, Y, G = np.concatenate(X), np.concatenate(Y), np.concatenate(G)
    Z = SectionScaler(target_norm).fit_transform(Y, G)
    if len(train) >= 2:
        folds = [G == name for name in train]
    else:
        folds = [np.isin(np.arange(len(X)), k) for _, k in KFold(5, shuffle=True, random_state=0).split(X)]
    pred = np.zeros_like(Z)
    refit = model.clone(alpha=model.alpha_, n_components=model.n_components_, show_progress_bar=False)
    group_stats = {n: stats[n] for n in train}
    for held in folds:
        refit.fit(X[~held], Z[~held], Context(groups=G[~held], group_stats=group_stats))
        pred[held] = refit.predict(X[held], Context(groups=G[held], group_stats=group_stats))
    num, den = np.zeros(Z.shape[1]), np.zeros(Z.shape[1])
    for name in train:
        m = G == name
        p, z = pred[m] - pred[m].mean(0), Z[m] - Z[m].mean(0)
        num += (p * z).sum(0)
        den += (p * p).sum(0)
    return np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 0), 0.0, 2.0)


def _kernel_mean(xy_from: np.ndarray, values: np.ndarray, xy_to: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-kernel (Nadaraya-Watson) interpolation of ``values`` at ``xy_from`` onto ``xy_to``."""
    from scipy.spatial import cKDTree

    k = min(16, len(xy_from))
    d, nn = cKDTree(xy_from).query(xy_to, k=k)
    d, nn = d.reshape(len(xy_to), k), nn.reshape(len(xy_to), k)
    w = np.exp(-0.5 * (d / sigma) ** 2) + 1e-12
    out = np.zeros((len(xy_to), values.shape[1]))
    for j in range(k):
        out += w[:, j : j + 1] * values[nn[:, j]]
    return out / w.sum(axis=1, keepdims=True)


def _anchored(table, section: Section, M, units: Spots, pred, slopes, genes, layer, min_counts) -> np.ndarray:
    """Predictions of a measured section's units held to its spots: spot value plus the image's weighted detail.

    A unit inside a spot gets the spot's measured value plus ``weight * (its prediction - the mean prediction of
    the spot's units)``, so the units of a spot average to the spot's measurement (in log space). A unit outside
    every spot gets the same from the spots' values and mean predictions interpolated with a Gaussian kernel
    (sigma half the spot pitch). The weight of each gene is its slope (`_slopes`: how well the image predicts
    the gene between spots) times the reliability of the units' detail: the variance of the spot means of the
    predictions over the variance of the units' predictions. Noise in one unit's features averages out over a
    spot but not in the unit, so the detail of a noisy unit counts for less; on the synthetic Visium HD benchmark
    (8-um bins) it is about 0.1 and the detail at full weight does worse than no detail at all.
    """
    spots = section.spots
    X = counts(table, section.rows, layer=layer)
    ok = (np.asarray(X.sum(axis=1)).ravel() >= min_counts) & (np.asarray(M.sum(axis=1)).ravel() > 0)
    if ok.sum() == 0:
        return pred
    measured = targets(X, table.var_names.get_indexer(genes))[ok]
    M = M[ok]
    spot_pred = _mean_rows(M) @ pred
    # the share of the units' variance that survives averaging over a spot: about 1 where the image's signal is
    # smooth at the unit scale, about 1 / (units per spot) where the units' predictions vary by noise alone
    reliability = np.clip(spot_pred.var(axis=0) / np.maximum(pred.var(axis=0), 1e-12), 0.0, 1.0)
    # each unit's spot (the first, when spots overlap); units in no usable spot are interpolated
    first = _first_row(M)
    inside = first >= 0
    base, ref = np.empty_like(pred), np.empty_like(pred)
    base[inside], ref[inside] = measured[first[inside]], spot_pred[first[inside]]
    if (~inside).any():
        sigma = _pitch_px(spots) * spots.mpp / 2
        xy_spots, xy_out = spots.centers[ok] * spots.mpp, units.centers[~inside] * units.mpp
        both = _kernel_mean(xy_spots, np.hstack([measured, spot_pred]), xy_out, sigma)
        base[~inside], ref[~inside] = both[:, : pred.shape[1]], both[:, pred.shape[1] :]
    return base + slopes * reliability * (pred - ref)
