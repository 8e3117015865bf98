"""Time per epoch and peak memory of `SpatialGraph` on large synthetic sections (no images needed).

    python benchmarks/graph_scale.py                      # 10k, 50k and 200k spots
    python benchmarks/graph_scale.py --sizes 10000 --epochs 2

Each size runs in its own process, so its peak RSS (max resident memory) is its own. Spots lie on a square
grid 100 microns apart; features are a smooth random field plus noise (d=96, like handcrafted features at
three context sizes), targets 50 genes that depend on the field. One epoch trains on every spot once, in
spatial tiles with their 2-hop halos (validation disabled, so the epoch is pure training).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def synthetic(n: int, d: int = 96, g: int = 50, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n].astype(float)
    freq = rng.uniform(0.02, 0.2, (d, 2))
    phase = rng.uniform(0, 2 * np.pi, (d, 2))
    field = np.sin(xy[:, :1] * freq[:, 0] + phase[:, 0]) * np.cos(xy[:, 1:] * freq[:, 1] + phase[:, 1])
    X = (field + rng.normal(size=(n, d))).astype(np.float32)
    Y = (field[:, :8] @ rng.normal(size=(8, g)) + 0.3 * rng.normal(size=(n, g))).astype(np.float32)
    return X, Y, xy * 100.0


def run_one(n: int, epochs: int, seed: int) -> dict:
    from omx.models import SpatialGraph

    X, Y, coords = synthetic(n, seed=seed)
    model = SpatialGraph(epochs=epochs, val_fraction=0.0, patience=None, seed=seed, show_progress_bar=False)
    t = time.perf_counter()
    model.fit(X, Y, coords=coords)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    model.predict(X, coords=coords)
    predict_s = time.perf_counter() - t
    return {
        "n_spots": n,
        "epochs": epochs,
        "s_per_epoch": fit_s / epochs,
        "fit_s": fit_s,
        "predict_s": predict_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 50_000, 200_000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args.epochs, args.seed)))
        return
    import pandas as pd

    records = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--worker", str(n), "--epochs", str(args.epochs), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"size {n} failed")
        records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(records[-1], flush=True)
    print("\nSpatialGraph on synthetic sections (graph + fit + predict; fit includes graph building):")
    print(pd.DataFrame(records).round(2).to_string(index=False))


if __name__ == "__main__":
    main()
