"""A bank of reference spots retrieved by embedding similarity, never from the query's own section or patient."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from omx._settings import warn

#: Rows of queries scored against the bank at a time.
QUERY_CHUNK = 1024


class RetrievalBank:
    """Reference spots (embeddings, targets, section and patient labels) and the rule of what a query may retrieve.

    A query retrieves the `k` bank rows whose embeddings are most similar (cosine) to its own and averages their
    targets with softmax weights at a temperature. It never retrieves a bank row of its own group (section) and,
    with ``exclude="patient"``, none of its own patient (when the patients of the bank rows and of the query are
    both known): the leakage that inflates retrieval scores when serial sections of one patient sit in the bank.

    Parameters
    ----------
    embedding
        Embeddings of the bank rows ``(n, e)``, L2-normalised.
    targets
        What retrieval averages ``(n, g)`` (e.g. standardised expression).
    groups
        Group (section) label of each bank row ``(n,)``; ``""`` for rows without one.
    patients
        Patient of each bank row ``(n,)``, or None when unknown (then only the query's section is excluded).
    exclude
        ``"patient"`` (a query never retrieves its patient's rows, nor its section's) or ``"group"`` (its section's
        only).
    """

    def __init__(
        self,
        embedding: np.ndarray,
        targets: np.ndarray,
        groups: np.ndarray,
        patients: np.ndarray | None = None,
        *,
        exclude: Literal["patient", "group"] = "patient",
    ):
        if exclude not in ("patient", "group"):
            raise ValueError(f"exclude must be 'patient' or 'group', got {exclude!r}.")
        self.embedding = np.asarray(embedding, dtype=np.float32)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.groups = np.asarray(groups).astype(str)
        self.patients = None if patients is None else np.asarray(patients).astype(str)
        self.exclude = exclude
        n = len(self.embedding)
        lengths = {len(self.targets), len(self.groups), len(self.groups if patients is None else self.patients)}
        if self.embedding.ndim != 2 or self.targets.ndim != 2 or lengths != {n}:
            raise ValueError(
                f"The bank's embedding {self.embedding.shape}, targets {self.targets.shape}, groups "
                f"{self.groups.shape} and patients {np.shape(self.patients)} must hold one row per bank spot."
            )

    def __len__(self) -> int:
        return len(self.embedding)

    def excludes_patients(self, patients: object | None) -> bool:
        """Whether queries of these ``patients`` leave out their patient: asked for, and known for bank and query."""
        return self.exclude == "patient" and self.patients is not None and patients is not None

    def allowed(self, group: str | None, patient: str | None = None) -> np.ndarray:
        """Mask of the bank rows a query of ``group`` (and ``patient``, None when unknown) may retrieve.

        ``group=None`` (a query without a section label) may retrieve every row.
        """
        if group is None:
            return np.ones(len(self), bool)
        keep = self.groups != str(group)
        if self.excludes_patients(patient):
            keep &= self.patients != str(patient)
        return keep

    def query(
        self,
        embedding: np.ndarray,
        *,
        k: int,
        temperature: float,
        groups: np.ndarray | None = None,
        patients: np.ndarray | None = None,
        strict: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Retrieve the `k` most similar allowed bank rows of each query and average their targets.

        Parameters
        ----------
        embedding
            Query embeddings ``(m, e)`` (normalised here).
        k
            Bank rows averaged per query.
        temperature
            Softmax temperature of the weights: ``w_j ~ exp(similarity_j / temperature)``.
        groups
            Group of each query ``(m,)``; None excludes nothing.
        patients
            Patient of each query ``(m,)``, or None when unknown (then only its section is excluded).
        strict
            Raise when a query may retrieve fewer than `k` rows; else leave its rows out (False in the last array,
            zeros elsewhere) with a warning.

        Returns
        -------
        The weighted average of the retrieved targets ``(m, g)``, the bank rows retrieved ``(m, k)`` (most
        similar first), their weights ``(m, k)`` (summing to 1 over each row) and the mask of queries retrieved
        ``(m,)``.
        """
        h = np.asarray(embedding)
        q = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
        n = len(q)
        pred = np.zeros((n, self.targets.shape[1]), np.float32)
        index = np.zeros((n, k), np.int64)
        weight = np.zeros((n, k), np.float32)
        retrieved = np.ones(n, bool)
        for group, patient, rows in _query_groups(groups, patients, n):
            allowed = np.flatnonzero(self.allowed(group, patient))
            if len(allowed) < k:
                message = (
                    f"Only {len(allowed)} reference spots may be retrieved for group {group!r} (its own section"
                    f"{' and patient' if self.excludes_patients(patient) else ''} excluded), fewer "
                    f"than k={k}."
                )
                if strict:
                    raise ValueError(f"{message} Lower `k`, or fit on more sections.")
                warn(f"{message} Its spots are predicted by the regression parts alone.")
                retrieved[rows] = False
                continue
            keys = self.embedding[allowed]
            for start in range(0, len(rows), QUERY_CHUNK):
                r = rows[start : start + QUERY_CHUNK]
                top, w = _top_k_weights(q[r] @ keys.T, k, temperature)
                index[r], weight[r] = allowed[top], w
                pred[r] = np.einsum("nk,nkg->ng", w, self.targets[allowed[top]])
        return pred, index, weight, retrieved

    # ------------------------------------------------------------------ state
    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able values and arrays that :meth:`from_state` rebuilds the bank from."""
        group_labels, group_codes = np.unique(self.groups, return_inverse=True)
        state = {"exclude": self.exclude, "group_labels": group_labels.tolist(), "patient_labels": None}
        arrays = {"embedding": self.embedding, "targets": self.targets, "group_codes": group_codes.astype(np.int64)}
        if self.patients is not None:
            patient_labels, patient_codes = np.unique(self.patients, return_inverse=True)
            state["patient_labels"] = patient_labels.tolist()
            arrays["patient_codes"] = patient_codes.astype(np.int64)
        return state, arrays

    @classmethod
    def from_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> RetrievalBank:
        """Rebuild a bank from :meth:`get_state`'s output."""
        groups = np.asarray(state["group_labels"], dtype=str)[arrays["group_codes"]]
        patients = None
        if state.get("patient_labels") is not None:
            patients = np.asarray(state["patient_labels"], dtype=str)[arrays["patient_codes"]]
        return cls(arrays["embedding"], arrays["targets"], groups, patients, exclude=state["exclude"])


def _query_groups(groups: np.ndarray | None, patients: np.ndarray | None, n: int):
    """``(group, patient, rows)`` of the queries of each distinct (group, patient); one ``(None, None, all)``.

    The patient is None when ``patients`` is.
    """
    if groups is None:
        yield None, None, np.arange(n)
        return
    groups = np.asarray(groups).astype(str)
    if patients is None:
        labels, inverse = np.unique(groups, return_inverse=True)
        for i, group in enumerate(labels):
            yield group, None, np.flatnonzero(inverse == i)
        return
    pairs, inverse = np.unique(np.stack([groups, np.asarray(patients).astype(str)], 1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    for i, (group, patient) in enumerate(pairs):
        yield group, patient, np.flatnonzero(inverse == i)


def _top_k_weights(sim: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the `k` largest similarities of each row (largest first) and their softmax weights."""
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sim, top, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")
    top, s = np.take_along_axis(top, order, axis=1), np.take_along_axis(s, order, axis=1)
    w = np.exp((s - s[:, :1]) / temperature)
    w /= w.sum(1, keepdims=True)
    return top, w
