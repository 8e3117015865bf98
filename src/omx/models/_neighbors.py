"""Neighbouring spots within each section, their graph, and propagation of predictions over it (APPNP).

One module for every spatial model: `GraphRidge` and `SpatialGraph` build their spot graph with `spatial_graph`,
`Contrastive` attends to and propagates over each spot's `nearest` spots, and all propagate with `propagate`. No
graph ever joins two groups (sections).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from scipy import sparse

#: Graph kinds accepted by `spatial_graph` (and the graph models' ``graph=``).
GRAPHS = ("knn", "radius", "delaunay")
#: Shares of a spot's propagated prediction that come from its neighbours, searched by cross-validation.
PROPAGATION_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
#: `nearest` keeps neighbours within this many median spot spacings of their section.
MAX_SPACINGS = 2.5


def group_rows(groups: np.ndarray | None, n: int) -> Iterator[tuple[object, np.ndarray]]:
    """``(label, row indices)`` of each group in sorted label order; ``groups=None`` is one group ``"all"``."""
    if groups is None:
        yield "all", np.arange(n)
        return
    labels, inverse = np.unique(groups, return_inverse=True)
    for k, label in enumerate(labels):
        yield label, np.flatnonzero(inverse == k)


def median_spacing(coords: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot (1 when undefined)."""
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    spacing = float(np.median(dist[:, 1]))
    return spacing if spacing > 0 else 1.0


def nearest(coords: np.ndarray, groups: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest spots of each spot in its group, within `MAX_SPACINGS` median spot spacings.

    Parameters
    ----------
    coords
        Spot centres ``(n, 2)``.
    groups
        Group (section) of each spot, or None for one group.
    k
        Neighbours per spot (fewer valid ones in a small group or at the tissue's edge).

    Returns
    -------
    Neighbour indices ``(n, k)``, nearest first (a spot's own index where there is none), and the mask of valid
    neighbours ``(n, k)``.
    """
    from scipy.spatial import cKDTree

    n = len(coords)
    index = np.tile(np.arange(n)[:, None], (1, k))
    mask = np.zeros((n, k), bool)
    for _, rows in group_rows(groups, n):
        if len(rows) < 2:
            continue
        m = min(k + 1, len(rows))
        dist, nn = cKDTree(coords[rows]).query(coords[rows], k=m)
        spacing = np.median(dist[:, 1])
        dist, nn = dist[:, 1:], nn[:, 1:]
        ok = dist <= MAX_SPACINGS * spacing
        index[rows, : m - 1] = np.where(ok, rows[nn], rows[:, None])
        mask[rows, : m - 1] = ok
    return index, mask


def neighbour_matrix(index: np.ndarray, mask: np.ndarray, rows: np.ndarray | None = None) -> sparse.csr_matrix:
    """Sparse ``(m, m)`` matrix marking the valid neighbours (`nearest`'s output) of ``rows`` among ``rows``.

    ``rows=None`` takes every row; neighbours outside ``rows`` are dropped.
    """
    rows = np.arange(len(index)) if rows is None else np.asarray(rows)
    local = np.full(len(index), -1)
    local[rows] = np.arange(len(rows))
    cols = local[index[rows]]
    keep = mask[rows] & (cols >= 0)
    i = np.repeat(np.arange(len(rows)), keep.sum(1))
    return sparse.csr_matrix((np.ones(len(i)), (i, cols[keep])), shape=(len(rows), len(rows)))


def spatial_graph(
    coords: np.ndarray,
    groups: np.ndarray | None,
    *,
    kind: str = "knn",
    n_neighbors: int = 6,
    radius: float | None = None,
    self_loops: bool = True,
) -> sparse.csr_matrix:
    """Symmetric adjacency of the spots, block diagonal over groups (one squidpy graph per group).

    Parameters
    ----------
    coords
        Spot centres ``(n, 2)`` in microns.
    groups
        Group (section) of each spot, or None for one group.
    kind
        ``"knn"`` (`squidpy.gr.spatial_neighbors_knn`, the `n_neighbors` nearest spots, fewer in a smaller group),
        ``"radius"`` (all spots within `radius`) or ``"delaunay"`` (triangulation, cut at `radius` when given).
    n_neighbors
        Neighbours per spot for ``kind="knn"``.
    radius
        Radius in microns for ``"radius"`` (required) and ``"delaunay"`` (optional).
    self_loops
        Link every spot to itself too.

    Returns
    -------
    CSR ``(n, n)`` float32 matrix of ones on the edges.

    Raises
    ------
    ValueError
        When a group has one spot (or fewer than 3 for Delaunay), or a spot has no neighbour.
    """
    import anndata as ad
    import squidpy as sq
    from spatialdata._logging import logger as sd_logger  # squidpy logs each graph through it

    check_graph(kind, n_neighbors, radius)
    n = len(coords)
    ri, ci = [], []
    for label, rows in group_rows(groups, n):
        if len(rows) < 2:
            raise ValueError(
                f"Section {str(label)!r} has one spot; a spatial graph needs at least 2 spots per section. "
                "Drop that section or pass it together with its neighbours."
            )
        adata = ad.AnnData(obs={"i": np.arange(len(rows))})
        adata.obsm["spatial"] = coords[rows]
        with warnings.catch_warnings(), _quiet(sd_logger):
            warnings.simplefilter("ignore")
            if kind == "knn":
                sq.gr.spatial_neighbors_knn(adata, n_neighs=min(n_neighbors, len(rows) - 1))
            elif kind == "radius":
                sq.gr.spatial_neighbors_radius(adata, radius=radius)
            else:
                if len(rows) < 3:
                    raise ValueError(f"Section {str(label)!r} has {len(rows)} spots; Delaunay needs 3 or more.")
                try:
                    sq.gr.spatial_neighbors_delaunay(adata, radius=radius)
                except Exception as err:  # noqa: BLE001 - qhull raises its own error types
                    raise ValueError(f"Delaunay triangulation of section {str(label)!r} failed: {err}") from err
        A = sparse.csr_matrix(adata.obsp["spatial_connectivities"])
        A = (A + A.T).tocsr()
        A.setdiag(0)
        A.eliminate_zeros()
        isolated = np.flatnonzero(np.diff(A.indptr) == 0)
        if len(isolated):
            raise ValueError(
                f"{len(isolated)} of {len(rows)} spots of section {str(label)!r} have no neighbour "
                f"(graph={kind!r}, radius={radius}), e.g. rows {rows[isolated[:5]].tolist()}. Use a larger `radius` "
                f"(the median nearest-neighbour distance is {median_spacing(coords[rows]):.3g} microns) or "
                "graph='knn' with `n_neighbors`."
            )
        coo = A.tocoo()
        ri.append(rows[coo.row])
        ci.append(rows[coo.col])
    if self_loops:
        ri.append(np.arange(n))
        ci.append(np.arange(n))
    ri, ci = np.concatenate(ri), np.concatenate(ci)
    adj = sparse.csr_matrix((np.ones(len(ri), dtype=np.float32), (ri, ci)), shape=(n, n))
    adj.data[:] = 1.0
    return adj


def check_graph(kind: str, n_neighbors: int, radius: float | None) -> None:
    """Raise a clear error for a bad graph kind, neighbour count or radius (the graph models' constructors)."""
    if kind not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {kind!r}.")
    if kind == "radius" and (radius is None or radius <= 0):
        raise ValueError("graph='radius' needs `radius=` (microns, > 0), e.g. 1.5 x the spot spacing.")
    if radius is not None and radius <= 0:
        raise ValueError(f"radius must be > 0 microns, got {radius}.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")


def propagate(P0: np.ndarray, neighbours: sparse.spmatrix, share: float, n_layers: int = 2) -> np.ndarray:
    """`n_layers` rounds of ``p <- (1 - share) * p0 + share * (mean of the neighbours' p)`` (personalised PageRank).

    APPNP (Gasteiger et al., ICLR 2019) applied to predictions.

    Parameters
    ----------
    P0
        Predictions ``(n, g)``.
    neighbours
        ``(n, n)`` matrix whose nonzero entries mark each row's neighbours (their weights are averaged; a row
        without neighbours keeps ``(1 - share) * p0``).
    share
        Share of each round's prediction that comes from the neighbours.
    n_layers
        Rounds of propagation.

    Returns
    -------
    The propagated predictions (``P0`` itself when ``share`` or ``n_layers`` is 0).
    """
    if share == 0 or n_layers == 0:
        return P0
    A = sparse.csr_matrix(neighbours, dtype=np.float64)
    A = sparse.diags(1.0 / np.maximum(np.asarray(A.sum(1)).ravel(), 1.0)) @ A
    P = P0
    for _ in range(n_layers):
        P = (1.0 - share) * P0 + share * (A @ P)
    return P


@contextmanager
def _quiet(log: logging.Logger):
    """Raise a logger's level to WARNING for the duration of the block."""
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
