"""log1p(counts / total * 1e4): omx's own, checked against the formula and against scanpy."""

import warnings

import numpy as np
import pytest
from scipy import sparse

from omx import _utils
from omx._utils import log_normalize


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    X = rng.poisson(0.8, size=(300, 120)).astype(np.float32)
    X[7] = 0  # a spot with no counts
    return X


def test_log_normalize_known_answer():
    X = np.array([[1, 3, 0, 6], [0, 0, 0, 0], [5, 0, 5, 0]])
    expected = np.log1p(np.array([[1e3, 3e3, 0, 6e3], [0, 0, 0, 0], [5e3, 0, 5e3, 0]])).astype(np.float32)
    np.testing.assert_array_equal(log_normalize(X), expected)
    np.testing.assert_array_equal(log_normalize(sparse.csr_matrix(X), columns=[3, 0]), expected[:, [3, 0]])
    ten = np.log1p([[1.0], [0], [5]]).astype(np.float32)
    np.testing.assert_array_equal(log_normalize(X, target_sum=10.0, columns=slice(0, 1)), ten)


@pytest.mark.parametrize("kind", ["dense", "csr", "csc", "int"])
@pytest.mark.parametrize("columns", [None, "positions", "mask"])
def test_log_normalize_in_blocks_is_the_formula(counts, kind, columns, monkeypatch):
    cols = {"None": None, "positions": np.arange(0, 120, 7), "mask": np.arange(120) % 3 == 0}[str(columns)]
    total = counts.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore"):
        scale = np.where(total > 0, 1e4 / total, 0.0)
    expected = np.log1p(counts.astype(np.float64) * scale).astype(np.float32)
    expected = expected if cols is None else expected[:, cols]
    X = {"dense": counts, "csr": sparse.csr_matrix(counts), "csc": sparse.csc_matrix(counts),
         "int": counts.astype(np.int64)}[kind]  # fmt: skip
    monkeypatch.setattr(_utils, "_LOG_NORMALIZE_CHUNK", 500)  # 4 to 125 rows at a time
    out = log_normalize(X, columns=cols)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert not out[7].any()


def test_log_normalize_agrees_with_scanpy(counts):
    sc = pytest.importorskip("scanpy")
    import anndata as ad

    adata = ad.AnnData(sparse.csr_matrix(counts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Some cells have zero counts": spot 7, on purpose
        sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    cols = np.arange(0, 120, 5)
    np.testing.assert_allclose(log_normalize(counts, columns=cols), adata.X[:, cols].toarray(), rtol=0, atol=1e-6)
