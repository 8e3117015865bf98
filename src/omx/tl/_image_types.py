"""Front door for cell types from H&E alone: spot proportions and a type label per nucleus, no expression needed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key, add_table, base_entry, check_free, check_free_elements, model_entry, write_results
from omx._utils import logger, resolve_table
from omx.tl._deconvolve import _frame, _proportion_keys, _top_type
from omx.tl._engine import model_patch_settings, resolve_sections, section_inputs, split_sections


def _nuclei_of(cells: AnnData, section, *, cells_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``cells`` that are nuclei of a section's image, and the position of each one's spot (-1 outside)."""
    spots = section.spots
    if "spots_key" not in cells.obs.columns or "spot_id" not in cells.obs.columns:
        raise KeyError(
            f"sdata.tables[{cells_key!r}].obs lacks 'spots_key' / 'spot_id': its nuclei were not assigned to spots. "
            "Run omx.pp.segment_nuclei with the spots of every section."
        )
    rows = np.flatnonzero(cells.obs["spots_key"].astype(str).to_numpy() == spots.shapes_key)
    if len(rows) == 0:
        raise ValueError(
            f"sdata.tables[{cells_key!r}] holds no nuclei of section {section.name!r} (spots {spots.shapes_key!r}). "
            f"Run omx.pp.segment_nuclei(sdata, image_key=..., shapes_key={spots.shapes_key!r}) first, or pass "
            "`cells_key=None` to predict from image features alone for every section."
        )
    index = pd.Index(np.asarray(spots.index).astype(str))
    pos = index.get_indexer(cells.obs["spot_id"].astype(str).to_numpy()[rows])
    return rows, pos.astype(np.int64)


@doc_params()
def predict_proportions(
    sdata: SpatialData,
    *,
    train: str | Sequence[str],
    predict: str | Sequence[str],
    key: str = "stereoscope_major",
    table_key: str | None = None,
    section_key: str = "section",
    image_key: str | None = None,
    mpp: float | None = None,
    size_um: float | None = None,
    context: Sequence[float] | None = None,
    cells_key: str | None = Key.CELLS,
    alpha: float | None = None,
    nucleus_alpha: float | None = None,
    weight: float | None = None,
    key_added: str = Key.PROPORTIONS,
    overwrite: bool = False,
    seed: int = 0,
    show_progress_bar: bool = True,
):
    """Predict cell-type proportions, and a type per nucleus, from H&E alone, trained on sections with proportions.

    A :class:`omx.models.CompositionModel` is fitted with the cross-entropy against the training spots'
    proportions: a softmax regression on each spot's handcrafted image features (the spot and its surroundings)
    and the aggregates of its nuclei's morphology (count, mean and spread of size, shape, stain densities and
    local density), and a nucleus classifier learned from label proportions (the mean of its probabilities over
    a spot's nuclei fits the spot's proportions). A spot's prediction mixes the two; the penalties and the mix
    are chosen by leave-one-section-out cross-validation over the training sections. Every feature is
    standardised per section with that section's own statistics.

    Nuclei come from :func:`omx.pp.segment_nuclei` (``sdata.tables[cells_key]``), run on every training and
    predicted section's image with its spots. When that table does not exist, the spot model is fitted on the
    image features alone and a warning is logged; when it exists but lacks the nuclei of a section, this is an
    error (a model cannot use nuclei for some sections and not others).

    Parameters
    ----------
    sdata
        SpatialData with H&E images, spots and a table with proportions in ``obsm[key]``.
    train
        Sections to fit on (values of ``obs[section_key]``) whose spots have proportions.
    predict
        Sections to predict: values of ``obs[section_key]``, or shapes elements of H&E-only sections.
    key
        The ``obsm`` DataFrame of training proportions (e.g. from :func:`omx.tl.deconvolve`, or published ones).
    table_key
        The table; may be omitted when there is one.
    {section_key}
    {image_key}
    {mpp}
    {size_um}
    {context}
    cells_key
        The table of nuclei written by :func:`omx.pp.segment_nuclei`; None predicts from image features alone.
    alpha
        L2 penalty of the spot model; None chooses it by cross-validation.
    nucleus_alpha
        L2 penalty of the nucleus classifier; None chooses it by cross-validation.
    weight
        Weight of the spot model in a spot's prediction (the nucleus classifier's mean gets ``1 - weight``); None
        chooses it by cross-validation.
    key_added
        ``obsm`` entry written (and the name of the new table for H&E-only sections).
    {overwrite}
    {seed}
    {show_progress_bar}

    Returns
    -------
    The fitted :class:`omx.models.CompositionModel`. Writes

    - ``table.obsm[key_added]`` (DataFrame, one column per cell type; NaN for spots not predicted) and
      ``table.obs`` ``"omx_cell_type"`` (``key_added + "_cell_type"`` for another key) for predicted sections with a
      table, and ``table.uns['omx'][key_added]``; for H&E-only sections a new table ``sdata.tables[key_added]`` with
      the proportions in ``X`` (var = cell types) and in ``obsm[key_added]``;
    - with nuclei, ``sdata.tables[cells_key].obs`` ``"omx_image_type"`` (the nucleus classifier's most probable
      type; ``key_added + "_image_type"`` for another key) and ``"omx_image_type_confidence"`` (its probability)
      for every nucleus of the predicted sections (missing for other nuclei), and
      ``sdata.tables[cells_key].uns['omx'][key_added]``.
    """
    from omx.models._composition import CompositionModel, nucleus_features
    from omx.models._ridge import Ridge
    from omx.tl._engine import prediction_table

    train, predict = split_sections(train, predict)
    table_key, table = resolve_table(sdata, table_key)
    if key not in table.obsm:
        raise KeyError(f"sdata.tables[{table_key!r}].obsm has no {key!r} (entries: {list(table.obsm.keys())}).")
    props = table.obsm[key]
    if not isinstance(props, pd.DataFrame):
        raise TypeError(f"obsm[{key!r}] must be a DataFrame with one column per cell type.")
    types = [str(c) for c in props.columns]
    sections = resolve_sections(
        sdata, [*train, *predict], table_key=table_key, section_key=section_key, image_key=image_key, mpp=mpp, role="a"
    )
    where = f"sdata.tables[{table_key!r}]"
    measured = [n for n in predict if sections[n].measured]
    unmeasured = [n for n in predict if not sections[n].measured]
    cells = None
    if cells_key is not None:
        if cells_key in sdata.tables:
            cells = sdata.tables[cells_key]
        else:
            logger.warning(
                "sdata.tables[%r] does not exist: proportions are predicted from image features alone. Run "
                "omx.pp.segment_nuclei on every section's image first to use nucleus morphology (more accurate), "
                "or pass `cells_key=None` to silence this.",
                cells_key,
            )
    type_col, conf_col = Key.image_type(key_added), Key.image_type_confidence(key_added)
    if measured:
        check_free(
            table, key=key_added, overwrite=overwrite, where=where, **_proportion_keys(key_added, deconvolution=False)
        )
    if unmeasured:
        check_free_elements(sdata, overwrite=overwrite, tables=[key_added])
    if cells is not None:
        check_free(
            cells, key=key_added, overwrite=overwrite, where=f"sdata.tables[{cells_key!r}]", obs=[type_col, conf_col]
        )
        nuclei = {n: _nuclei_of(cells, sections[n], cells_key=cells_key) for n in [*train, *predict]}
        xy = np.asarray(cells.obsm["spatial"], dtype=float)[:, :2]
        feats = {
            n: nucleus_features(cells.obs.iloc[rows], xy[rows], np.zeros(len(rows), int))
            for n, (rows, _) in nuclei.items()
        }

    # the image features of the Ridge path: one encoder, its patch geometry, features cached in the feature store
    encoder_model = Ridge(seed=seed, show_progress_bar=show_progress_bar)
    size_um, context = model_patch_settings(encoder_model, sections[train[0]], size_um, context)

    def inputs(name):
        return section_inputs(sections[name], encoder_model, size_um, context, show_progress_bar, None)

    X, Ps, groups, U, spot, ngroups = [], [], [], [], [], []
    offset = 0
    for name in train:
        rows = sections[name].rows
        if (rows < 0).any():
            raise ValueError(f"Training section {name!r} has spots without a table row.")
        p = props.iloc[rows].to_numpy(dtype=float)
        ok = np.all(np.isfinite(p), axis=1)
        X.append(inputs(name)[ok])
        Ps.append(p[ok])
        groups.append(np.full(int(ok.sum()), name, dtype=object))
        if cells is not None:
            new_row = np.full(len(ok), -1, dtype=np.int64)
            new_row[ok] = offset + np.arange(int(ok.sum()))
            pos = nuclei[name][1]
            spot.append(np.where(pos >= 0, new_row[np.maximum(pos, 0)], -1))
            U.append(feats[name])
            ngroups.append(np.full(len(pos), name, dtype=object))
        offset += int(ok.sum())
    model = CompositionModel(alpha=alpha, nucleus_alpha=nucleus_alpha, weight=weight, seed=seed)
    nuc_args = {}
    if cells is not None:
        nuc_args = {
            "U": np.concatenate(U), "nucleus_spot": np.concatenate(spot), "nucleus_groups": np.concatenate(ngroups)
        }  # fmt: skip
    model.fit(np.concatenate(X), np.concatenate(Ps), groups=np.concatenate(groups), **nuc_args)

    preds, nucleus_probs = {}, {}
    for name in predict:
        n_spots = sections[name].spots.n_spots
        kw = {"groups": np.full(n_spots, name, dtype=object)}
        if cells is not None:
            pos = nuclei[name][1]
            kw |= {"U": feats[name], "nucleus_spot": pos, "nucleus_groups": np.full(len(pos), name, dtype=object)}
            nucleus_probs[name] = model.predict_nuclei(feats[name], nucleus_groups=kw["nucleus_groups"])
        preds[name] = model.predict(inputs(name), **kw)
    entry = base_entry(
        "predict_proportions",
        {
            "train": train, "predict": predict, "key": key, "table_key": table_key, "section_key": section_key,
            "image_key": image_key, "mpp": mpp, "size_um": size_um, "context": context, "cells_key": cells_key,
            "alpha": alpha, "nucleus_alpha": nucleus_alpha, "weight": weight, "seed": seed,
        },
        model=model_entry(model),
        fitted={"alpha": model.alpha_, "nucleus_alpha": model.nucleus_alpha_, "weight": model.weight_,
                "uses_nuclei": model.uses_nuclei_},
        cv={name: {str(k): v for k, v in scores.items()} for name, scores in model.cv_.items()},
        target=f"obsm[{key!r}] (cross-entropy)",
        cell_types=types,
    )  # fmt: skip
    if cells is not None:
        rows = np.concatenate([nuclei[n][0] for n in predict])
        probs = np.concatenate([nucleus_probs[n] for n in predict])
        confidence = np.full(cells.n_obs, np.nan)
        confidence[rows] = probs.max(1)
        write_results(
            cells,
            key=key_added,
            entry={**entry, "sections": predict},
            overwrite=overwrite,
            where=f"sdata.tables[{cells_key!r}]",
            obs={type_col: _top_type(cells.n_obs, rows, probs, types), conf_col: confidence},
            n_rows=len(rows),
        )
    if measured:
        rows = np.concatenate([sections[n].rows for n in measured])
        values = np.concatenate([preds[n] for n in measured])
        write_results(
            table,
            key=key_added,
            entry=entry,
            overwrite=overwrite,
            where=where,
            obsm={key_added: _frame(table, rows, values, types)},
            obs={Key.cell_type(key_added): _top_type(table.n_obs, rows, values, types)},
            n_rows=len(rows),
        )
    if unmeasured:
        new = prediction_table(
            [sections[n] for n in unmeasured], types, [preds[n] for n in unmeasured], key_added=key_added, uns=entry
        )
        new.obsm[key_added] = pd.DataFrame(new.X, index=new.obs_names, columns=types)
        add_table(sdata, key_added, new, overwrite=overwrite, what="predicted proportions")
    return model
