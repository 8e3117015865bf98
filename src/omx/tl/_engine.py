"""The engine behind omx.tl's front doors: sections, model inputs, targets, fitting, prediction and scoring.

The front doors (`fit_predict`, `predict_expression`, `cross_validate`, `deconvolve`, ...) resolve their
arguments, call these functions and hand the results to the schema's writer (`omx._schema`). Models only ever see
arrays and a `omx.models.Context` built here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import TableModel

from omx._schema import Key, base_entry, model_entry
from omx._utils import as_list, check_counts, log_normalize, logger
from omx.metrics import gene_scores
from omx.models import Context
from omx.pp import Spots, resolve_spots
from omx.pp._features import (
    create_in_store,
    find_in_store,
    find_in_table,
    geometry,
    mark_complete,
    store_name,
    write_to_store,
)
from omx.pp._spots import region_shapes, section_column, table_regions
from omx.pp._stream import collect, iter_chunks, patch_settings

if TYPE_CHECKING:
    from omx.models import Model


@dataclass
class Section:
    """One section: its spots in image pixels and, where measured, their table rows."""

    name: str
    spots: Spots
    #: The table annotating the spots, where `omx.pp.encode` may have written their features.
    table: AnnData | None = None

    @property
    def rows(self) -> np.ndarray:
        """Table row of each spot (-1 where the table has none)."""
        return self.spots.table_rows

    @property
    def measured(self) -> bool:
        """Whether every spot has a table row."""
        return bool((self.rows >= 0).all())


def resolve_sections(
    sdata: SpatialData,
    names: Sequence[str],
    *,
    table_key: str,
    section_key: str,
    image_key: str | None = None,
    mpp: float | None = None,
    role: str = "",
) -> dict[str, Section]:
    """Resolve sections by name: a value of ``table.obs[section_key]``, or a shapes element with no measurement."""
    table = sdata.tables[table_key]
    _, region_key, _ = table_regions(table)
    section_key = section_column(table, section_key)
    labels = table.obs[section_key].astype(str).to_numpy()
    known = pd.unique(labels).tolist()
    out = {}
    for name in names:
        if name in known:
            regions = pd.unique(table.obs[region_key].to_numpy()[labels == name]).tolist()
            if len(regions) != 1:
                raise ValueError(f"Section {name!r} spans several shapes elements {regions}; give each section one.")
            shapes_key = region_shapes(sdata, table, str(regions[0])) or str(regions[0])
        elif name in sdata.shapes:
            shapes_key = name
        else:
            raise KeyError(
                f"{role.capitalize()} section {name!r} is neither a value of table.obs[{section_key!r}] ({known}) "
                f"nor a shapes element ({list(sdata.shapes.keys())})."
            )
        try:
            spots = resolve_spots(
                sdata,
                image_key=image_key,
                shapes_key=shapes_key,
                table_key=table_key if name in known else None,
                mpp=mpp,
            )
        except KeyError as err:
            raise KeyError(f"Section {name!r}: {err.args[0]}") from err
        if name in known:
            spots = spots.subset(spots.table_rows >= 0)
            spots = spots.subset(labels[spots.table_rows] == name)
        else:  # H&E only: rows of any other table (e.g. earlier predictions) are not measurements
            spots = replace(spots, table_key=None, table_rows=np.full(spots.n_spots, -1))
        if spots.n_spots == 0:
            where = (
                f"table.obs[{section_key!r}] == {name!r} matches no spot of sdata.shapes[{shapes_key!r}] (its rows' "
                "instance ids are not among the shapes' index)"
                if name in known
                else f"sdata.shapes[{name!r}] holds no spots"
            )
            raise ValueError(f"Section {name!r} has no spots: {where}. Leave it out of the call.")
        out[name] = Section(name=name, spots=spots, table=table if name in known else None)
    return out


def model_patch_settings(
    model, section: Section, size_um: float | None, context: Sequence[float] | None
) -> tuple[float, tuple[float, ...]]:
    """``(size_um, context)`` of a model's inputs with the defaults filled in (see `omx.pp._stream.patch_settings`).

    A feature model's encoder, or a patch model itself, with a native resolution (``mpp``) sees patches at it.
    """
    owner = model.encoder if model.input == "features" else model
    return patch_settings(owner, section.spots.diameter_um, size_um, context)


def model_inputs(
    section: Section,
    model,
    *,
    size_um: float | None,
    context: Sequence[float] | None = None,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """Features (feature models) or patches (patch models) for every spot of a section.

    Feature models get the encoder's features of patches ``size_um * c`` microns wide for each context
    factor ``c``, concatenated; patch models get one patch of ``model.patch_px`` pixels spanning the largest
    context, ``size_um * max(context)`` microns. Both are computed chunk by chunk (on the active dask.distributed
    cluster, if any) by `omx.pp.encode` and the chunks behind it.
    """
    size_um, context = model_patch_settings(model, section, size_um, context)
    return collect(input_chunks(section, model, size_um, context, show_progress_bar), section.spots.n_spots)


def input_chunks(section: Section, model, size_um: float, context: Sequence[float], show_progress_bar: bool):
    """``(positions, inputs)`` of a model, chunk by chunk: patches of a patch model, features of a feature model."""
    if model.input == "patches":
        sizes_um, size_px, encoder, what = [size_um * max(context)], model.patch_px, None, "patches"
    else:
        encoder = model.encoder
        sizes_um, size_px, what = [size_um * c for c in context], encoder.patch_px, f"{encoder.name} features"
    return iter_chunks(
        section.spots,
        sizes_um=sizes_um,
        size_px=size_px,
        encoder=encoder,
        show_progress_bar=show_progress_bar,
        desc=f"{section.name}: {what}",
    )


def counts(table: AnnData, rows: np.ndarray, *, layer: str | None = None):
    """Raw counts of ``rows`` (sparse or dense), checked for NaN and negative values."""
    X = table.layers[layer] if layer is not None else table.X
    if X is None:
        raise ValueError("The table has no counts in X; pass `layer=` naming the raw counts.")
    X = X[rows]
    where = f"table.layers[{layer!r}]" if layer is not None else "table.X"
    check_counts(X, name=f"counts in {where} ({len(rows)} spots)")
    data = X.data if sparse.issparse(X) else np.asarray(X)
    if data.size and not np.issubdtype(data.dtype, np.integer):
        sample = data[: 1 << 20]
        frac = sample[sample != np.round(sample)]
        if frac.size:
            raise ValueError(
                f"{where} holds non-integer values (e.g. {float(frac[0]):.4g}): it looks normalised or "
                "log-transformed, not raw counts. omx normalises counts itself (per training section); pass "
                "`layer=` naming the raw integer counts (e.g. `layer='counts'`)."
            )
    return X


def choose_genes(table: AnnData, genes: Sequence[str] | None, train_counts, *, n_top_genes: int | None) -> list[str]:
    """Genes to model: the requested ones (all must exist), else the training sections' genes.

    With ``genes=None`` the genes detected in at least 1 % of training spots are kept, and ``n_top_genes``
    keeps the most expressed of those (mean log-normalised expression over the training spots only).
    """
    var_names = table.var_names
    if genes is not None:
        genes = list(genes)
        if not genes:
            raise ValueError("genes=[] selects no gene; pass None to use the detected genes, or a non-empty list.")
        missing = [g for g in genes if g not in var_names]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(genes)} requested genes are not in the table, e.g. {missing[:10]}. "
                "Check the symbols (case, aliases) or drop them."
            )
        if len(set(genes)) != len(genes):
            raise ValueError("The requested genes hold duplicates; pass each gene once.")
        return genes
    detected = np.asarray((train_counts > 0).mean(axis=0)).ravel() >= 0.01
    chosen = var_names[detected]
    if n_top_genes is not None and n_top_genes < len(chosen):
        mean = log_normalize(train_counts).mean(axis=0)[detected]
        chosen = chosen[np.argsort(-mean, kind="stable")[:n_top_genes]]
    if len(chosen) == 0:
        raise ValueError("No gene is detected in the training sections; check the counts.")
    return list(chosen)


def targets(X, gene_idx: np.ndarray) -> np.ndarray:
    """log1p(counts / total * 1e4) of the chosen genes; the total is over all genes of the table."""
    return log_normalize(X, columns=gene_idx)


class SectionScaler:
    """Per-section standardisation of targets, fitted on training sections only.

    Library depth differs between sections (her2st: 15-fold), so pooled targets let the noisiest section
    dominate a loss. Each training section is centred and scaled per gene; predictions are mapped back to
    the average mean and spread of the training sections.
    """

    def __init__(self, mode: str = "section"):
        if mode not in ("section", "none"):
            raise ValueError(f"target_norm must be 'section' or 'none', got {mode!r}.")
        self.mode = mode

    def fit_transform(self, Y: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """Standardise ``Y`` within each group and remember the average statistics."""
        if self.mode == "none":
            self.mean_, self.std_ = np.zeros(Y.shape[1], np.float32), np.ones(Y.shape[1], np.float32)
            return Y
        out = np.empty_like(Y)
        means, stds = [], []
        for g in pd.unique(groups):
            m = groups == g
            mu, sd = Y[m].mean(axis=0), Y[m].std(axis=0)
            out[m] = (Y[m] - mu) / np.where(sd > 0, sd, 1.0)
            means.append(mu)
            stds.append(sd)
        self.mean_, self.std_ = np.mean(means, axis=0), np.mean(stds, axis=0)
        return out

    def inverse_transform(self, Z: np.ndarray) -> np.ndarray:
        """Map standardised predictions back to the log-normalised scale."""
        return (Z * self.std_ + self.mean_).astype(np.float32)


def split_sections(train, predict) -> tuple[list[str], list[str]]:
    """``train`` and ``predict`` as non-empty, disjoint lists: a model is never scored on its training data."""
    train, predict = as_list(train), as_list(predict)
    if not train or not predict:
        raise ValueError("Pass at least one section in `train=` and one in `predict=`.")
    if overlap := sorted(set(train) & set(predict)):
        raise ValueError(
            f"Sections {overlap} are in both `train` and `predict`; a model must not be scored on its training data."
        )
    return train, predict


def as_dense(X) -> np.ndarray:
    """Dense float array of a sparse or dense matrix."""
    return X.toarray() if sparse.issparse(X) else np.asarray(X)


def make_model(model, *, seed: int, device: str, show_progress_bar: bool) -> Model:
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
    inputs: Mapping[str, np.ndarray] | None = None,
    group_stats: Mapping[str, tuple[np.ndarray, np.ndarray, int]] | None = None,
) -> tuple[Model, np.ndarray]:
    """Fit ``model`` on the training sections; everything fitted here sees the training sections only.

    ``inputs`` gives the model's inputs of each training section (one row per spot) instead of computing them,
    and ``group_stats`` the feature statistics that standardise each section (`omx.models.Context`); super-resolution
    passes the mean features of each spot's finer units and the statistics of those units.

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
        raise ValueError(
            f"Fewer than 2 of {len(total)} training spots have at least min_counts={min_counts} counts (median "
            f"{float(np.median(total)) if len(total) else 0:g}). Pass a lower `min_counts=`, or train on larger units "
            "(Visium HD: `table_key='square_008um'` or `'square_016um'`)."
        )
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
    size_um, context = model_patch_settings(model, sections[train[0]], size_um, context)
    if inputs is None:
        inputs = {n: section_inputs(sections[n], model, size_um, context, show_progress_bar, cache) for n in train}
    inputs = np.concatenate([inputs[n] for n in train])[keep]
    coords = np.concatenate([sections[n].spots.centers * sections[n].spots.mpp for n in train])[keep]
    patients = [section_patients(table, sections[n]) for n in train]
    meta = {
        "genes": list(genes),
        "target_mean": scaler.mean_.tolist(),
        "target_std": scaler.std_.tolist(),
        "target_norm": "counts" if counts_model else target_norm,
        "target_scale": Key.TARGET_SCALE,
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
        group_stats=group_stats,
        meta=meta,
    )
    model.fit(inputs, Z, ctx)
    return model, train_var


def section_patients(table: AnnData | None, section: Section) -> np.ndarray | None:
    """The patient of each spot of a section, from ``table.obs["patient"]``; None where the table does not say.

    Spots without a table row take the patient of the section's other spots when those all share one.
    """
    if table is None or Key.PATIENT not in table.obs:
        return None
    rows = section.rows
    measured = rows >= 0
    if not measured.any():
        return None
    values = table.obs[Key.PATIENT].iloc[rows[measured]].astype(str).to_numpy()
    if measured.all():
        return values
    unique = pd.unique(values)
    return np.full(len(rows), str(unique[0]), dtype=object) if len(unique) == 1 else None


def section_inputs(section, model, size_um, context, show_progress_bar, cache) -> np.ndarray:
    """A model's inputs for a section, computed once.

    A feature model's features come from, in this order: ``cache`` (this call's memory), the table's ``obsm``
    written by `omx.pp.encode`, the feature store (``omx.settings.feature_store``), and else the encoder, whose
    features then go to the store when there is one.
    """
    patch_px = model.patch_px if model.input == "patches" else None
    key = (section.name, model.input, patch_px, size_um, tuple(context), encoder_id(model))
    if cache is not None and key in cache:
        return cache[key]
    out = stored_features(model, section, size_um, context) if model.input == "features" else None
    if out is None:
        out = model_inputs(section, model, size_um=size_um, context=context, show_progress_bar=show_progress_bar)
        if model.input == "features":
            from omx._settings import settings

            geo = geometry(model.encoder, size_um, context)
            if settings.feature_store is not None and geo["encoder"] is not None:
                write_to_store(settings.feature_store, section.spots, out, geo)
    if cache is not None:
        cache[key] = out
    return out


def encoder_id(model) -> str | None:
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
    """Predictions ``(n_spots, n_genes)`` on the log-normalised scale for one section, clipped at 0.

    Models that read the spots' coordinates (``"coords"`` in ``model.uses``), and sections whose inputs are
    cached, are predicted from the inputs of the whole section; the others stream (see `predict_stream`). With
    ``return_var``, also the predictive variance on that scale when the model provides one
    (``model.provides_variance``), else None. ``patients`` gives the patient of each spot (`section_patients`).
    """
    meta = model.meta_
    var = None
    size_um, context = meta["size_um"], meta["context"]
    stored = stored_features(model, section, size_um, context) if cache is None and model.input == "features" else None
    if "coords" in model.uses or cache is not None or stored is not None:
        if stored is not None:
            inputs = stored
        else:
            inputs = section_inputs(section, model, size_um, context, show_progress_bar, cache)
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
        Z = predict_stream(model, section, show_progress_bar=show_progress_bar, patients=patients)
    pred = (Z * np.asarray(meta["target_std"]) + np.asarray(meta["target_mean"])).astype(np.float32)
    np.maximum(pred, 0, out=pred)  # log1p of a non-negative expression is never negative
    return (pred, var) if return_var else pred


def stored_features(model: Model, section: Section, size_um: float, context: Sequence[float]) -> np.ndarray | None:
    """A feature model's features of a section from `omx.pp.encode`'s ``obsm`` or the feature store, else None."""
    from omx._settings import settings

    geo = geometry(model.encoder, size_um, context)
    found = find_in_table(section.table, section.spots, geo)
    return found if found is not None else find_in_store(settings.feature_store, section.spots, geo)


def predict_stream(
    model: Model, section: Section, *, show_progress_bar: bool, patients: np.ndarray | None = None
) -> np.ndarray:
    """Predict a section chunk by chunk, so memory does not grow with its inputs.

    Patch models predict each chunk of patches as it is cut. Feature models first write the features of all
    chunks to a zarr array on disk while summing their per-section statistics, then predict chunk by chunk with
    those statistics: the same predictions as from the whole section at once. The array is kept in the feature
    store (``omx.settings.feature_store``) when one is set and the encoder's features can be told from its
    parameters, so that later calls on the same spots do not encode them again; else it is temporary
    (``$TMPDIR``).
    """
    from omx._settings import settings

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

    geo = geometry(model.encoder, meta["size_um"], meta["context"])
    keep = settings.feature_store is not None and geo["encoder"] is not None
    with tempfile.TemporaryDirectory(prefix="omx_features_") as tmp:
        store, written, moments, start = None, [], Moments(), 0
        for positions, feats in chunks:
            if store is None and keep:  # rows in the order of the spots, as `find_in_store` returns them
                store = create_in_store(settings.feature_store, section.spots, feats.shape[1], geo, chunk_rows=4096)
            elif store is None:  # rows in the order the chunks come
                store = zarr.create_array(
                    f"{tmp}/features.zarr", shape=(n, feats.shape[1]), chunks=(4096, feats.shape[1]), dtype="f4"
                )
            rows = np.asarray(positions) if keep else slice(start, start + len(positions))
            if keep:
                store.oindex[rows] = feats
            else:
                store[rows] = feats
            moments.add(feats)
            written.append((rows, positions))
            start += len(positions)
        stats = {section.name: moments.result()}
        for rows, positions in written:
            X = store.oindex[rows] if keep else store[rows]
            out[positions] = model.predict(X, chunk_context(positions, stats))
        if keep and store is not None:
            mark_complete(store, Path(settings.feature_store) / store_name(section.spots, geo))
    return out


class Moments:
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


def score_section(
    table: AnnData, section: Section, genes: list[str], pred: np.ndarray, layer: str | None, min_counts: int
):

    X = counts(table, section.rows, layer=layer)
    ok = np.asarray(X.sum(axis=1)).ravel() >= min_counts
    y = targets(X, table.var_names.get_indexer(genes))
    return gene_scores(y[ok], pred[ok], genes)


def prediction_entry(function: str, model: Model, params: dict) -> dict:
    """The ``uns["omx"][key]`` entry of predictions: the call's parameters, the model, genes and data settings."""
    meta = model.meta_
    return base_entry(
        function,
        params,
        model=model_entry(model),
        genes=list(meta["genes"]),
        target_scale=meta["target_scale"],
        fit={k: v for k, v in meta.items() if k not in ("genes", "target_mean", "target_std", "target_scale")},
        summary={},
    )


def written_keys(model: Model, key_added: str) -> list[str]:
    """The layers a prediction ``key_added`` of ``model`` writes."""
    return [key_added, Key.variance(key_added)] if model.provides_variance else [key_added]


def prediction_table(sections: list[Section], genes, preds: list, *, key_added: str, uns: dict) -> AnnData:
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
    adata.uns[Key.UNS] = {key_added: {**uns, "written": ["X"]}}
    adata.uns[Key.TABLE_MARK] = "predictions"
    regions = [s.spots.shapes_key for s in sections]
    return TableModel.parse(adata, region=regions, region_key="region", instance_key="spot_id")
