"""Signatures from a single-cell reference: the negative-binomial model with batches (omx.models._signatures)."""

import logging

import numpy as np
import pytest
from scipy import sparse

from omx.models._signatures import SignatureFit, fit_signatures

DISPERSION = 5.0


def simulate(n_cells=3000, n_genes=200, n_types=5, uneven=True, seed=0):
    """Cells of known signatures in two batches with known detection and per-gene effects.

    With ``uneven``, 85% of each type's cells sit in one batch (types 0, 2, 4 in the first, 1, 3 in the second), so
    a per-type mean mixes type and batch. Returns ``(counts, labels, batches, S, detection, batch_effects)``; the
    truth follows the fit's conventions: detection and batch effects have geometric mean 1.
    """
    rng = np.random.default_rng(seed)
    S = rng.lognormal(-1.0, 1.2, (n_types, n_genes))
    log_b = rng.normal(0.0, 0.5, (2, n_genes))
    log_b -= log_b.mean(0, keepdims=True)
    log_b -= log_b.mean(1, keepdims=True)
    detect = np.array([0.5, 2.0])
    k = rng.integers(0, n_types, n_cells)
    if uneven:
        b = np.where(rng.random(n_cells) < 0.85, k % 2, rng.integers(0, 2, n_cells))
    else:
        b = rng.integers(0, 2, n_cells)
    mu = detect[b][:, None] * S[k] * np.exp(log_b[b])
    y = rng.poisson(rng.gamma(DISPERSION, mu / DISPERSION))
    labels = np.array([f"t{i}" for i in k])
    batches = np.array([f"b{i}" for i in b])
    return sparse.csr_matrix(y), labels, batches, S, detect, np.exp(log_b)


def log_rmse(est, truth, mask):
    return float(np.sqrt(np.mean((np.log(est[mask]) - np.log(truth[mask])) ** 2)))


@pytest.fixture(scope="module")
def data():
    return simulate()


@pytest.fixture(scope="module")
def fit(data):
    X, labels, batches, *_ = data
    return fit_signatures(X, labels, batches=batches)


def test_batches_recovers_signatures_the_per_type_mean_is_biased(data, fit):
    X, labels, batches, S, detect, batch_effects = data
    naive = fit_signatures(X, labels)
    ok = S > 0.05
    # types unevenly spread over batches with a 4-fold detection difference: the per-type mean is off by ~e^0.6
    assert log_rmse(naive.signatures, S, ok) > 0.4
    assert log_rmse(fit.signatures, S, ok) < 0.15
    assert log_rmse(fit.signatures, S, ok) < log_rmse(naive.signatures, S, ok) / 3
    assert np.corrcoef(np.log(fit.signatures[ok]), np.log(S[ok]))[0, 1] > 0.95
    # the log ratio between types (what deconvolution uses) is right too; the naive one carries the batch effect
    ratio = lambda A: np.log(A[0, ok[0] & ok[1]]) - np.log(A[1, ok[0] & ok[1]])
    assert np.corrcoef(ratio(fit.signatures), ratio(S))[0, 1] > 0.95
    assert np.abs(ratio(fit.signatures) - ratio(S)).mean() < np.abs(ratio(naive.signatures) - ratio(S)).mean() / 3
    np.testing.assert_allclose(fit.detection, detect, rtol=0.05)
    assert np.corrcoef(np.log(fit.batch_effects).ravel(), np.log(batch_effects).ravel())[0, 1] > 0.95


def test_fields_and_conventions(data, fit):
    X, labels, batches, S, *_ = data
    assert isinstance(fit, SignatureFit) and fit.converged
    assert fit.types == [f"t{i}" for i in range(5)] and fit.batches == ["b0", "b1"]
    assert fit.signatures.shape == fit.log_se.shape == (5, 200) and fit.signatures.dtype == np.float64
    assert fit.dispersion.shape == (200,) and fit.batch_effects.shape == (2, 200) and fit.detection.shape == (2,)
    np.testing.assert_array_equal(fit.genes, np.arange(200))
    np.testing.assert_array_equal(fit.n_cells, np.bincount([int(t[1:]) for t in labels]))
    # identifiability: detection and batch effects have geometric mean 1 (over batches, and over genes)
    assert abs(np.log(fit.detection).mean()) < 1e-10
    np.testing.assert_allclose(np.log(fit.batch_effects).mean(1), 0, atol=1e-10)
    np.testing.assert_allclose(np.log(fit.batch_effects).mean(0), 0, atol=1e-4)


def test_without_batches_the_signatures_are_the_per_type_means(data):
    X, labels, *_ = data
    dense = X.toarray()
    means = np.stack([dense[labels == f"t{i}"].mean(0) for i in range(5)])
    fit = fit_signatures(X, labels)
    np.testing.assert_allclose(fit.signatures, means, rtol=1e-12)
    assert fit.batches is None and fit.detection is None and fit.batch_effects is None
    # one batch named for every cell is the same model
    one = fit_signatures(X, labels, batches=np.full(len(labels), "only"))
    np.testing.assert_allclose(one.signatures, means, rtol=1e-12)
    np.testing.assert_allclose(one.detection, [1.0])
    np.testing.assert_allclose(one.batch_effects, 1.0)


def test_dispersion_recovered(fit):
    r = fit.dispersion
    assert DISPERSION / 1.25 < np.median(r) < DISPERSION * 1.25
    assert np.mean((r > DISPERSION / 2) & (r < DISPERSION * 2)) > 0.8


def test_standard_errors_are_calibrated(data, fit):
    S = data[3]
    ok = S > 0.05
    z = (np.log(fit.signatures[ok]) - np.log(S[ok])) / fit.log_se[ok]
    assert 0.75 < z.std() < 1.3 and abs(z.mean()) < 0.2
    # fewer cells, larger errors
    rare = fit_signatures(data[0][:600], data[1][:600], batches=data[2][:600])
    assert np.median(rare.log_se[ok]) > 2 * np.median(fit.log_se[ok])


def test_a_type_without_counts_of_a_gene_has_signature_zero(data):
    X, labels, batches, *_ = data
    X = X.tolil()
    X[np.flatnonzero(labels == "t2"), 7] = 0
    fit = fit_signatures(X.tocsr(), labels, batches=batches)
    assert fit.signatures[2, 7] == 0 and fit.log_se[2, 7] == np.inf
    assert np.isfinite(np.delete(fit.signatures, 2, axis=0)).all() and np.isfinite(fit.dispersion).all()


def test_sparse_and_dense_input_agree(data, fit):
    X, labels, batches, *_ = data
    for other in [X.toarray(), X.tocsc(), X.astype(np.float32), X.toarray().astype(np.int32)]:
        alt = fit_signatures(other, labels, batches=batches)
        np.testing.assert_allclose(alt.signatures, fit.signatures, rtol=1e-12)
        np.testing.assert_allclose(alt.dispersion, fit.dispersion, rtol=1e-12)
        np.testing.assert_allclose(alt.log_se, fit.log_se, rtol=1e-12)


def test_deterministic(data, fit):
    X, labels, batches, *_ = data
    again = fit_signatures(X, list(labels), batches=list(batches))
    np.testing.assert_array_equal(again.signatures, fit.signatures)
    np.testing.assert_array_equal(again.dispersion, fit.dispersion)
    np.testing.assert_array_equal(again.batch_effects, fit.batch_effects)


def test_the_input_is_not_modified(data):
    X, labels, batches, *_ = data
    X = X.copy()
    X.data[:5] = 0  # explicit zeros stay
    before = X.copy()
    fit_signatures(X, labels, batches=batches)
    assert X.nnz == before.nnz and (X != before).nnz == 0


def test_a_batch_with_one_type_shared_with_others_is_identifiable():
    X, labels, batches, S, detect, _ = simulate(uneven=False)
    labels, batches = np.append(labels, ["t0"] * 300), np.append(batches, ["b2"] * 300)
    rng = np.random.default_rng(1)
    extra = rng.poisson(rng.gamma(DISPERSION, 3.0 * S[0] / DISPERSION, (300, S.shape[1])))
    fit = fit_signatures(sparse.vstack([X, sparse.csr_matrix(extra)]), labels, batches=batches)
    assert fit.converged
    # detection of the third batch relative to the first two (3 against 0.5 and 2), from the one shared type
    d = fit.detection / np.exp(np.log(fit.detection[:2]).mean())
    np.testing.assert_allclose(d, [0.5, 2.0, 3.0], rtol=0.1)


def test_genes_without_counts_are_dropped_and_logged(data, fit, caplog):
    X, labels, batches, *_ = data
    X = X.tolil()
    X[:, [3, 50]] = 0
    with caplog.at_level(logging.INFO, logger="omx"):
        dropped = fit_signatures(X.tocsr(), labels, batches=batches)
    assert "dropped 2 of 200 genes without counts" in caplog.text
    np.testing.assert_array_equal(dropped.genes, np.delete(np.arange(200), [3, 50]))
    assert dropped.signatures.shape == (5, 198) and dropped.dispersion.shape == (198,)
    # a gene without counts adds nothing to the likelihood: the others fit as before, up to the convergence tolerance
    np.testing.assert_allclose(dropped.dispersion, np.delete(fit.dispersion, [3, 50]), rtol=1e-3)


def test_errors(data):
    X, labels, batches, *_ = data
    with pytest.raises(ValueError, match="fewer than min_cells_per_type=10 cells: {'rare': 3}"):
        fit_signatures(X[:603], np.append(labels[:600], ["rare"] * 3))
    with pytest.raises(ValueError, match="lower `min_cells_per_type=`"):
        fit_signatures(X, labels, min_cells_per_type=10_000)
    for missing in [None, np.nan]:
        bad = labels.astype(object)
        bad[[4, 9]] = missing
        with pytest.raises(ValueError, match="labels holds 2 missing values; drop those cells"):
            fit_signatures(X, bad)
    with pytest.raises(ValueError, match="labels has 2999 entries but the counts have 3000 cells"):
        fit_signatures(X, labels[:-1])
    with pytest.raises(ValueError, match="batches has 10 entries but the counts have 3000 cells"):
        fit_signatures(X, labels, batches=batches[:10])
    bad = batches.astype(object)
    bad[0] = None
    with pytest.raises(ValueError, match="batches holds 1 missing values; .* give each a batch"):
        fit_signatures(X, labels, batches=bad)
    with pytest.raises(ValueError, match="non-integer values"):
        fit_signatures(X * 0.5, labels)
    with pytest.raises(ValueError, match="negative values"):
        fit_signatures(-X, labels)
    with pytest.raises(ValueError, match="all zero"):
        fit_signatures(X * 0, labels)
    with pytest.raises(ValueError, match="2-D"):
        fit_signatures(np.zeros(5), labels[:5])


def test_batches_sharing_no_type_are_an_error(data):
    X, labels, *_ = data
    # types t0, t1 only in batch "a", the others only in "b": a batch difference is a type difference
    batches = np.where(np.isin(labels, ["t0", "t1"]), "a", "b")
    with pytest.raises(ValueError, match=r"share no cell type.*\[\['a'\], \['b'\]\].*batches=None"):
        fit_signatures(X, labels, batches=batches)
    # one cell of t0 in "b" links them
    batches[np.flatnonzero(labels == "t0")[0]] = "b"
    assert fit_signatures(X, labels, batches=batches).batches == ["a", "b"]


def test_bad_settings(data):
    X, labels, *_ = data
    for kwargs in [{"batch_sd": 0}, {"max_iter": 0}, {"tol": -1}]:
        with pytest.raises(ValueError, match="batch_sd and tol must be positive"):
            fit_signatures(X, labels, **kwargs)


def test_dispersion_is_the_maximum_likelihood_estimate(data):
    from scipy.optimize import minimize_scalar
    from scipy.stats import nbinom

    X, labels, *_ = data
    fit = fit_signatures(X, labels)
    dense = X.toarray()
    mu = fit.signatures[np.searchsorted(fit.types, labels)]  # each cell's mean: its type's mean
    for g in [0, 17, 99]:

        def nll(log_r, y=dense[:, g], m=mu[:, g]):
            return -nbinom.logpmf(y, np.exp(log_r), np.exp(log_r) / (np.exp(log_r) + m)).sum()

        best = np.exp(minimize_scalar(nll, bounds=(-5, 10), method="bounded", options={"xatol": 1e-8}).x)
        np.testing.assert_allclose(fit.dispersion[g], best, rtol=1e-3)


def test_count_histogram_holds_large_values():
    from omx.models._signatures import _statistics

    rng = np.random.default_rng(0)
    dense = rng.poisson(rng.lognormal(1.0, 2.0, (500, 30)))
    assert dense.max() > 1000
    group = rng.integers(0, 3, 500)
    Y, hg, hy, hm = _statistics(sparse.csr_matrix(dense), group, 3)
    np.testing.assert_array_equal(Y, [dense[group == i].sum(0) for i in range(3)])
    cols, vals = np.nonzero(dense.T)[0], dense.T[dense.T > 0]
    pairs, counts = np.unique(np.stack([cols, vals]), axis=1, return_counts=True)
    order = np.lexsort((hy, hg))
    np.testing.assert_array_equal(np.stack([hg[order], hy[order]]), pairs)
    np.testing.assert_array_equal(hm[order], counts)
