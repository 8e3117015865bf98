"""Front doors: fit on sections with expression, predict expression where there is only H&E."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import TableModel

import omx
from omx._utils import OMX_TABLE, logger
from omx.models import Context
from omx.tl._core import (
    DEFAULT_CONTEXT,
    PATIENT_KEY,
    SECTION_KEY,
    TARGET_SCALE,
    Section,
    SectionScaler,
    as_dense,
    check_key_free,
    choose_genes,
    counts,
    input_chunks,
    log_written,
    model_inputs,
    resolve_sections,
    resolve_table,
    split_sections,
    targets,
)

if TYPE_CHECKING:
    from omx.models import Model


def _get_model(model, *, seed: int, device: str, show_progress_bar: bool) -> Model:
    from omx.models import Model, get_model

    if isinstance(model, Model):
        return model
    return get_model(model, seed=seed, device=device, show_progress_bar=show_progress_bar)


def fit_sections(
    sdata: SpatialData,
    sections: dict[str, Section],
    train: Sequence[str],
    model: Model,
    *,
    table_key: str,
    genes: Sequence[str] | None,
    n_top_genes: int | None,
    layer: str | None,
    min_counts: int,
    target_norm: str,
    size_um: float | None,
    context: Sequence[float],
    show_progress_bar: bool,
    cache: dict | None = None,
) -> tuple[Model, np.ndarray]:
    """Fit ``model`` on the training sections; everything fitted here sees the training sections only.

    Returns the fitted model (with ``meta_`` holding genes, target statistics and patch settings) and the
    per-gene variance of the training targets (for choosing the most variable genes when scoring).
    """
    table = sdata.tables[table_key]
    for name in train:
        if not sections[name].measured:
            raise ValueError(f"Training section {name!r} has no measured expression in table {table_key!r}.")
    rows = np.concatenate([sections[n].rows for n in train])
    X = counts(table, rows, layer=layer)
    total = np.asarray(X.sum(axis=1)).ravel()
    keep = total >= min_counts
    if keep.sum() < 2:
        raise ValueError(f"Fewer than 2 training spots have at least min_counts={min_counts} counts.")
    if (~keep).any():
        logger.info("Left out %d training spots with fewer than %d counts.", int((~keep).sum()), min_counts)
    genes = choose_genes(table, genes, X[keep], n_top_genes=n_top_genes)
    gene_idx = table.var_names.get_indexer(genes)
    Y = targets(X, gene_idx)[keep]
    groups = np.concatenate([np.full(len(sections[n].rows), n, dtype=object) for n in train])[keep]
    train_var = Y.var(axis=0)
    counts_model = model.target == "counts"  # e.g. a count likelihood: raw counts and library sizes
    scaler = SectionScaler("none" if counts_model else target_norm)
    Z = scaler.fit_transform(Y, groups)
    if counts_model:
        Z = np.asarray(as_dense(X[:, gene_idx]), dtype=np.float32)[keep]
    size_um = sections[train[0]].spots.diameter_um if size_um is None else float(size_um)
    inputs = np.concatenate([_inputs(sections[n], model, size_um, context, show_progress_bar, cache) for n in train])[
        keep
    ]
    coords = np.concatenate([sections[n].spots.centers * sections[n].spots.mpp for n in train])[keep]
    patients = [section_patients(table, sections[n]) for n in train]
    meta = {
        "genes": list(genes),
        "target_mean": scaler.mean_.tolist(),
        "target_std": scaler.std_.tolist(),
        "target_norm": "counts" if counts_model else target_norm,
        "target_scale": TARGET_SCALE,
        "size_um": size_um,
        "context": list(context),
        "train_sections": list(train),
        "min_counts": min_counts,
    }
    ctx = Context(
        groups=groups,
        patients=None if any(p is None for p in patients) else np.concatenate(patients)[keep],
        coords=coords,
        library_size=total[keep] if counts_model else None,
        meta=meta,
    )
    model.fit(inputs, Z, ctx)
    return model, train_var


def section_patients(table: AnnData | None, section: Section) -> np.ndarray | None:
    """The patient of each spot of a section, from ``table.obs["patient"]``; None where the table does not say.

    Spots without a table row take the patient of the section's other spots when those all share one.
    """
    if table is None or PATIENT_KEY not in table.obs:
        return None
    rows = section.rows
    measured = rows >= 0
    if not measured.any():
        return None
    values = table.obs[PATIENT_KEY].iloc[rows[measured]].astype(str).to_numpy()
    if measured.all():
        return values
    unique = pd.unique(values)
    return np.full(len(rows), str(unique[0]), dtype=object) if len(unique) == 1 else None


def _inputs(section, model, size_um, context, show_progress_bar, cache) -> np.ndarray:
    patch_px = model.patch_px if model.input == "patches" else None
    key = (section.name, model.input, patch_px, size_um, tuple(context), _encoder_id(model))
    if cache is not None and key in cache:
        return cache[key]
    out = model_inputs(section, model, size_um=size_um, context=context, show_progress_bar=show_progress_bar)
    if cache is not None:
        cache[key] = out
    return out


def _encoder_id(model) -> str | None:
    enc = model.encoder if model.input == "features" else None
    return None if enc is None else f"{enc.name}:{sorted(enc.get_params().items())}"


def predict_section(
    model: Model,
    section: Section,
    *,
    show_progress_bar: bool,
    cache: dict | None = None,
    return_var: bool = False,
    patients: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """Predictions ``(n_spots, n_genes)`` on the log-normalised scale for one section.

    Models that read the spots' coordinates (``"coords"`` in ``model.uses``), and sections whose inputs are
    cached, are predicted from the inputs of the whole section; the others stream (see `_predict_stream`). With
    ``return_var``, also the predictive variance on that scale when the model provides one
    (``model.provides_variance``), else None. ``patients`` gives the patient of each spot (`section_patients`).
    """
    meta = model.meta_
    var = None
    if "coords" in model.uses or cache is not None:
        inputs = _inputs(section, model, meta["size_um"], meta["context"], show_progress_bar, cache)
        ctx = Context(
            groups=np.full(len(inputs), section.name, dtype=object),
            patients=patients,
            coords=section.spots.centers * section.spots.mpp,
        )
        if return_var and model.provides_variance:
            Z, var = model.predict(inputs, ctx, return_var=True)
            var = (var * np.asarray(meta["target_std"]) ** 2).astype(np.float32)
        else:
            Z = model.predict(inputs, ctx)
    else:
        Z = _predict_stream(model, section, show_progress_bar=show_progress_bar, patients=patients)
    pred = (Z * np.asarray(meta["target_std"]) + np.asarray(meta["target_mean"])).astype(np.float32)
    return (pred, var) if return_var else pred


def _predict_stream(
    model: Model, section: Section, *, show_progress_bar: bool, patients: np.ndarray | None = None
) -> np.ndarray:
    """Predict a section chunk by chunk, so memory does not grow with its inputs.

    Patch models predict each chunk of patches as it is cut. Feature models first write the features of all
    chunks to a temporary zarr array on disk (``$TMPDIR``) while summing their per-section statistics, then
    predict chunk by chunk with those statistics: the same predictions as from the whole section at once.
    """
    meta = model.meta_
    n = section.spots.n_spots
    chunks = input_chunks(section, model, meta["size_um"], meta["context"], show_progress_bar)
    out = np.empty((n, model.n_targets_), dtype=np.float32)

    def chunk_context(positions: np.ndarray, stats=None) -> Context:
        return Context(
            groups=np.full(len(positions), section.name, dtype=object),
            patients=None if patients is None else np.asarray(patients)[positions],
            group_stats=stats,
        )

    if model.input == "patches":
        for positions, patches in chunks:
            out[positions] = model.predict(patches, chunk_context(positions))
        return out
    import zarr

    with tempfile.TemporaryDirectory(prefix="omx_features_") as tmp:
        store, written, moments, start = None, [], _Moments(), 0
        for positions, feats in chunks:
            if store is None:
                store = zarr.create_array(
                    f"{tmp}/features.zarr", shape=(n, feats.shape[1]), chunks=(4096, feats.shape[1]), dtype="f4"
                )
            store[start : start + len(positions)] = feats
            moments.add(feats)
            written.append((start, positions))
            start += len(positions)
        stats = {section.name: moments.result()}
        for start, positions in written:
            X = store[start : start + len(positions)]
            out[positions] = model.predict(X, chunk_context(positions, stats))
    return out


class _Moments:
    """Mean and standard deviation of rows that come in chunks (Chan et al.'s pairwise update, float64)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        k, mean = len(X), X.mean(axis=0)
        m2 = ((X - mean) ** 2).sum(axis=0)
        total = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * k / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * k / total
        self.n = total

    def result(self) -> tuple[np.ndarray, np.ndarray, int]:
        """``(mean, std, n)``, the standard deviation with ``ddof=0`` like `numpy.std`."""
        return self.mean, np.sqrt(self.m2 / self.n), self.n


def _write_layer(table: AnnData, key_added: str, rows: np.ndarray, genes: list[str], values: np.ndarray) -> None:
    layer = np.full(table.shape, np.nan, dtype=np.float32)
    layer[np.ix_(rows, table.var_names.get_indexer(genes))] = values
    table.layers[key_added] = layer


def _scores(table: AnnData, section: Section, genes: list[str], pred: np.ndarray, layer: str | None, min_counts: int):
    from omx.metrics import gene_scores

    X = counts(table, section.rows, layer=layer)
    ok = np.asarray(X.sum(axis=1)).ravel() >= min_counts
    y = targets(X, table.var_names.get_indexer(genes))
    return gene_scores(y[ok], pred[ok], genes)


def _uns_entry(model: Model, **extra) -> dict:
    return {
        "model": type(model).__name__,
        "params": dict(model.init_params_),
        "version": omx.__version__,
        **{k: v for k, v in model.meta_.items() if k not in ("target_mean", "target_std")},
        **extra,
    }


def fit_predict(
    sdata: SpatialData,
    *,
    train: str | Sequence[str],
    predict: str | Sequence[str],
    model: str | Model = "ridge",
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    table_key: str | None = None,
    groups_key: str = "section",
    layer: str | None = None,
    image_key: str | None = None,
    mpp: float | None = None,
    size_um: float | None = None,
    context: Sequence[float] = DEFAULT_CONTEXT,
    target_norm: str = "section",
    min_counts: int = 10,
    key_added: str = "omx_pred",
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
        Sections to fit on: values of ``table.obs[groups_key]``.
    predict
        Sections to predict: values of ``table.obs[groups_key]``, or shapes elements without a measured table
        (H&E-only sections).
    model
        ``"ridge"`` (ridge on handcrafted features), ``"cnn"`` (CNN regression from scratch), ``"graph"``
        (`omx.models.SpatialGraph` over the spot graph), or a :class:`omx.models.Model` instance, unfitted. A
        model with ``target == "counts"`` (e.g. a count likelihood) is fitted on the raw counts of the genes and
        each spot's total count, not on standardised targets.
    genes
        Genes to predict; all must be in the table. Omitted: the genes detected in at least 1 % of training spots.
    n_top_genes
        With ``genes=None``, keep only this many of the most expressed genes of the training sections.
    table_key
        The table with the counts; may be omitted when there is one.
    groups_key
        The obs column naming each spot's section.
    layer
        Layer with the raw counts; ``X`` when omitted.
    image_key
        The H&E image, when it cannot be found from the spots' coordinate system.
    mpp
        Microns per pixel of the images, when their coordinate systems are not in microns.
    size_um
        Side of the patch around each spot, in microns; the spot diameter when omitted.
    context
        Patch sizes as multiples of ``size_um``: feature models concatenate the features of each; patch
        models see one patch spanning the largest. The default adds the spot's surroundings at two and three
        times its size, which raised the mean per-gene Pearson r of ridge on her2st (leave-one-section-out,
        C sections) from 0.14 to 0.17.
    target_norm
        ``"section"`` standardises each gene within each training section (recommended when library depths
        differ), ``"none"`` pools log-normalised values as they are.
    min_counts
        Spots with fewer counts are left out of training and of the scores (their predictions are still written).
    key_added
        Name of the layer (and of the ``uns['omx']`` entry) written.
    overwrite
        Replace an existing ``key_added``.
    seed
        Random seed.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    show_progress_bar
        Show progress bars.

    Returns
    -------
    The fitted model (save it with ``model.save(path)``). Writes, for sections with a table:

    - ``table.layers[key_added]``: predictions on the scale log1p(counts / total x 1e4) for the predicted
      sections' spots and the chosen genes; NaN elsewhere.
    - ``table.layers[key_added + "_var"]``: with a count likelihood (e.g. ``SpatialGraph(likelihood="nb")``),
      the predictive variance of log1p(counts / total x 1e4) under the fitted NB at the training median library
      size (Monte Carlo), same rows and genes; NaN elsewhere.
    - ``table.uns['omx'][key_added]``: model, parameters, genes, sections, seed, version and, where the predicted
      sections are measured, per-gene scores (``gene_scores``) and their summary (``summary``).

    For an H&E-only section (a shapes element with no table rows), a new table ``sdata.tables[key_added]``
    annotating those shapes, with the predictions in ``X``.
    """
    train, predict = split_sections(train, predict)
    table_key, table = resolve_table(sdata, table_key)
    check_key_free(table, key_added, overwrite=overwrite)
    sections = resolve_sections(
        sdata, [*train, *predict], table_key=table_key, groups_key=groups_key, image_key=image_key, mpp=mpp, role="a"
    )
    unmeasured = [n for n in predict if not sections[n].measured]
    if unmeasured and key_added in sdata.tables and not overwrite:
        raise KeyError(f"sdata.tables[{key_added!r}] exists; pass another `key_added=` or `overwrite=True`.")
    model = _get_model(model, seed=seed, device=device, show_progress_bar=show_progress_bar)
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

    from omx.metrics import summarize

    measured = [n for n in predict if sections[n].measured]
    uns = _uns_entry(model, predict_sections=predict, seed=seed, table_key=table_key)
    if measured:
        rows = np.concatenate([sections[n].rows for n in measured])
        _write_layer(table, key_added, rows, genes, np.concatenate([preds[n] for n in measured]))
        log_written(len(rows), len(genes), f"sdata.tables[{table_key!r}].layers[{key_added!r}]")
        if out[measured[0]][1] is not None:  # the model's predictive variance (count likelihoods)
            _write_layer(table, f"{key_added}_var", rows, genes, np.concatenate([out[n][1] for n in measured]))
            log_written(len(rows), len(genes), f"sdata.tables[{table_key!r}].layers[{key_added + '_var'!r}]")
        per_section = {}
        for n in measured:
            scores = _scores(table, sections[n], genes, preds[n], layer, min_counts)
            summary = summarize(scores, y_train_var=pd.Series(train_var, index=genes))
            per_section[n] = {"summary": summary, "gene_scores": scores.reset_index().to_dict(orient="list")}
            logger.info("%s: mean Pearson r %.3f over %d genes", n, summary["all"]["pearson"], len(genes))
        uns["scores"] = per_section
        table.uns.setdefault("omx", {})[key_added] = uns
    if unmeasured:
        table = _prediction_table(
            [sections[n] for n in unmeasured], genes, [preds[n] for n in unmeasured], key_added=key_added, uns=uns
        )
        _add_prediction_table(sdata, table, key_added)
    return model


def _prediction_table(sections: list[Section], genes, preds: list, *, key_added: str, uns: dict) -> AnnData:
    """A SpatialData table of predictions (spots x genes in ``X``) annotating the sections' shapes."""
    obs, spatial = [], []
    for section in sections:
        spots = section.spots
        obs.append(
            pd.DataFrame(
                {"region": spots.shapes_key, "spot_id": np.asarray(spots.index), "section": section.name},
                index=[f"{section.name}_{i}" for i in spots.index],
            )
        )
        spatial.append(spots.centers * spots.mpp)
    obs = pd.concat(obs)
    obs["region"] = obs["region"].astype("category")
    adata = AnnData(X=np.concatenate(preds).astype(np.float32), obs=obs, var=pd.DataFrame(index=list(genes)))
    adata.obsm["spatial"] = np.concatenate(spatial)
    adata.uns["omx"] = {key_added: uns}
    adata.uns[OMX_TABLE] = "predictions"
    regions = [s.spots.shapes_key for s in sections]
    return TableModel.parse(adata, region=regions, region_key="region", instance_key="spot_id")


def _add_prediction_table(sdata: SpatialData, table: AnnData, key_added: str) -> None:
    sdata.tables[key_added] = table
    regions = table.uns["spatialdata_attrs"]["region"]
    log_written(table.n_obs, table.n_vars, f"sdata.tables[{key_added!r}] (a new table annotating {regions})")


def predict_expression(
    sdata: SpatialData,
    model: Model | str | PathLike,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    mpp: float | None = None,
    key_added: str = "omx_pred",
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
    image_key
        The H&E image; may be omitted when one image shares the spots' coordinate system.
    shapes_key
        The spots; may be omitted when there is one shapes element (or the table annotates one).
    table_key
        A table annotating the spots; predictions then go to its ``layers[key_added]``.
    mpp
        Microns per pixel of the image, when its coordinate system is not in microns.
    key_added
        Layer name (spots with a table) or new table name (spots without one).
    overwrite
        Replace an existing ``key_added``.
    device
        Device for the model (``"auto"``, ``"cpu"``, ``"cuda"``).
    show_progress_bar
        Show progress bars.
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
    if inplace:
        if has_table:
            check_key_free(sdata.tables[spots.table_key], key_added, overwrite=overwrite)
        elif key_added in sdata.tables and not overwrite:
            raise KeyError(f"sdata.tables[{key_added!r}] exists; pass another `key_added=` or `overwrite=True`.")
    name = spots.shapes_key
    if has_table and SECTION_KEY in sdata.tables[spots.table_key].obs:
        # the section's label in the table, as at fit time: retrieval leaves out the query's own section
        table = sdata.tables[spots.table_key]
        values = pd.unique(table.obs[SECTION_KEY].iloc[spots.table_rows[spots.table_rows >= 0]].astype(str))
        name = str(values[0]) if len(values) == 1 else name
    section = Section(name=name, spots=spots)
    patients = section_patients(sdata.tables[spots.table_key], section) if has_table else None
    pred, var = predict_section(model, section, show_progress_bar=show_progress_bar, return_var=True, patients=patients)
    genes = model.meta_["genes"]
    uns = _uns_entry(model, predict_shapes=spots.shapes_key)
    if not inplace:
        return _prediction_table([section], genes, [pred], key_added=key_added, uns=uns)
    if has_table:
        table = sdata.tables[spots.table_key]
        ok = spots.table_rows >= 0
        _write_layer(table, key_added, spots.table_rows[ok], genes, pred[ok])
        if var is not None:
            _write_layer(table, f"{key_added}_var", spots.table_rows[ok], genes, var[ok])
        table.uns.setdefault("omx", {})[key_added] = uns
        log_written(int(ok.sum()), len(genes), f"sdata.tables[{spots.table_key!r}].layers[{key_added!r}]")
    else:
        _add_prediction_table(
            sdata, _prediction_table([section], genes, [pred], key_added=key_added, uns=uns), key_added
        )
    return None
