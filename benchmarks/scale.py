"""Streaming prediction on Visium HD-like sections of 10k, 100k and 1M spots: time and peak memory.

    python benchmarks/scale.py                                # 10k, 100k, 1M spots; ridge and cnn
    python benchmarks/scale.py --sizes 10000 100000 --models ridge
    python benchmarks/scale.py --workdir /data/omx_scale      # where the sections are written (2 GB at 1M)
    python benchmarks/scale.py --plot-only                    # redraw <workdir>/scale.png from results.jsonl

Sections and fitted models in the workdir are reused by later runs (delete them to start afresh).

Sections are 8-um bins (spots of 8 um diameter, 30 px apart at 0.267 um/px) on a square grid over an H&E-like
image that is generated tile by tile with dask and written to a SpatialData zarr store, so no step holds a whole
image in memory: 1M spots lie on a 30,000 x 30,000 px image. The image is drawn from two smooth fields
(nuclear density, nucleus size); the expression of 50 genes depends on them. A ridge model (handcrafted
features of 32-px patches at 8, 16 and 24 um) and a CNN (32-px patches spanning 24 um, 5 epochs) are fitted on
two training sections of 5,000 spots with counts, saved, and then each prediction runs in a fresh process that
reads the section from disk and calls `omx.tl.predict_expression` (H&E only: a new table of predictions).
The correlation of each prediction with the true log-mean of a field-driven gene checks that streamed
predictions are meaningful.

Peak memory is the predicting process's own high-water mark of resident memory (`VmHWM` in /proc/self/status,
read right after `predict_expression`; GB = 2**30 bytes). The main process is only a launcher that holds no
data: writing the sections, fitting the models and each prediction run in processes of their own. Before, the
figures were inflated twice over: the launcher itself had fitted the models and written the section, and a
child's `getrusage(RUSAGE_SELF).ru_maxrss` counts the peak of its parent too, because Linux folds the high-water
mark of the address space an exec replaces (after fork or vfork, the parent's) into ru_maxrss. `VmHWM` covers
only the address space made at the child's exec. Each result also carries the child's ru_maxrss
(`ru_maxrss_gb`), equal to `peak_rss_gb` when nothing inherited inflates it, and its resident memory just before
predicting (`rss_before_gb`: imports and the lazily read section). Every run starts with a check of the measure
(alone: `--check-memory`), children that allocate known amounts (the same to 0.001 GB in two runs here):

    child allocates nothing                                    VmHWM 0.013 GB   ru_maxrss 0.013 GB
    child allocates and frees 500 MiB (0.488 GB)               VmHWM 0.502 GB   ru_maxrss 0.502 GB
    child of a launcher that holds 1000 MiB, allocates none    VmHWM 0.013 GB   ru_maxrss 0.990 GB
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


#: Waves (wavelength um, angle, phase) of the short-wavelength field that benchmarks/superres.py adds to the tissue.
FINE_WAVES = ((70.0, 0.7, 0.3), (85.0, 2.2, 1.7), (60.0, 4.1, 2.9))


def fine_field(x_um, y_um):
    """A field with detail finer than 55-um spots (wavelengths 60-85 um), mean 0 and spread ~1."""
    import numpy as np

    f = 0.0
    for wavelength, angle, phase in FINE_WAVES:
        f = f + np.cos(2 * np.pi * (np.cos(angle) * x_um + np.sin(angle) * y_um) / wavelength + phase)
    return f * np.sqrt(2 / len(FINE_WAVES))


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


def draw_tile(y0: int, x0: int, h: int, w: int, *, mpp: float = MPP, fine: float = 0.0):
    """RGB ``(3, h, w)`` uint8 of the synthetic H&E at pixel rows [y0, y0 + h) and columns [x0, x0 + w).

    ``fine`` adds that multiple of `fine_field` to both fields that the nuclei show (0 here; superres.py sets it).
    """
    import numpy as np

    from omx.datasets._toy import _OD_EOSIN, _OD_HEMATOXYLIN  # the toy data's stain colours

    yy, xx = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    y_um, x_um = yy * mpp, xx * mpp
    density, size = fields(x_um, y_um)
    if fine:
        extra = fine * fine_field(x_um, y_um)
        density, size = density + extra, size + extra
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


def memory_gb() -> dict:
    """This process's resident memory now (VmRSS), its own peak (VmHWM) and getrusage's ru_maxrss, in GB.

    VmHWM is the high-water mark of the address space made at this process's exec. ru_maxrss (RUSAGE_SELF) also
    holds the high-water mark of the address space the exec replaced: after fork or vfork, the parent's.
    """
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}  # in kB
    return {
        "rss": kb["VmRSS"] / 1024**2,
        "peak": kb["VmHWM"] / 1024**2,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,  # in kB on Linux
    }


def touch(mib: int) -> bytearray:
    """``mib`` MiB written byte by byte, so that every page is resident."""
    return bytearray(b"\x01") * (mib * 2**20)


def probe(alloc_mib: int) -> dict:
    """Allocate and free ``alloc_mib`` MiB, then report this process's memory (a check of the measure)."""
    block = touch(alloc_mib)
    del block
    return {key: round(value, 3) for key, value in memory_gb().items()}


def check_memory(workdir: Path) -> list[dict]:
    """Children that allocate known amounts, from a clean launcher and from one that holds 1000 MiB."""
    rows = [
        {"check": "child allocates nothing", **run_step(workdir, "--probe", "0")},
        {"check": "child allocates and frees 500 MiB (0.488 GB)", **run_step(workdir, "--probe", "500")},
        {"check": "child of a launcher that holds 1000 MiB", **run_step(workdir, "--probe-under", "1000")},
    ]
    base, big, under = (row.get("peak", float("nan")) for row in rows)
    rows.append(
        {
            "check": "verdict",
            "500 MiB seen as GB": round(big - base, 3),
            "inherited peak kept out of VmHWM": abs(under - base) < 0.05,
            "inherited peak in ru_maxrss": rows[2].get("ru_maxrss", 0.0) > 0.9,
        }
    )
    return rows


def run_step(workdir: Path, *args: str) -> dict:
    """Run one step of the benchmark in a fresh Python process and return the JSON it prints last."""
    cmd = [sys.executable, __file__, "--workdir", str(workdir), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_one(workdir: Path, n: int, model_name: str) -> dict:
    import numpy as np
    import spatialdata as sd

    import omx

    sdata = sd.read_zarr(workdir / f"section_{n}.zarr")
    before = memory_gb()
    t = time.perf_counter()
    omx.tl.predict_expression(sdata, workdir / f"model_{model_name}", key_added="omx_pred", show_progress_bar=False)
    seconds = time.perf_counter() - t
    after = memory_gb()  # before the check below allocates
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
        "peak_rss_gb": round(after["peak"], 2),
        "rss_before_gb": round(before["rss"], 2),  # imports and the lazily read section, before predicting
        "ru_maxrss_gb": round(after["ru_maxrss"], 2),
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
    parser.add_argument("--check-memory", action="store_true", help="only check the memory measure (seconds)")
    # internal steps, each run in a process of its own by the launcher
    parser.add_argument("--fit", nargs="+", help=argparse.SUPPRESS)  # fit (or reuse) these models
    parser.add_argument("--make", type=int, help=argparse.SUPPRESS)  # write the section of this many spots
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # run one prediction: spots, model
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # allocate this many MiB, report memory
    parser.add_argument("--probe-under", type=int, help=argparse.SUPPRESS)  # hold this many MiB, run --probe 0
    args = parser.parse_args()
    if args.fit:
        print(json.dumps({"fit": fit_models(args.workdir, args.fit)}))
    elif args.make:
        t = time.perf_counter()
        make_section(args.workdir / f"section_{args.make}.zarr", args.make, "S", counts=False)
        print(json.dumps({"made": f"section_{args.make}.zarr", "seconds": round(time.perf_counter() - t, 1)}))
    elif args.one:
        print(json.dumps(run_one(args.workdir, int(args.one[0]), args.one[1])))
    elif args.probe is not None:
        print(json.dumps(probe(args.probe)))
    elif args.probe_under is not None:
        held = touch(args.probe_under)  # resident while the child runs
        child = run_step(args.workdir, "--probe", "0")
        print(json.dumps({**child, "launcher_held": round(len(held) / 2**30, 3)}))
    elif args.plot_only:
        results = [json.loads(line) for line in (args.workdir / "results.jsonl").read_text().splitlines()]
        plot(results, args.workdir / "scale.png")
    else:
        launch(args)


def launch(args: argparse.Namespace) -> None:
    """The launcher: holds no data and runs every step (check, fit, sections, predictions) in a fresh process."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    for row in check_memory(args.workdir):
        print(json.dumps(row), flush=True)
    if args.check_memory:
        return
    fit = run_step(args.workdir, "--fit", *args.models)
    print(json.dumps(fit), flush=True)
    if "error" in fit:
        raise SystemExit("fitting failed")
    results = []
    for n in args.sizes:
        if not (args.workdir / f"section_{n}.zarr").exists():
            made = run_step(args.workdir, "--make", str(n))
            print(json.dumps(made), flush=True)
            if "error" in made:
                raise SystemExit(f"writing the section of {n} spots failed")
        for name in args.models:
            result = run_step(args.workdir, "--one", str(n), name)
            result = {"model": name, "n_spots": n, **result}
            print(json.dumps(result), flush=True)
            if "error" not in result:
                results.append(result)
    (args.workdir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    plot(results, args.workdir / "scale.png")
    print(f"Curves: {args.workdir / 'scale.png'}")


if __name__ == "__main__":
    main()
