"""Cross-validation by section or patient, with every fitted step inside the fold."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from omx._docs import doc_params
from omx._schema import Key, base_entry, check_free, gene_layer, jsonable, model_entry, scores_columns, write_results
from omx._utils import as_list, logger, progress, resolve_table
from omx.pp._spots import section_column
from omx.tl._engine import (
    fit_sections,
    make_model,
    model_patch_settings,
    predict_section,
    resolve_sections,
    score_section,
    section_inputs,
    section_patients,
)


def _fresh(model, *, seed, device, show_progress_bar):
    from omx.models import Model

    if isinstance(model, Model):
        return model.clone(show_progress_bar=show_progress_bar)
    return make_model(model, seed=seed, device=device, show_progress_bar=show_progress_bar)


@doc_params()
def cross_validate(
    sdata: SpatialData,
    *,
    groups: str = "section",
    model="ridge",
    sections: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    table_key: str | None = None,
    section_key: str = "section",
    layer: str | None = None,
    mpp: float | None = None,
    size_um: float | None = None,
    context: Sequence[float] | None = None,
    target_norm: str = "section",
    min_counts: int = 10,
    top_n: int = 50,
    key_added: str | None = Key.CV,
    overwrite: bool = False,
    seed: int = 0,
    device: str = "auto",
    show_progress_bar: bool = True,
) -> pd.DataFrame:
    """Leave-one-group-out evaluation: each fold fits genes, normalisation and model on its training sections only.

    Parameters
    ----------
    sdata
        SpatialData with images, spots and a table of raw counts.
    groups
        Obs column that defines folds: ``"section"`` (leave one section out) or ``"patient"`` (leave one
        patient out), or any other column constant within sections.
    model
        ``"ridge"``, ``"cnn"`` or an unfitted :class:`omx.models.Model` (a fresh copy is fitted in each fold).
    sections
        Sections taking part (values of ``obs[section_key]``); all when omitted.
    test
        Groups to hold out, one fold each; every group when omitted.
    genes, n_top_genes, table_key, layer, mpp, size_um, context, target_norm, min_counts
        As in :func:`omx.tl.fit_predict`.
    seed, device, show_progress_bar
        As in :func:`omx.tl.fit_predict`.
    {section_key}
    top_n
        Size of the "most expressed" (in the test section) and "most variable" (over the training sections)
        gene sets of the summary.
    key_added
        Out-of-fold predictions go to ``table.layers[key_added]`` and scores to ``table.uns['omx'][key_added]``;
        None writes nothing.
    {overwrite}

    Returns
    -------
    One row per fold: the held-out group, the number of training and test spots, the mean per-gene Pearson r,
    Spearman rho, MSE and Lin's CCC over all genes (``*_all``), the ``top_n`` most expressed genes of the test
    section (``*_top_expressed``) and the ``top_n`` most variable genes of the training sections
    (``*_top_variable``), and seconds to fit and to predict. Per-gene scores of each fold are written to
    ``table.uns['omx'][key_added]["scores"]`` (read them with :func:`omx.get.scores`); out-of-fold predictions to
    ``table.layers[key_added]`` (read them with :func:`omx.get.predictions`).
    """
    from omx.metrics import summarize

    table_key, table = resolve_table(sdata, table_key)
    where = f"sdata.tables[{table_key!r}]"
    if key_added is not None:
        check_free(table, key=key_added, overwrite=overwrite, where=where, layers=[key_added])
    section_key = section_column(table, section_key)
    groups = section_key if groups in (None, Key.SECTION) and groups not in table.obs else groups
    for col in (groups, section_key):
        if col not in table.obs:
            raise KeyError(f"Table {table_key!r} has no obs column {col!r}; its columns: {list(table.obs.columns)}.")
    obs = table.obs[list(dict.fromkeys([section_key, groups]))].astype(str)
    names = as_list(sections) or pd.unique(obs[section_key]).tolist()
    group_of = {}
    for name in names:
        values = pd.unique(obs.loc[obs[section_key] == name, groups])
        if len(values) != 1:
            raise ValueError(
                f"Section {name!r} has {len(values)} values of {groups!r}; folds must not split a section."
            )
        group_of[name] = values[0]
    folds = as_list(test) or list(dict.fromkeys(group_of.values()))
    if len(set(group_of.values())) < 2:
        raise ValueError(
            f"Cross-validation needs at least 2 groups of {groups!r}; the sections form {len(set(group_of.values()))}."
        )
    resolved = resolve_sections(sdata, names, table_key=table_key, section_key=section_key, mpp=mpp, role="a")

    cache: dict = {}
    rows, gene_scores, fold_of, summaries, oof = [], {}, {}, {}, []
    for fold in progress(folds, show=show_progress_bar, desc="folds", unit="fold"):
        train = [n for n in names if group_of[n] != fold]
        held = [n for n in names if group_of[n] == fold]
        if not held:
            raise KeyError(f"No section has {groups} == {fold!r}; groups: {sorted(set(group_of.values()))}.")
        m = _fresh(model, seed=seed, device=device, show_progress_bar=show_progress_bar)
        # encode once, outside the timed fit; the cache is keyed by section and patch settings
        fold_size, fold_context = model_patch_settings(m, resolved[train[0]], size_um, context)
        for n in train + held:
            section_inputs(resolved[n], m, fold_size, fold_context, show_progress_bar, cache)
        t0 = time.perf_counter()
        m, train_var = fit_sections(
            sdata, resolved, train, m, table_key=table_key, genes=genes, n_top_genes=n_top_genes, layer=layer,
            min_counts=min_counts, target_norm=target_norm, size_um=fold_size, context=fold_context,
            show_progress_bar=show_progress_bar, cache=cache,
        )  # fmt: skip
        fit_s = time.perf_counter() - t0
        fold_genes = m.meta_["genes"]
        var = pd.Series(train_var, index=fold_genes)
        for n in held:
            t0 = time.perf_counter()
            pred = predict_section(
                m,
                resolved[n],
                show_progress_bar=show_progress_bar,
                cache=cache,
                patients=section_patients(table, resolved[n]),
            )
            predict_s = time.perf_counter() - t0
            scores = score_section(table, resolved[n], fold_genes, pred, layer, min_counts)
            summary = summarize(scores, y_train_var=var, top_n=top_n)
            row = {
                "fold": fold,
                "section": n,
                "train": ",".join(train),
                "n_train": int(sum(len(resolved[t].rows) for t in train)),
                "n_test": len(resolved[n].rows),
                "n_genes": len(fold_genes),
            }
            for set_name, stats in summary.items():
                for metric, value in stats.items():
                    if metric != "n_genes":
                        row[f"{metric}_{set_name}"] = value
            row.update(fit_s=fit_s, predict_s=predict_s)
            rows.append(row)
            gene_scores[n], fold_of[n], summaries[n] = scores, fold, summary
            oof.append((resolved[n].rows, fold_genes, pred))
            logger.info("fold %s, section %s: mean Pearson r %.3f", fold, n, row.get("pearson_all", np.nan))
    result = pd.DataFrame(rows)
    if key_added is not None:
        all_genes = list(dict.fromkeys(g for _, gs, _ in oof for g in gs))
        layer_values = np.full((table.n_obs, len(all_genes)), np.nan, dtype=np.float32)
        pos = pd.Index(all_genes)
        for r, gs, pred in oof:
            layer_values[np.ix_(r, pos.get_indexer(gs))] = pred
        rows_all = np.concatenate([r for r, _, _ in oof])
        params = {
            "groups": groups, "sections": names, "test": folds, "genes": genes, "n_top_genes": n_top_genes,
            "table_key": table_key, "section_key": section_key, "layer": layer, "mpp": mpp, "size_um": size_um,
            "context": context, "target_norm": target_norm, "min_counts": min_counts, "top_n": top_n, "seed": seed,
        }  # fmt: skip
        entry = base_entry(
            "cross_validate",
            params,
            model=model_entry(m),
            genes=all_genes,
            target_scale=Key.TARGET_SCALE,
            folds=jsonable(result.to_dict(orient="list")),
            summary=jsonable(summaries),
            scores=scores_columns(gene_scores, fold=fold_of),
        )
        write_results(
            table, key=key_added, entry=entry, overwrite=overwrite, where=where,
            layers={key_added: gene_layer(table, rows_all, all_genes, layer_values[rows_all])}, n_rows=len(rows_all),
        )  # fmt: skip
    return result
