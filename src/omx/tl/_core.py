"""What the front doors share: sections of a table, model inputs, targets, gene choice, scoring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData

from omx._utils import as_list, check_counts, log_normalize, logger
from omx._utils import resolve_table as resolve_table  # the front doors import it from here
from omx.pp import Spots, resolve_spots
from omx.pp._spots import table_regions
from omx.pp._stream import collect, iter_chunks

#: Patch sizes, as multiples of the spot size, whose features feature models concatenate.
DEFAULT_CONTEXT = (1.0, 2.0, 3.0)
#: Obs columns naming each spot's section and patient (as `omx.io` and `omx.datasets` write them).
SECTION_KEY = "section"
PATIENT_KEY = "patient"
#: Scale of every prediction omx writes: log1p(counts / total * 1e4).
TARGET_SCALE = "log1p(counts / total * 1e4)"


@dataclass
class Section:
    """One section: its spots in image pixels and, where measured, their table rows."""

    name: str
    spots: Spots

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
    groups_key: str,
    image_key: str | None = None,
    mpp: float | None = None,
    role: str = "",
) -> dict[str, Section]:
    """Resolve sections by name: a value of ``table.obs[groups_key]``, or a shapes element with no measurement."""
    table = sdata.tables[table_key]
    _, region_key, _ = table_regions(table)
    if groups_key not in table.obs:
        raise KeyError(f"Table {table_key!r} has no obs column {groups_key!r}; pass `section_key=` naming sections.")
    labels = table.obs[groups_key].astype(str).to_numpy()
    known = pd.unique(labels).tolist()
    out = {}
    for name in names:
        if name in known:
            regions = pd.unique(table.obs[region_key].to_numpy()[labels == name]).tolist()
            if len(regions) != 1:
                raise ValueError(f"Section {name!r} spans several shapes elements {regions}; give each section one.")
            shapes_key = str(regions[0])
        elif name in sdata.shapes:
            shapes_key = name
        else:
            raise KeyError(
                f"{role.capitalize()} section {name!r} is neither a value of table.obs[{groups_key!r}] ({known}) "
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
        out[name] = Section(name=name, spots=spots)
    return out


def model_inputs(
    section: Section,
    model,
    *,
    size_um: float | None,
    context: Sequence[float] = DEFAULT_CONTEXT,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """Features (feature models) or patches (patch models) for every spot of a section.

    Feature models get the encoder's features of patches ``size_um * c`` microns wide for each context
    factor ``c``, concatenated; patch models get one patch of ``model.patch_px`` pixels spanning the largest
    context, ``size_um * max(context)`` microns. Both are computed chunk by chunk (on the active dask.distributed
    cluster, if any) by `omx.pp.encode` and the chunks behind it.
    """
    size_um = section.spots.diameter_um if size_um is None else size_um
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
    check_counts(X, name=f"counts of {len(rows)} spots")
    return X


def choose_genes(table: AnnData, genes: Sequence[str] | None, train_counts, *, n_top_genes: int | None) -> list[str]:
    """Genes to model: the requested ones (all must exist), else the training sections' genes.

    With ``genes=None`` the genes detected in at least 1 % of training spots are kept, and ``n_top_genes``
    keeps the most expressed of those (mean log-normalised expression over the training spots only).
    """
    var_names = table.var_names
    if genes is not None:
        genes = list(genes)
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


def check_key_free(table: AnnData, key_added: str, *, overwrite: bool, where: str = "layers") -> None:
    """Refuse to overwrite an existing result unless ``overwrite=True``."""
    taken = key_added in getattr(table, where) or key_added in table.uns.get("omx", {})
    if taken and not overwrite:
        raise KeyError(
            f"{key_added!r} already holds results in this table ({where} or uns['omx']). "
            "Pass another `key_added=` or `overwrite=True` to replace them."
        )


def log_written(n: int, g: int, where: str) -> None:
    """Log what was written, scanpy style."""
    logger.info("Added %d spots x %d genes to %s", n, g, where)


def as_dense(X) -> np.ndarray:
    """Dense float array of a sparse or dense matrix."""
    return X.toarray() if sparse.issparse(X) else np.asarray(X)
