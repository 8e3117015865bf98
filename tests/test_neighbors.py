import numpy as np
import pytest
from scipy import sparse

from omx.models._neighbors import median_spacing, nearest, neighbour_matrix, propagate, spatial_graph


def _grid(side, step=100.0):
    return np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(float) * step


def test_propagate_equals_hand_computation():
    # a path 0 - 1 - 2 and a lone spot 3 (no neighbours)
    A = sparse.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], float))
    P0 = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    a = 0.4
    mean = np.array([[0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 1, 0, 0], [0, 0, 0, 0]])  # mean over the neighbours
    P1 = (1 - a) * P0 + a * mean @ P0
    P2 = (1 - a) * P0 + a * mean @ P1
    np.testing.assert_allclose(propagate(P0, A, a, n_layers=2), P2)
    np.testing.assert_allclose(propagate(P0, A, a, n_layers=1), P1)
    # spot 1 by hand after one round: 0.6 * p0 + 0.4 * (p0[0] + p0[2]) / 2
    np.testing.assert_allclose(propagate(P0, A, a, n_layers=1)[1], 0.6 * P0[1] + 0.2 * (P0[0] + P0[2]))
    np.testing.assert_allclose(propagate(P0, A, a, n_layers=2)[3], 0.6 * P0[3])  # no neighbours: (1 - a) * p0
    assert propagate(P0, A, 0.0) is P0 and propagate(P0, A, a, n_layers=0) is P0


def test_nearest_stays_within_group_and_distance():
    rng = np.random.default_rng(0)
    coords = np.concatenate([_grid(6), _grid(6) + rng.normal(0, 1, (36, 2)), _grid(3)])  # sections overlap in space
    groups = np.repeat(["a", "b", "c"], [36, 36, 9])
    index, mask = nearest(coords, groups, 4)
    assert index.shape == mask.shape == (81, 4)
    rows = np.repeat(np.arange(81)[:, None], 4, 1)
    assert (groups[index[mask]] == groups[rows[mask]]).all()  # never a spot of another section
    assert (index[mask] != rows[mask]).all() and (index[~mask] == rows[~mask]).all()
    dist = np.linalg.norm(coords[index] - coords[:, None], axis=-1)
    assert (dist[mask] <= 2.5 * 100.0 + 5).all()
    assert mask[:36].sum(1).min() == 4  # on a grid every spot has 4 neighbours within 2.5 spacings
    np.testing.assert_allclose(dist[7, :4], 100.0)  # an inner spot: its 4 direct neighbours, nearest first
    far = coords.copy()
    far[0] += 1e4  # one spot far from its section: no valid neighbour
    _, mask = nearest(far, groups, 4)
    assert not mask[0].any()
    M = neighbour_matrix(index, mask, np.arange(36, 81))
    assert M.shape == (45, 45) and M[:36, 36:].nnz == 0 and M[36:, :36].nnz == 0


@pytest.mark.parametrize("kind", ["knn", "radius", "delaunay"])
def test_spatial_graph_is_symmetric_and_block_diagonal(kind):
    coords = np.concatenate([_grid(5), _grid(5)])
    groups = np.repeat(["a", "b"], 25)
    adj = spatial_graph(coords, groups, kind=kind, n_neighbors=4, radius=150.0)
    assert (adj != adj.T).nnz == 0 and adj.diagonal().sum() == 50
    assert adj[:25, 25:].nnz == 0 and adj[25:, :25].nnz == 0
    bare = spatial_graph(coords, groups, kind=kind, n_neighbors=4, radius=150.0, self_loops=False)
    assert bare.diagonal().sum() == 0 and ((adj - sparse.identity(50)) != bare).nnz == 0
    assert median_spacing(coords[:25]) == pytest.approx(100.0)
