import json

import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

from omx import metrics


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(60, 7))
    p = 0.5 * y + rng.normal(size=y.shape)
    return y, p


def test_pearson_matches_numpy(pair):
    y, p = pair
    expected = [np.corrcoef(y[:, j], p[:, j])[0, 1] for j in range(y.shape[1])]
    np.testing.assert_allclose(metrics.pearson(y, p), expected, rtol=1e-10)


@pytest.mark.parametrize("block", [None, 100, 1])  # all genes at once, 2 genes, 1 gene at a time
def test_spearman_matches_scipy_with_ties(block, monkeypatch):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=(50, 5)).astype(float)  # many ties
    p = y + rng.integers(0, 3, size=y.shape)
    y[:, 3] = 2.0  # constant: NaN
    p[7, 4] = np.nan  # a NaN: NaN
    if block is not None:
        monkeypatch.setattr(metrics, "_SPEARMAN_BLOCK", block)
    expected = [stats.spearmanr(y[:, j], p[:, j]).statistic for j in range(3)]
    r = metrics.spearman(y, p)
    np.testing.assert_allclose(r[:3], expected, rtol=1e-10)
    assert np.isnan(r[3:]).all()


def test_mse_and_ccc_against_formulas(pair):
    y, p = pair
    np.testing.assert_allclose(metrics.mse(y, p), ((y - p) ** 2).mean(axis=0))
    for j in range(y.shape[1]):
        t, q = y[:, j], p[:, j]
        expected = 2 * np.cov(t, q, ddof=0)[0, 1] / (t.var() + q.var() + (t.mean() - q.mean()) ** 2)
        assert metrics.ccc(y, p)[j] == pytest.approx(expected)


def test_ccc_penalises_shift_and_scale_but_pearson_does_not(pair):
    y, _ = pair
    np.testing.assert_allclose(metrics.ccc(y, y), 1.0)
    np.testing.assert_allclose(metrics.pearson(y, 2 * y + 3), 1.0)
    assert np.all(metrics.ccc(y, 2 * y + 3) < 0.5)
    np.testing.assert_allclose(metrics.mse(y, y), 0.0)


def test_constant_genes_are_nan_for_correlations_only():
    y = np.array([[1.0, 0.0, 2.0], [2.0, 0.0, 2.0], [3.0, 0.0, 5.0], [4.0, 0.0, 1.0]])
    p = np.array([[1.0, 1.0, 7.0], [2.0, 2.0, 7.0], [2.0, 3.0, 7.0], [5.0, 4.0, 7.0]])
    for f in (metrics.pearson, metrics.spearman, metrics.ccc):
        r = f(y, p)
        assert np.isfinite(r[0])
        assert np.isnan(r[1])  # constant in y_true
        assert np.isnan(r[2])  # constant in y_pred
    assert np.all(np.isfinite(metrics.mse(y, p)))


def test_one_gene_sparse_and_bad_shapes(pair):
    y, p = pair
    assert isinstance(metrics.pearson(y[:, 0], p[:, 0]), float)
    assert metrics.pearson(y[:, 0], p[:, 0]) == pytest.approx(metrics.pearson(y, p)[0])
    counts = np.random.default_rng(2).poisson(1, size=(30, 4)).astype(float)
    np.testing.assert_allclose(metrics.pearson(sparse.csr_matrix(counts), counts + 1), 1.0)
    with pytest.raises(ValueError, match="same spots"):
        metrics.pearson(y, p[:-1])


def test_gene_scores_frame(pair):
    y, p = pair
    genes = [f"g{i}" for i in range(y.shape[1])]
    df = metrics.gene_scores(y, p, genes)
    assert list(df.columns) == ["pearson", "spearman", "mse", "ccc", "mean_true"]
    assert list(df.index) == genes and df.index.name == "gene"
    np.testing.assert_allclose(df["mean_true"], y.mean(axis=0))
    np.testing.assert_allclose(df["pearson"], metrics.pearson(y, p))
    with pytest.raises(ValueError, match="one name per column"):
        metrics.gene_scores(y, p, genes[:-1])


def test_summarize_subsets_and_counts():
    scores = pd.DataFrame(
        {
            "pearson": [0.9, 0.8, np.nan, 0.1, 0.0],
            "spearman": [0.9, 0.8, np.nan, 0.1, 0.0],
            "mse": [1.0, 2.0, 3.0, 4.0, 5.0],
            "ccc": [0.5, 0.5, np.nan, 0.5, 0.5],
            "mean_true": [0.1, 5.0, 4.0, 3.0, 0.2],
        },
        index=pd.Index(["a", "b", "c", "d", "e"], name="gene"),
    )
    # the training variance ranks a and e highest, which the test data could not tell
    y_train_var = pd.Series({"a": 9.0, "b": 0.1, "c": 0.2, "d": 0.3, "e": 8.0, "unused": 100.0})
    s = metrics.summarize(scores, y_train_var=y_train_var, top_n=2)
    assert s["all"]["n_genes"] == 5
    assert s["all"]["pearson"] == pytest.approx(np.mean([0.9, 0.8, 0.1, 0.0]))
    assert s["all"]["n_pearson"] == 4 and s["all"]["n_mse"] == 5
    # top expressed: b (5.0) and c (4.0); c is NaN for pearson
    assert s["top_expressed"]["n_genes"] == 2
    assert s["top_expressed"]["pearson"] == pytest.approx(0.8) and s["top_expressed"]["n_pearson"] == 1
    assert s["top_expressed"]["mse"] == pytest.approx(2.5)
    # top variable on the training sections: a and e
    assert s["top_variable"]["pearson"] == pytest.approx(0.45)
    assert s["top_variable"]["mse"] == pytest.approx(3.0)
    json.dumps(s)  # plain numbers, storable in uns
    assert "top_variable" not in metrics.summarize(scores, top_n=2)


def test_summarize_all_nan_and_errors():
    scores = pd.DataFrame({"gene": ["a", "b"], "pearson": [np.nan, np.nan], "mean_true": [1.0, 2.0]})
    s = metrics.summarize(scores)
    assert np.isnan(s["all"]["pearson"]) and s["all"]["n_pearson"] == 0
    assert s["top_expressed"]["n_genes"] == 2  # top_n larger than the panel: all genes
    with pytest.raises(ValueError, match="no value for 1 scored genes"):
        metrics.summarize(scores, y_train_var=pd.Series({"a": 1.0}))
    with pytest.raises(ValueError, match="mean_true"):
        metrics.summarize(scores.drop(columns="mean_true"))
    with pytest.raises(TypeError):
        metrics.summarize({"pearson": [1.0]})


def test_end_to_end_random_predictions_score_near_zero():
    rng = np.random.default_rng(3)
    y = rng.poisson(5, size=(400, 50)).astype(float)
    df = metrics.gene_scores(y, rng.normal(size=y.shape), [f"g{i}" for i in range(50)])
    assert abs(metrics.summarize(df)["all"]["pearson"]) < 0.05
