"""Streaming prediction on Visium HD-like sections of 10k, 100k and 1M spots: time and peak memory.

    python benchmarks/scale.py                                # 10k, 100k, 1M spots; ridge and cnn
    python benchmarks/scale.py --sizes 10000 100000 --models ridge
    python benchmarks/scale.py --workdir /data/omx_scale      # where the sections are written (~3 GB at 1M)
    python benchmarks/scale.py --plot-only                    # redraw <workdir>/scale.png from results.jsonl

Sections and fitted models in the workdir are reused by later runs (delete them to start afresh).

Sections are 8-um bins (spots of 8 um diameter, 30 px apart at 0.267 um/px) on a square grid over an H&E-like
image that is generated tile by tile with dask and written to a SpatialData zarr store, so no step holds a whole
image in memory: 1M spots lie on a 30,000 x 30,000 px image. The image is drawn from two smooth fields
(nuclear density, nucleus size); the expression of 50 genes depends on them. A ridge model (handcrafted
features of 32-px patches at 8, 16 and 24 um) and a CNN (32-px patches spanning 24 um, 5 epochs) are fitted on
two training sections of 5,000 spots with counts, saved, and then each prediction runs in a fresh process that
reads the section from disk and calls `omx.tl.predict_expression` (H&E only: a new table of predictions).
Peak memory is that process's maximum resident set size. The correlation of each prediction with the true
log-mean of a field-driven gene checks that streamed predictions are meaningful.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MPP = 8.0 / 30.0  # microns per pixel: 8-um bins 30 px apart
PITCH_UM, RADIUS_UM, MARGIN_UM = 8.0, 4.0, 40.0
N_GENES = 50


def fields(x_um, y_um):
    """The two smooth fields (nuclear density, nucleus size) of the synthetic tissue, mean 0 and spread ~1."""
    import numpy as np

    waves = [(310.0, 0.3, 1.0), (520.0, 1.9, 2.1), (870.0, 4.0, 0.4), (450.0, 5.2, 3.3)]
    out = []
    for k in range(2):
        f = 0.0
        for wavelength, angle, phase in waves[2 * k : 2 * k + 2]:
            kx, ky = np.cos(angle + k), np.sin(angle + k)
            f = f + np.cos(2 * np.pi * (kx * x_um + ky * y_um) / wavelength + phase)
        out.append(f)
    return out


def _hash(*ints):
    """Deterministic pseudo-random numbers in [0, 1) from integer arrays (so tiles can be drawn independently)."""
    import numpy as np

    h = np.zeros(np.broadcast(*ints).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around on purpose
        for i, v in enumerate(ints):
            h ^= (np.asarray(v).astype(np.int64).astype(np.uint64) + np.uint64(i + 1)) * np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def draw_tile(y0: int, x0: int, h: int, w: int):
    """RGB ``(3, h, w)`` uint8 of the synthetic H&E at pixel rows [y0, y0 + h) and columns [x0, x0 + w)."""
    import numpy as np

    from omx.datasets._toy import _OD_EOSIN, _OD_HEMATOXYLIN  # the toy data's stain colours

    yy, xx = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    y_um, x_um = yy * MPP, xx * MPP
    density, size = fields(x_um, y_um)
    cell_um = 9.0  # one candidate nucleus per 9 x 9 um cell, present with a probability set by the density
    cy, cx = np.floor(y_um / cell_um), np.floor(x_um / cell_um)
    present = _hash(cy, cx, 1) < 1.0 / (1.0 + np.exp(-1.5 * density))
    jy, jx = (0.3 + 0.4 * _hash(cy, cx, 2)) * cell_um, (0.3 + 0.4 * _hash(cy, cx, 3)) * cell_um
    radius = 2.6 * np.exp(0.25 * size)
    nucleus = present & ((y_um - cy * cell_um - jy) ** 2 + (x_um - cx * cell_um - jx) ** 2 < radius**2)
    hema = 0.9 * nucleus + 0.05
    eosin = 0.25 + 0.1 * _hash(yy, xx, 4)
    od = hema[None] * _OD_HEMATOXYLIN[:, None, None] + eosin[None] * _OD_EOSIN[:, None, None]
    return np.clip(255.0 * 10.0 ** (-od), 0, 255).astype(np.uint8)


def gene_weights():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 3.0, N_GENES), rng.normal(0.0, 0.6, (N_GENES, 2))


def make_section(path: Path, n_spots: int, name: str, *, counts: bool, seed: int = 0) -> None:
    """Write a section of ``n_spots`` bins to ``path`` (image drawn tile by tile, never whole in memory)."""
    import anndata as ad
    import dask.array as da
    import numpy as np
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    side = int(np.ceil(np.sqrt(n_spots)))
    size_px = int(np.ceil((2 * MARGIN_UM + (side - 1) * PITCH_UM) / MPP))
    tile = 2048
    blocks = da.map_blocks(
        lambda block, block_info=None: draw_tile(
            block_info[None]["array-location"][1][0],
            block_info[None]["array-location"][2][0],
            *block_info[None]["chunk-shape"][1:],
        ),
        da.zeros((3, size_px, size_px), chunks=(3, tile, tile), dtype=np.uint8),
        dtype=np.uint8,
    )
    image = Image2DModel.parse(
        blocks, dims=("c", "y", "x"), scale_factors=[2, 2, 2], transformations={name: Scale([MPP, MPP], ("x", "y"))}
    )
    row, col = np.divmod(np.arange(n_spots), side)
    xy = MARGIN_UM + np.column_stack([col, row]) * PITCH_UM
    shapes = ShapesModel.parse(
        xy, geometry=0, radius=np.full(n_spots, RADIUS_UM), transformations={name: Scale([1, 1], ("x", "y"))}
    )
    elements = {"images": {f"{name}_he": image}, "shapes": {f"{name}_spots": shapes}}
    if counts:
        base, weights = gene_weights()
        log_mu = base + np.column_stack(fields(xy[:, 0], xy[:, 1])) @ weights.T
        rng = np.random.default_rng(seed)
        X = rng.poisson(np.exp(log_mu) * rng.uniform(0.5, 1.5, (n_spots, 1)))
        obs = pd.DataFrame({"region": f"{name}_spots", "spot_id": np.arange(n_spots), "section": name})
        obs.index = [f"{name}_{i}" for i in range(n_spots)]
        adata = ad.AnnData(X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))
        elements["tables"] = {
            "table": TableModel.parse(adata, region=f"{name}_spots", region_key="region", instance_key="spot_id")
        }
    sdata = SpatialData(**elements, attrs={"omx": {"units": {name: "um"}}})
    sdata.write(path, overwrite=True)


def fit_models(workdir: Path, models: list[str]) -> dict:
    import spatialdata as sd

    import omx

    parts = []
    for name in ("T1", "T2"):
        path = workdir / f"train_{name}.zarr"
        if not path.exists():
            make_section(path, 5000, name, counts=True, seed=int(name[1]))
        parts.append(sd.read_zarr(path))
    sdata = sd.concatenate(parts, concatenate_tables=True)
    sdata.attrs["omx"] = {"units": {"T1": "um", "T2": "um"}}
    out = {}
    for name in models:
        done = workdir / f"model_{name}" / "fit.json"
        if done.exists():  # fitted by an earlier run: reuse it
            out[name] = json.loads(done.read_text())
            continue
        if name == "ridge":
            model = omx.models.Ridge(encoder=omx.encoders.HandcraftedEncoder(patch_px=32), show_progress_bar=False)
        else:
            model = omx.models.CNNRegressor(patch_px=32, epochs=5, patience=None, show_progress_bar=False)
        t = time.perf_counter()
        omx.tl.fit_predict(sdata, train="T1", predict="T2", model=model, show_progress_bar=False, key_added=name)
        fit_s = time.perf_counter() - t
        score = sdata.tables["table"].uns["omx"][name]["summary"]["T2"]["all"]["pearson"]
        model.save(workdir / f"model_{name}", overwrite=True)
        out[name] = {"fit_and_predict_5k_s": round(fit_s, 1), "held_out_mean_r": round(float(score), 3)}
        done.write_text(json.dumps(out[name]))
    return out


def run_one(workdir: Path, n: int, model_name: str) -> dict:
    import numpy as np
    import spatialdata as sd

    import omx

    sdata = sd.read_zarr(workdir / f"section_{n}.zarr")
    t = time.perf_counter()
    omx.tl.predict_expression(sdata, workdir / f"model_{model_name}", key_added="omx_pred", show_progress_bar=False)
    seconds = time.perf_counter() - t
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # before the check below allocates
    pred = sdata.tables["omx_pred"]
    xy = pred.obsm["spatial"]
    base, weights = gene_weights()
    truth = base + np.column_stack(fields(xy[:, 0], xy[:, 1])) @ weights.T
    genes = [int(g[1:]) for g in pred.var_names]
    r = [np.corrcoef(pred.X[:, j], truth[:, g])[0, 1] for j, g in enumerate(genes)]
    return {
        "model": model_name,
        "n_spots": n,
        "image_px": int(sd.get_pyramid_levels(sdata.images["S_he"], n=0).sizes["x"]),
        "seconds": round(seconds, 1),
        "spots_per_s": round(n / seconds),
        "peak_rss_gb": round(peak_gb, 2),
        "r_with_truth": round(float(np.nanmean(r)), 3),
    }


def plot(results: list[dict], path: Path) -> None:
    """Seconds and peak memory against the number of spots (log-log), one line per model, with a linear guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    for name in sorted({r["model"] for r in results}):
        rows = sorted((r for r in results if r["model"] == name and "seconds" in r), key=lambda r: r["n_spots"])
        n = np.array([r["n_spots"] for r in rows])
        axes[0].plot(n, [r["seconds"] for r in rows], marker="o", label=name)
        axes[1].plot(n, [r["peak_rss_gb"] for r in rows], marker="o", label=name)
    n = np.array(sorted({r["n_spots"] for r in results}))
    axes[0].plot(n, n / n[-1] * max(r["seconds"] for r in results), ls=":", color="0.5", label="linear")
    axes[0].set(xscale="log", yscale="log", xlabel="spots", ylabel="seconds", title="predict_expression time")
    axes[1].axhline(6, ls="--", color="C3", lw=1, label="6 GB")
    axes[1].set(xscale="log", ylim=(0, 7), xlabel="spots", ylabel="peak RSS (GB)", title="peak memory")
    for ax in axes:
        ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--models", nargs="+", default=["ridge", "cnn"], choices=["ridge", "cnn"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/omx_scale"))
    parser.add_argument("--plot-only", action="store_true", help="redraw scale.png from the workdir's results")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: run one prediction
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.workdir, int(args.one[0]), args.one[1])))
        return
    results_file = args.workdir / "results.jsonl"
    if args.plot_only:
        plot([json.loads(line) for line in results_file.read_text().splitlines()], args.workdir / "scale.png")
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    print(json.dumps({"fit": fit_models(args.workdir, args.models)}), flush=True)
    for n in args.sizes:
        path = args.workdir / f"section_{n}.zarr"
        if not path.exists():
            t = time.perf_counter()
            make_section(path, n, "S", counts=False)
            print(json.dumps({"made": str(path), "seconds": round(time.perf_counter() - t, 1)}), flush=True)
        for name in args.models:
            cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--one", str(n), name]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(json.dumps({"model": name, "n_spots": n, "error": result.stderr[-2000:]}), flush=True)
                continue
            line = result.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            results.append(json.loads(line))
    results_file.write_text("".join(json.dumps(r) + "\n" for r in results))
    plot(results, args.workdir / "scale.png")
    print(f"Curves: {args.workdir / 'scale.png'}")


if __name__ == "__main__":
    main()
