import json

import numpy as np
import pytest

from omx.models import RetrievalBank


@pytest.fixture
def bank():
    """Six sections of 20 rows (three patients); embeddings on a circle, targets = the section's index."""
    rng = np.random.default_rng(0)
    groups = np.repeat(["a1", "a2", "b1", "b2", "c1", "c2"], 20)
    patients = np.array([g[0] for g in groups])
    emb = rng.normal(size=(120, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    targets = np.repeat(np.arange(6.0), 20)[:, None] * np.ones((1, 3))
    return RetrievalBank(emb, targets, groups, patients), emb


def test_never_retrieves_own_section_or_patient(bank):
    bank, emb = bank
    # queries that are exact copies of bank rows of section a1 (patient a) and b2 (patient b)
    queries = np.concatenate([emb[:20], emb[60:80]]) * 3.0  # scale is irrelevant: queries are normalised
    groups = np.repeat(["a1", "b2"], 20)
    patients = np.repeat(["a", "b"], 20)
    pred, index, weight, ok = bank.query(queries, k=10, temperature=0.1, groups=groups, patients=patients)
    assert ok.all() and index.shape == weight.shape == (40, 10)
    assert not np.isin(bank.patients[index[:20]], ["a"]).any() and not np.isin(bank.patients[index[20:]], ["b"]).any()
    np.testing.assert_allclose(weight.sum(1), 1.0, rtol=1e-6)
    assert (weight >= 0).all() and (np.diff(weight, axis=1) <= 1e-7).all()  # most similar first
    # the prediction is the weighted mean of the retrieved targets
    np.testing.assert_allclose(pred, np.einsum("nk,nkg->ng", weight, bank.targets[index]), rtol=1e-5)
    # the control: without labels the copies are found (similarity 1, the top row)
    _, index_all, _, _ = bank.query(queries, k=10, temperature=0.1)
    np.testing.assert_array_equal(index_all[:, 0], np.r_[np.arange(20), np.arange(60, 80)])
    # exclude="group": only the section is excluded, the patient's other section may be retrieved
    by_group = RetrievalBank(bank.embedding, bank.targets, bank.groups, bank.patients, exclude="group")
    _, index_g, _, _ = by_group.query(queries[:20], k=30, temperature=0.1, groups=groups[:20])
    assert "a1" not in set(by_group.groups[index_g.ravel()]) and "a2" in set(by_group.groups[index_g.ravel()])
    # without the patients of the bank, or of the query, only the query's section is excluded
    assert RetrievalBank(bank.embedding, bank.targets, bank.groups).allowed("a1", "a").sum() == 100
    assert bank.allowed("a1").sum() == 100 and bank.allowed("a1", "a").sum() == 80 and bank.allowed(None).all()


def test_weights_follow_temperature(bank):
    bank, emb = bank
    q = emb[:5]
    _, _, cold, _ = bank.query(q, k=5, temperature=0.01, groups=np.full(5, "z"))
    _, index, hot, _ = bank.query(q, k=5, temperature=100.0, groups=np.full(5, "z"))
    np.testing.assert_allclose(cold.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(hot, 0.2, atol=1e-3)  # a high temperature: nearly uniform
    assert (cold[:, 0] > 0.99).all()  # a low one: the most similar row (the copy) takes all
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ bank.embedding[index[0]].T
    expected = np.exp((sim[0] - sim[0, 0]) / 100.0)
    np.testing.assert_allclose(hot[0], expected / expected.sum(), rtol=1e-5)


def test_too_few_rows(bank):
    bank, emb = bank
    groups, patients = np.full(4, "a1"), np.full(4, "a")
    with pytest.raises(ValueError, match="Only 80 reference spots may be retrieved .* fewer than k=81"):
        bank.query(emb[:4], k=81, temperature=0.1, groups=groups, patients=patients)
    pred, _, _, ok = bank.query(emb[:4], k=81, temperature=0.1, groups=groups, patients=patients, strict=False)
    assert not ok.any() and (pred == 0).all()


def test_state_round_trip(bank):
    bank, emb = bank
    for b in (bank, RetrievalBank(bank.embedding, bank.targets, bank.groups, exclude="group")):  # without patients
        state, arrays = b.get_state()
        loaded = RetrievalBank.from_state(json.loads(json.dumps(state)), arrays)
        for name in ("embedding", "targets", "groups", "patients"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(b, name))
        assert loaded.exclude == b.exclude and (loaded.patients is None) == (b.patients is None)
        q, g = emb[:10], np.full(10, "b1")
        expected = b.query(q, k=7, temperature=0.2, groups=g)
        for a, c in zip(expected, loaded.query(q, k=7, temperature=0.2, groups=g), strict=True):
            np.testing.assert_array_equal(a, c)


def test_bad_input():
    with pytest.raises(ValueError, match="one row per bank spot"):
        RetrievalBank(np.zeros((5, 3)), np.zeros((4, 2)), np.zeros(5))
    with pytest.raises(ValueError, match="exclude"):
        RetrievalBank(np.zeros((5, 3)), np.zeros((5, 2)), np.zeros(5), exclude="none")
