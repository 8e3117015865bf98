"""Property-based tests (hypothesis) of gene lists and count normalisation."""

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from omx._utils import check_counts, log_normalize
from omx.tl._engine import choose_genes

GENES = [f"g{i}" for i in range(8)]
TABLE = AnnData(X=np.ones((3, len(GENES)), dtype=np.float32), var=pd.DataFrame(index=GENES))


@settings(deadline=None, max_examples=25)
@given(st.lists(st.sampled_from([*GENES, "nope", "G0"]), max_size=10))
def test_choose_genes_is_the_request_or_a_clear_error(genes):
    if not genes:
        with pytest.raises(ValueError, match="selects no gene"):
            choose_genes(TABLE, genes, TABLE.X, n_top_genes=None)
    elif any(g not in GENES for g in genes):
        with pytest.raises(KeyError, match="not in the table"):
            choose_genes(TABLE, genes, TABLE.X, n_top_genes=None)
    elif len(set(genes)) != len(genes):
        with pytest.raises(ValueError, match="duplicates"):
            choose_genes(TABLE, genes, TABLE.X, n_top_genes=None)
    else:
        assert choose_genes(TABLE, genes, TABLE.X, n_top_genes=None) == genes


counts = arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 1000))


@settings(deadline=None, max_examples=25)
@given(counts)
def test_log_normalize_rows_sum_to_target(X):
    out = log_normalize(X)
    assert out.shape == X.shape and out.dtype == np.float32 and np.isfinite(out).all() and (out >= 0).all()
    total = X.sum(1)
    np.testing.assert_allclose(np.expm1(out.astype(np.float64)).sum(1)[total > 0], 1e4, rtol=1e-3)
    assert (out[total == 0] == 0).all()


@settings(deadline=None, max_examples=25)
@given(counts, st.sampled_from([np.nan, np.inf, -1.0]), st.data())
def test_check_counts_refuses_bad_values(X, bad, data):
    check_counts(X)
    i = data.draw(st.integers(0, X.shape[0] - 1))
    j = data.draw(st.integers(0, X.shape[1] - 1))
    X = X.copy()
    X[i, j] = bad
    with pytest.raises(ValueError):
        check_counts(X)
