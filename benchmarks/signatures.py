"""Benchmark of `omx.models._signatures.fit_signatures`: time and error of signatures from single cells.

    OMP_NUM_THREADS=1 python benchmarks/signatures.py scale   # 50,000 cells x 2,000 genes x 30 types, 3 batches

Cells are drawn from known signatures with per-batch detection and per-gene batch effects, types spread unevenly
over the batches; the fitted signatures are compared with the truth and with the per-type mean that ignores batches.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: the machine is shared
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402


def peak_gb() -> float:
    """Peak resident memory of this process in GB (Linux ru_maxrss is in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def simulate(n_cells: int, n_genes: int, n_types: int, n_batches: int, *, dispersion: float = 5.0, seed: int = 0):
    """Sparse counts drawn in blocks, labels, batches and the true signatures, detection and batch effects."""
    rng = np.random.default_rng(seed)
    S = rng.lognormal(-1.5, 1.3, (n_types, n_genes))
    log_b = rng.normal(0.0, 0.4, (n_batches, n_genes))
    log_b -= log_b.mean(0, keepdims=True)
    log_b -= log_b.mean(1, keepdims=True)
    detect = np.geomspace(0.5, 2.0, n_batches)
    detect /= np.exp(np.log(detect).mean())
    k = rng.integers(0, n_types, n_cells)
    main = k % n_batches  # each type mostly (80%) in one batch
    b = np.where(rng.random(n_cells) < 0.8, main, rng.integers(0, n_batches, n_cells))
    blocks = []
    for start in range(0, n_cells, 5000):
        kk, bb = k[start : start + 5000], b[start : start + 5000]
        mu = detect[bb][:, None] * S[kk] * np.exp(log_b[bb])
        blocks.append(sparse.csr_matrix(rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)))
    X = sparse.vstack(blocks, format="csr")
    labels = np.array([f"type_{i:02d}" for i in k])
    batches = np.array([f"batch_{i}" for i in b])
    return X, labels, batches, S, detect, np.exp(log_b)


def bench_scale(n_cells: int, n_genes: int, n_types: int, n_batches: int) -> None:
    """Fit time and error of the signatures, with and without batches."""
    from omx.models._signatures import fit_signatures

    t0 = time.perf_counter()
    X, labels, batches, S, detect, batch_effects = simulate(n_cells, n_genes, n_types, n_batches)
    print(
        f"simulated {n_cells} cells x {n_genes} genes x {n_types} types, {n_batches} batches in "
        f"{time.perf_counter() - t0:.1f} s; {X.nnz / np.prod(X.shape):.0%} nonzero, "
        f"median {np.median(np.asarray(X.sum(1))):.0f} counts per cell"
    )
    t0 = time.perf_counter()
    fit = fit_signatures(X, labels, batches=batches)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = fit_signatures(X, labels)
    dt_naive = time.perf_counter() - t0

    truth = S[:, fit.genes]
    ok = truth > 0.05  # entries with a few counts per type at least
    for name, est, seconds, n_iter in [
        ("NB model with batches", fit.signatures, dt, fit.n_iter),
        ("per-type mean (batches=None)", naive.signatures, dt_naive, naive.n_iter),
    ]:
        err = np.log(est[ok]) - np.log(truth[ok])
        r = np.corrcoef(np.log(est[ok]), np.log(truth[ok]))[0, 1]
        print(
            f"{name:30s} {seconds:6.2f} s, {n_iter:3d} iterations: log S RMSE {np.sqrt(np.mean(err**2)):.3f}, "
            f"corr {r:.4f}"
        )
    z = (np.log(fit.signatures[ok]) - np.log(truth[ok])) / fit.log_se[ok]
    print(f"  standard errors: sd of (log S - truth) / SE = {z.std():.2f} (1 when calibrated)")
    print(f"  detection {np.round(fit.detection, 3)} (truth {np.round(detect, 3)})")
    rb = np.corrcoef(np.log(fit.batch_effects).ravel(), np.log(batch_effects[:, fit.genes]).ravel())[0, 1]
    print(f"  per-gene batch effects: corr of logs with truth {rb:.3f}")
    q = np.quantile(fit.dispersion, [0.1, 0.5, 0.9])
    print(f"  dispersion (truth 5): 10/50/90% {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}")
    print(f"  peak RSS {peak_gb():.2f} GB")


def main() -> None:
    """Run one part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["scale"])
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--types", type=int, default=30)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    if args.part == "scale":
        bench_scale(args.cells, args.genes, args.types, args.batches)


if __name__ == "__main__":
    main()
