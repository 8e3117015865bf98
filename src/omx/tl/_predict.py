"""Front doors: fit on sections with expression, predict expression where there is only H&E."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

import omx
from omx._docs import doc_params
from omx._schema import (
    Key,
    add_table,
    check_free,
    check_free_elements,
    gene_layer,
    scores_columns,
    write_results,
)
from omx._utils import logger, resolve_table
from omx.metrics import summarize
from omx.tl._engine import (
    Section,
    fit_sections,
    make_model,
    predict_section,
    prediction_entry,
    prediction_table,
    resolve_sections,
    score_section,
    section_patients,
    split_sections,
    written_keys,
)

if TYPE_CHECKING:
    from omx.models import Model


@doc_params()
def fit_predict(
    sdata: SpatialData,
    *,
    train: str | Sequence[str],
    predict: str | Sequence[str],
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
    target_norm: str = "section",
    min_counts: int = 10,
    key_added: str = Key.PRED,
    overwrite: bool = False,
    seed: int = 0,
    device: str = "auto",
    show_progress_bar: bool = True,
) -> Model:
    """Fit a model on sections with expression and predict the expression of other sections from their H&E.

    Parameters
    ----------
    sdata
        SpatialData with H&E images, spots and a table of raw counts.
    train
        Sections to fit on: values of ``table.obs[section_key]``.
    predict
        Sections to predict: values of ``table.obs[section_key]``, or shapes elements without a measured table
        (H&E-only sections).
    model
        ``"ridge"`` (ridge on handcrafted features), ``"cnn"`` (CNN regression from scratch), ``"graph"``
        (`omx.models.SpatialGraph` over the spot graph), or a :class:`omx.models.Model` instance, unfitted. A
        model with ``target == "counts"`` (e.g. a count likelihood) is fitted on the raw counts of the genes and
        each spot's total count, not on standardised targets.
    {genes}
    {n_top_genes}
    table_key
        The table with the counts; may be omitted when there is one.
    {section_key}
    {layer}
    {image_key}
    {mpp}
    {size_um}
    {context}
    {target_norm}
    {min_counts}
    key_added
        Name of the layer (and of the ``uns['omx']`` entry) written.
    {overwrite}
    {seed}
    {device}
    {show_progress_bar}

    Returns
    -------
    The fitted model (save it with ``model.save(path)``). Writes, for sections with a table:

    - ``table.layers[key_added]``: predictions on the scale log1p(counts / total x 1e4) for the predicted
      sections' spots and the chosen genes; NaN elsewhere.
    - ``table.layers[key_added + "_var"]``: with a count likelihood (e.g. ``SpatialGraph(likelihood="nb")``),
      the predictive variance of log1p(counts / total x 1e4) under the fitted NB at the training median library
      size (Monte Carlo), same rows and genes; NaN elsewhere.
    - ``table.uns['omx'][key_added]``: the function, omx's version, the call's ``params``, the ``model`` and
      the ``genes``, and, where the predicted sections are measured, per-gene ``scores`` (one row per section
      and gene; read them with :func:`omx.get.scores`) and their ``summary`` per section.

    For an H&E-only section (a shapes element with no table rows), a new table ``sdata.tables[key_added]``
    annotating those shapes, with the predictions in ``X``. :func:`omx.get.predictions` returns all of them
    as one AnnData of the predicted spots and genes.
    """
    train, predict = split_sections(train, predict)
    table_key, table = resolve_table(sdata, table_key)
    sections = resolve_sections(
        sdata, [*train, *predict], table_key=table_key, section_key=section_key, image_key=image_key, mpp=mpp, role="a"
    )
    unmeasured = [n for n in predict if not sections[n].measured]
    model = make_model(model, seed=seed, device=device, show_progress_bar=show_progress_bar)
    # every key this call writes is checked before the fit, so that a taken one fails in seconds, not after it
    if len(unmeasured) < len(predict):
        where = f"sdata.tables[{table_key!r}]"
        check_free(table, key=key_added, overwrite=overwrite, where=where, layers=written_keys(model, key_added))
    if unmeasured:
        check_free_elements(sdata, overwrite=overwrite, tables=[key_added])
    model, train_var = fit_sections(
        sdata, sections, train, model, table_key=table_key, genes=genes, n_top_genes=n_top_genes, layer=layer,
        min_counts=min_counts, target_norm=target_norm, size_um=size_um, context=context,
        show_progress_bar=show_progress_bar,
    )  # fmt: skip
    genes = model.meta_["genes"]
    out = {
        n: predict_section(
            model,
            sections[n],
            show_progress_bar=show_progress_bar,
            return_var=True,
            patients=section_patients(table, sections[n]),
        )
        for n in predict
    }
    preds = {n: p for n, (p, _) in out.items()}

    measured = [n for n in predict if sections[n].measured]
    entry = prediction_entry(
        "fit_predict",
        model,
        {
            "train": train, "predict": predict, "genes": genes, "n_top_genes": n_top_genes, "table_key": table_key,
            "section_key": section_key, "layer": layer, "mpp": mpp, "size_um": size_um, "context": context,
            "target_norm": target_norm, "min_counts": min_counts, "seed": seed,
        },
    )  # fmt: skip
    if measured:
        rows = np.concatenate([sections[n].rows for n in measured])
        layers = {key_added: gene_layer(table, rows, genes, np.concatenate([preds[n] for n in measured]))}
        if out[measured[0]][1] is not None:  # the model's predictive variance (count likelihoods)
            var = np.concatenate([out[n][1] for n in measured])
            layers[Key.variance(key_added)] = gene_layer(table, rows, genes, var)
        per_section = {}
        for n in measured:
            per_section[n] = score_section(table, sections[n], genes, preds[n], layer, min_counts)
            summary = summarize(per_section[n], y_train_var=pd.Series(train_var, index=genes))
            entry["summary"][n] = summary
            logger.info("%s: mean Pearson r %.3f over %d genes", n, summary["all"]["pearson"], len(genes))
        entry["scores"] = scores_columns(per_section)
        write_results(
            table, key=key_added, entry=entry, overwrite=overwrite, where=f"sdata.tables[{table_key!r}]",
            layers=layers, n_rows=len(rows),
        )  # fmt: skip
    if unmeasured:
        new = prediction_table(
            [sections[n] for n in unmeasured], genes, [preds[n] for n in unmeasured], key_added=key_added, uns=entry
        )
        add_table(sdata, key_added, new, overwrite=overwrite, what="predictions")
    return model


@doc_params()
def predict_expression(
    sdata: SpatialData,
    model: Model | str | PathLike,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    mpp: float | None = None,
    genes: Sequence[str] | None = None,
    key_added: str = Key.PRED,
    overwrite: bool = False,
    device: str = "auto",
    show_progress_bar: bool = True,
    inplace: bool = True,
) -> AnnData | None:
    """Predict expression for the spots of one shapes element with a fitted model.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image and the spots (circles or polygons).
    model
        A fitted :class:`omx.models.Model` (e.g. returned by :func:`omx.tl.fit_predict`), or the path where
        one was saved with ``model.save(path)``.
    {image_key}
    shapes_key
        The spots; may be omitted when there is one shapes element (or the table annotates one).
    table_key
        A table annotating the spots; predictions then go to its ``layers[key_added]``.
    {mpp}
    genes
        The model's genes to write; all of them when omitted. Predictions go into a table's columns by gene name:
        when the table lacks some of the model's genes (another panel, renamed symbols), omx raises an error
        naming them, and ``genes=`` chooses the ones to write.
    key_added
        Layer name (spots with a table) or new table name (spots without one).
    {overwrite}
    {device}
    {show_progress_bar}
    inplace
        Write into ``sdata``; otherwise return the predictions as a new AnnData.

    Returns
    -------
    With ``inplace=False``, a SpatialData table of spots x genes (log1p(counts / total x 1e4)) annotating the
    shapes, ready for ``sdata.tables[name] = table``. Otherwise None, and:

    - spots annotated by a table: ``table.layers[key_added]`` (NaN for rows of other spots and other genes),
      ``table.layers[key_added + "_var"]`` (the predictive variance, for models with a count likelihood), and
      ``table.uns['omx'][key_added]`` with the model's parameters;
    - spots without a table: a new table ``sdata.tables[key_added]`` annotating them, predictions in ``X``.
    """
    from omx.models import MODELS, Model, load

    if not isinstance(model, Model):
        if isinstance(model, str) and model in MODELS:
            raise ValueError(
                f"model={model!r} is not fitted. Fit one first, e.g. `m = omx.tl.fit_predict(sdata, train=[...], "
                "predict=[...])`, then pass `m` (or the path of `m.save(path)`)."
            )
        model = load(model)
    if model.meta_ is None:
        raise ValueError("The model is not fitted through omx.tl; fit it with omx.tl.fit_predict first.")
    model.to(device)
    spots = omx.pp.resolve_spots(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, mpp=mpp)
    has_table = spots.table_key is not None and (spots.table_rows >= 0).any()
    model_genes = list(model.meta_["genes"])
    keep = _genes_to_write(model_genes, genes, sdata.tables[spots.table_key] if has_table and inplace else None)
    where = f"sdata.tables[{spots.table_key!r}]"
    if inplace:
        if has_table:
            layers = written_keys(model, key_added)
            check_free(sdata.tables[spots.table_key], key=key_added, overwrite=overwrite, where=where, layers=layers)
        else:
            check_free_elements(sdata, overwrite=overwrite, tables=[key_added])
    name = spots.shapes_key
    if has_table and Key.SECTION in sdata.tables[spots.table_key].obs:
        # the section's label in the table, as at fit time: retrieval leaves out the query's own section
        table = sdata.tables[spots.table_key]
        values = pd.unique(table.obs[Key.SECTION].iloc[spots.table_rows[spots.table_rows >= 0]].astype(str))
        name = str(values[0]) if len(values) == 1 else name
    section = Section(name=name, spots=spots)
    patients = section_patients(sdata.tables[spots.table_key], section) if has_table else None
    pred, var = predict_section(model, section, show_progress_bar=show_progress_bar, return_var=True, patients=patients)
    genes = [model_genes[i] for i in keep]
    pred = pred[:, keep]
    var = var[:, keep] if var is not None else None
    params = {
        "image_key": spots.image_key, "shapes_key": spots.shapes_key, "table_key": spots.table_key, "mpp": mpp,
        "section": name, "genes": genes if len(genes) < len(model_genes) else None,
    }  # fmt: skip
    entry = prediction_entry("predict_expression", model, params)
    if not inplace:
        return prediction_table([section], genes, [pred], key_added=key_added, uns=entry)
    if has_table:
        table = sdata.tables[spots.table_key]
        ok = spots.table_rows >= 0
        rows = spots.table_rows[ok]
        layers = {key_added: gene_layer(table, rows, genes, pred[ok])}
        if var is not None:
            layers[Key.variance(key_added)] = gene_layer(table, rows, genes, var[ok])
        write_results(
            table, key=key_added, entry=entry, overwrite=overwrite, where=where, layers=layers, n_rows=len(rows)
        )
    else:
        new = prediction_table([section], genes, [pred], key_added=key_added, uns=entry)
        add_table(sdata, key_added, new, overwrite=overwrite, what="predictions")
    return None


def _genes_to_write(model_genes: list[str], genes: Sequence[str] | None, table: AnnData | None) -> np.ndarray:
    """Positions of the model genes to write: ``genes`` (all when None), each of which the table must hold by name."""
    if genes is not None:
        genes = list(genes)
        if not genes:
            raise ValueError("genes=[] selects no gene; pass None for all of the model's genes.")
        unknown = [g for g in genes if g not in model_genes]
        if unknown:
            raise KeyError(f"The model does not predict genes {unknown[:10]}; its genes are e.g. {model_genes[:10]}.")
    chosen = model_genes if genes is None else genes
    if table is not None:
        lacking = [g for g in chosen if g not in table.var_names]
        if lacking:
            present = [g for g in chosen if g in table.var_names]
            raise KeyError(
                f"The table lacks {len(lacking)} of the {len(chosen)} genes the model predicts, e.g. {lacking[:10]} "
                "(another panel, or renamed symbols); predictions go into the table's columns by name, never into "
                f"another gene's. Pass `genes=` with the {len(present)} genes the table has (e.g. "
                "`genes=[g for g in model.meta_['genes'] if g in table.var_names]`), or `inplace=False` for all "
                "predictions as a new table."
            )
    index = {g: i for i, g in enumerate(model_genes)}
    return np.array([index[g] for g in chosen], dtype=int)
