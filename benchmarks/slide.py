"""A whole H&E-only slide, predicted over all of it: time and peak memory of each step (issue 14, item 5).

    python benchmarks/slide.py                        # 20,000 x 20,000 px at 0.5 um/px (10 x 10 mm), 16-um bins
    python benchmarks/slide.py --size-px 6000         # a smaller slide (3 x 3 mm), e.g. to try it out
    python benchmarks/slide.py --bin-um 8             # 8-um bins (four times as many)
    python benchmarks/slide.py --workdir /data/slide  # where the slide and the model go (~1 GB at 20,000 px)
    python benchmarks/slide.py --no-plot              # skip the whole-slide prediction map

The slide and the fitted model in the workdir are reused by later runs (delete them to start afresh); what the steps
add to the slide's store (tissue, grids, predictions) is deleted at the start of each run.

The slide is the synthetic tissue of ``benchmarks/scale.py`` (two smooth fields drive nuclear density and nucleus
size, and the expression of 50 genes) drawn at 0.5 um/px tile by tile with dask, inside an irregular piece of
tissue (a smooth blob over about 65 % of the slide with a lumen 6 % of the slide across, and a small separate
fragment) on white glass, and written to a SpatialData zarr store as an image of five pyramid levels (0.5 to 8
um/px) in a coordinate system marked as microns. No step holds the whole image in memory. A ridge model (handcrafted
features of 32-px patches of one, two and three times the bins' equal-area diameter: 18, 36 and 54 um at 16-um
bins) is fitted on two small training sections of 3,600 bins of the same size with counts, drawn at the same
0.5 um/px, and saved.

Each step then runs in a fresh process that reads the store from disk (what earlier steps added included):

- ``tile_grid (image)``: `omx.pp.tile_grid` of square bins over the whole image (the issue's ~390,000 at 16 um);
- ``detect_tissue``: `omx.pp.detect_tissue`;
- ``tile_grid (tissue)``: `omx.pp.tile_grid` of square bins within the tissue;
- ``predict (image)`` and ``predict (tissue)``: `omx.tl.predict_expression` over every bin of each grid (H&E only:
  a new table of predictions); the correlation of the predictions with the true log-mean of the genes at the bins
  checks that they are meaningful (over the tissue; glass has no truth);
- ``prediction_map``: `omx.pl.prediction_map` of one gene over the whole tissue grid, saved as a PNG.

Peak memory is the step's own process high-water mark of resident memory (`VmHWM` in /proc/self/status, read right
after the step, before anything is written back; GB = 2**30 bytes), as in ``benchmarks/scale.py``, whose memory
measure and its check (``python benchmarks/scale.py --check-memory``) apply here unchanged. ``rss_before_gb`` is the
resident memory just before the step (imports and the lazily read store, whose shapes and tables are read whole:
0.3 GB for the 390,625 polygons of the 16-um grid over the image). ``r`` is the mean Pearson r over genes of the
predictions with the truth, at the bins inside the tissue. Results go to
``benchmarks/results/slide_<size>px_<bin>um.json``; the table printed at the end holds the same numbers. Measured
here on the CPU (two cores shared with other jobs, so the times are upper bounds), the default run:

    Slide 20,000 x 20,000 px at 0.5 um/px, 16-um bins; 2 CPUs, load average 3.5 before
    step                     units   seconds   peak GB  before GB   load       r
    tile_grid (image)      390,625       1.0      0.40       0.22    3.2
    detect_tissue                2       0.9      0.58       0.52    3.0
    tile_grid (tissue)     250,741       0.6      0.63       0.52    2.9
    predict (image)        390,625     497.9      1.56       0.58    2.7   0.472
    predict (tissue)       250,741     364.4      1.46       0.58    4.4   0.865
    prediction_map         250,741       3.3      0.77       0.67    4.7

An earlier run at load 4-8 took 765 s (1.60 GB) and 424 s (1.45 GB) to predict; peaks agree within 0.05 GB.
Writing the slide took 345 s (drawing level 0: 267 s) and fitting the model 16 s (held-out r 0.86 against counts).
Predicting stays under 3 GB. Above what was read, it holds 0.5 GB at 34,969 bins (``--size-px 6000``) and 1.0 GB
at 390,625: the chunks of patches and features in flight (``omx.tl._engine.predict_stream``), arrays of one row per
bin, and freed memory that glibc's per-thread arenas keep (run alone with ``MALLOC_ARENA_MAX=1``, predict (image)
peaked at 1.34 GB, 0.2-0.3 GB less, having read 0.1 GB more; it took 546 s at load 3-4). The handcrafted encoder takes
about 90 % of the time (cProfile on 22,822 bins). Over the whole image r drops to 0.47: the ridge standardises
features with the statistics of the whole section, and 36 % of its bins are glass; a grid within the tissue
(`omx.pp.tile_grid`'s default once `omx.pp.detect_tissue` has run) keeps them out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scale import N_GENES, _hash, draw_tile, fields, gene_weights, memory_gb

MPP = 0.5  # microns per pixel of the slide and of the training sections
IMAGE, CS = "slide_he", "slide"  # the slide's image and its coordinate system (microns)
TILE = 2048  # pixels per side of the tiles the slide is drawn and stored in
SCALE_FACTORS = [2, 2, 2, 2]  # pyramid levels at 0.5, 1, 2, 4 and 8 um/px
GLASS = (241.0, 240.0, 243.0)  # RGB of the empty glass
EDGE_UM = 10.0  # width of the soft edge of the tissue
RESULTS = Path(__file__).parent / "results"
#: The outline of the tissue, in fractions of the slide's side: centre, mean radius, and harmonics of the radius
#: (order, amplitude, phase) that make it irregular.
BLOB = {"centre": (0.5, 0.52), "radius": 0.45, "harmonics": ((2, 0.05, 0.4), (3, 0.07, 1.3), (5, 0.04, 2.2))}
#: A lumen inside the tissue and a separate fragment of tissue: (x, y, radius), fractions of the slide's side.
HOLE, FRAGMENT = (0.62, 0.44, 0.03), (0.07, 0.08, 0.035)


# ----------------------------------------------------------------------------------------------------- the slide
def tissue_alpha(y_px, x_px, size_px: int):
    """How much tissue (1) or glass (0) covers each pixel: the blob, less the lumen, plus the fragment."""
    import numpy as np

    u, v = x_px / size_px, y_px / size_px  # fractions of the slide's side
    du, dv = u - BLOB["centre"][0], v - BLOB["centre"][1]
    theta = np.arctan2(dv, du)
    radius = BLOB["radius"] * (1.0 + sum(a * np.cos(k * theta + p) for k, a, p in BLOB["harmonics"]))
    inside = radius - np.hypot(du, dv)  # > 0 inside the blob, in fractions of the side
    (hx, hy, hr), (fx, fy, fr) = HOLE, FRAGMENT
    inside = np.minimum(inside, np.hypot(u - hx, v - hy) - hr)  # less the lumen
    inside = np.maximum(inside, fr - np.hypot(u - fx, v - fy))  # plus the fragment
    edge = EDGE_UM / (size_px * MPP)  # the soft edge, in fractions of the side
    return np.clip(inside / edge + 0.5, 0.0, 1.0)


def draw_slide_tile(y0: int, x0: int, h: int, w: int, *, size_px: int):
    """RGB ``(3, h, w)`` uint8 of the slide: `scale.draw_tile`'s H&E where there is tissue, glass elsewhere."""
    import numpy as np

    yy, xx = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    alpha = tissue_alpha(yy + 0.5, xx + 0.5, size_px)
    glass = np.asarray(GLASS)[:, None, None] + 4.0 * (_hash(yy, xx, 7)[None] - 0.5)
    if not alpha.any():  # all glass: no H&E to draw
        return np.clip(glass, 0, 255).astype(np.uint8)
    he = draw_tile(y0, x0, h, w, mpp=MPP).astype(np.float32)
    return np.clip(alpha[None] * he + (1.0 - alpha[None]) * glass, 0, 255).astype(np.uint8)


def make_slide(path: Path, size_px: int) -> dict:
    """Write the slide to ``path``: level 0 drawn tile by tile into a scratch zarr array, the pyramid built from it.

    Level 0 is drawn once, into the scratch array, and every coarser level is averaged from that array, so no level
    draws the tiles again.
    """
    import shutil

    import dask
    import dask.array as da
    import numpy as np
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    def block(_, block_info=None):
        (_, (y0, _), (x0, _)), (_, h, w) = block_info[None]["array-location"], block_info[None]["chunk-shape"]
        return draw_slide_tile(y0, x0, h, w, size_px=size_px)

    scratch = path.with_name(path.name + ".level0.zarr")
    lazy = da.map_blocks(block, da.zeros((3, size_px, size_px), chunks=(3, TILE, TILE), dtype=np.uint8), dtype=np.uint8)
    t = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        lazy.to_zarr(str(scratch), overwrite=True)
    drawn_s = time.perf_counter() - t
    image = Image2DModel.parse(
        da.from_zarr(str(scratch)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=SCALE_FACTORS,
        transformations={CS: Scale([MPP, MPP], ("x", "y"))},
    )
    sdata = SpatialData(images={IMAGE: image}, attrs={"omx": {"units": {CS: "um"}}})
    sdata.write(path, overwrite=True)
    shutil.rmtree(scratch)
    return {"drawn_s": round(drawn_s, 1), "written_s": round(time.perf_counter() - t - drawn_s, 1)}


# ------------------------------------------------------------------------------------------------------ training
def make_train(path: Path, name: str, *, side: int, bin_um: float, offset_um: float, seed: int) -> None:
    """A training section of ``side x side`` square bins of ``bin_um`` with counts, at the slide's 0.5 um/px.

    Its image is the tissue of `scale.draw_tile` from ``offset_um`` on (so two sections show different tissue), and
    each bin's counts are Poisson around the genes' log-means at its centre, as in `scale.make_section`.
    """
    import anndata as ad
    import dask.array as da
    import geopandas as gpd
    import numpy as np
    import pandas as pd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    margin_um = 3 * bin_um  # more than the largest patches (three times the bin) reach past the outer bins
    size_px = int(np.ceil((2 * margin_um + side * bin_um) / MPP))
    off = int(round(offset_um / MPP))
    blocks = da.map_blocks(
        lambda b, block_info=None: draw_tile(
            off + block_info[None]["array-location"][1][0],
            off + block_info[None]["array-location"][2][0],
            *block_info[None]["chunk-shape"][1:],
            mpp=MPP,
        ),
        da.zeros((3, size_px, size_px), chunks=(3, TILE, TILE), dtype=np.uint8),
        dtype=np.uint8,
    )
    image = Image2DModel.parse(
        blocks, dims=("c", "y", "x"), scale_factors=[2, 2], transformations={name: Scale([MPP, MPP], ("x", "y"))}
    )
    n = side * side
    row, col = np.divmod(np.arange(n), side)
    x0, y0 = margin_um + col * bin_um, margin_um + row * bin_um
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=shapely.box(x0, y0, x0 + bin_um, y0 + bin_um)),
        transformations={name: Scale([1, 1], ("x", "y"))},
    )
    base, weights = gene_weights()
    cx, cy = x0 + bin_um / 2 + offset_um, y0 + bin_um / 2 + offset_um  # the bins' centres in the tissue's microns
    log_mu = base + np.column_stack(fields(cx, cy)) @ weights.T + np.log((bin_um / 8.0) ** 2)  # counts grow with area
    rng = np.random.default_rng(seed)
    X = rng.poisson(np.exp(log_mu) * rng.uniform(0.5, 1.5, (n, 1)))
    obs = pd.DataFrame({"region": f"{name}_bins", "bin_id": np.arange(n), "section": name})
    obs.index = [f"{name}_{i}" for i in range(n)]
    adata = ad.AnnData(X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))
    table = TableModel.parse(adata, region=f"{name}_bins", region_key="region", instance_key="bin_id")
    sdata = SpatialData(
        images={f"{name}_he": image},
        shapes={f"{name}_bins": shapes},
        tables={"table": table},
        attrs={"omx": {"units": {name: "um"}}},
    )
    sdata.write(path, overwrite=True)


def fit_model(workdir: Path, bin_um: float) -> dict:
    """Fit a ridge on handcrafted features of section T1, score it on T2, and save it (or reuse a saved one)."""
    import spatialdata as sd

    import omx

    tag = f"{bin_um:g}um"
    done = workdir / f"model_ridge_{tag}" / "fit.json"
    if done.exists():
        return json.loads(done.read_text())
    parts = []
    for name, offset_um, seed in (("T1", 0.0, 1), ("T2", 4000.0, 2)):
        path = workdir / f"train_{name}_{tag}.zarr"
        if not path.exists():
            make_train(path, name, side=60, bin_um=bin_um, offset_um=offset_um, seed=seed)
        parts.append(sd.read_zarr(path))
    sdata = sd.concatenate(parts, concatenate_tables=True)
    sdata.attrs["omx"] = {"units": {"T1": "um", "T2": "um"}}
    model = omx.models.Ridge(encoder=omx.encoders.HandcraftedEncoder(patch_px=32), show_progress_bar=False)
    t = time.perf_counter()
    omx.tl.fit_predict(sdata, train="T1", predict="T2", model=model, show_progress_bar=False, key_added="ridge")
    score = sdata.tables["table"].uns["omx"]["ridge"]["summary"]["T2"]["all"]["pearson"]
    model.save(done.parent, overwrite=True)
    out = {
        "train_bins": 3600,
        "fit_and_predict_s": round(time.perf_counter() - t, 1),
        "held_out_mean_r": round(float(score), 3),
    }
    done.write_text(json.dumps(out))
    return out


# --------------------------------------------------------------------------------------------------------- steps
def grid_key(which: str, bin_um: float) -> str:
    return f"grid_{which}_{bin_um:g}um"


def write_elements(sdata, names: list[str]) -> None:
    """Write ``names`` to the store the SpatialData was read from, replacing what an earlier run wrote there."""
    on_disk = set(sdata.elements_paths_on_disk())
    for name in names:
        kind = "tables" if name in sdata.tables else "shapes"
        if f"{kind}/{name}" in on_disk:
            sdata.delete_element_from_disk(name)
        sdata.write_element(name)


def reset(store: Path) -> list[str]:
    """Delete from the store all that earlier runs added to the slide, so every run starts from the image alone."""
    import spatialdata as sd

    sdata = sd.read_zarr(store)
    names = [p.split("/", 1)[1] for p in sdata.elements_paths_on_disk() if p != f"images/{IMAGE}"]
    for name in names:
        sdata.delete_element_from_disk(name)
    return names


def run_step(args: argparse.Namespace, step: str) -> dict:
    """One step in a fresh process of its own (see `step`); its peak memory is that process's alone."""
    import spatialdata as sd

    import omx

    store = args.workdir / f"slide_{args.size_px}px.zarr"
    model_path = args.workdir / f"model_ridge_{args.bin_um:g}um"
    which = "tissue" if step.endswith("tissue") else "image"
    key = grid_key(which, args.bin_um)
    made = {"detect_tissue": f"{IMAGE}_tissue", "predict_image": "pred_image", "predict_tissue": "pred_tissue"}
    sdata = sd.read_zarr(store)
    # what this step makes, where an earlier run left it (a step run alone), and, for the grid over the whole
    # image, the tissue (tile_grid would keep to it)
    for name in (made.get(step, key), f"{IMAGE}_tissue" if step == "grid_image" else None):
        if name in sdata:
            del sdata[name]
    n_units, extra, written = None, {}, []
    before = memory_gb()
    t = time.perf_counter()
    if step == "detect_tissue":
        omx.pp.detect_tissue(sdata, image_key=IMAGE)
        written = [f"{IMAGE}_tissue"]
    elif step.startswith("grid_"):
        omx.pp.tile_grid(
            sdata,
            image_key=IMAGE,
            kind="square",
            size_um=args.bin_um,
            within="tissue" if which == "tissue" else None,
            key_added=key,
        )
        written = [key]
    elif step.startswith("predict_"):
        omx.tl.predict_expression(
            sdata, model_path, image_key=IMAGE, shapes_key=key, key_added=f"pred_{which}", show_progress_bar=False
        )
        written = [f"pred_{which}"] if which == "tissue" else []  # the map draws the tissue's predictions
    elif step == "plot":
        import matplotlib

        matplotlib.use("Agg")
        png = args.workdir / f"slide_{args.size_px}px_{args.bin_um:g}um_g0.png"
        omx.pl.prediction_map(sdata, "g0", table_key="pred_tissue", show=False, save=png)
        extra["png"] = str(png)
    else:
        raise ValueError(step)
    seconds = time.perf_counter() - t
    after = memory_gb()  # before the checks below allocate
    if step == "detect_tissue":
        tissue = sdata.shapes[f"{IMAGE}_tissue"]
        n_units = len(tissue)
        extra["tissue_mm2"] = round(float(tissue["area_um2"].sum()) / 1e6, 2)
        extra["tissue_fraction"] = round(extra["tissue_mm2"] * 1e6 / (args.size_px * MPP) ** 2, 3)
    elif step.startswith("grid_"):
        n_units = len(sdata.shapes[key])
    elif step.startswith("predict_"):
        extra.update(prediction_check(sdata.tables[f"pred_{which}"], args.size_px))
        n_units = sdata.tables[f"pred_{which}"].n_obs
    elif step == "plot":
        n_units = sdata.tables["pred_tissue"].n_obs
    if written:
        write_elements(sdata, written)
    return {
        "step": step,
        "n_units": n_units,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(after["peak"], 2),
        "rss_before_gb": round(before["rss"], 2),
        **extra,
    }


def prediction_check(pred, size_px: int) -> dict:
    """Mean Pearson r over genes between the predictions and the genes' true log-means, at bins inside the tissue."""
    import numpy as np

    xy = pred.obsm["spatial"]  # microns
    inside = tissue_alpha(xy[:, 1] / MPP, xy[:, 0] / MPP, size_px) >= 1.0
    base, weights = gene_weights()
    truth = base + np.column_stack(fields(xy[inside, 0], xy[inside, 1])) @ weights.T
    X = np.asarray(pred.X)[inside]
    genes = [int(g[1:]) for g in pred.var_names]
    r = [np.corrcoef(X[:, j], truth[:, g])[0, 1] for j, g in enumerate(genes)]
    return {"r_with_truth": round(float(np.nanmean(r)), 3), "n_scored": int(inside.sum())}


# ------------------------------------------------------------------------------------------------------ launcher
def child(args: argparse.Namespace, *step_args: str) -> dict:
    """Run this script with ``step_args`` in a fresh Python process; return the JSON it prints last."""
    cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--size-px", str(args.size_px)]
    cmd += ["--bin-um", str(args.bin_um), *step_args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr[-3000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


STEPS = ["grid_image", "detect_tissue", "grid_tissue", "predict_image", "predict_tissue", "plot"]
NAMES = {
    "grid_image": "tile_grid (image)",
    "detect_tissue": "detect_tissue",
    "grid_tissue": "tile_grid (tissue)",
    "predict_image": "predict (image)",
    "predict_tissue": "predict (tissue)",
    "plot": "prediction_map",
}


def launch(args: argparse.Namespace) -> None:
    """The launcher: holds no data and runs every step in a fresh process."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.workdir / f"slide_{args.size_px}px.zarr"
    out = {
        "size_px": args.size_px,
        "mpp": MPP,
        "bin_um": args.bin_um,
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "steps": [],
    }
    if not store.exists():
        made = child(args, "--make")
        print(json.dumps(made), flush=True)
        if "error" in made:
            raise SystemExit("writing the slide failed")
        out["made"] = made
    else:
        print(json.dumps(child(args, "--reset")), flush=True)
    fit = child(args, "--fit")
    print(json.dumps(fit), flush=True)
    if "error" in fit:
        raise SystemExit("fitting failed")
    out["fit"] = fit["fit"]
    steps = [s for s in STEPS if not (args.no_plot and s == "plot")]
    for step in steps:
        load = os.getloadavg()[0]
        row = {"step": step, **child(args, "--step", step), "load_1min": round(load, 2)}
        print(json.dumps(row), flush=True)
        out["steps"].append(row)
        if "error" in row:
            break
    out["load_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"slide_{args.size_px}px_{args.bin_um:g}um.json"
    path.write_text(json.dumps(out, indent=1))
    print(table(out))
    print(f"Results: {path}")


def table(out: dict) -> str:
    lines = [
        f"Slide {out['size_px']:,} x {out['size_px']:,} px at {out['mpp']} um/px, {out['bin_um']:g}-um bins; "
        f"{out['cpus']} CPUs, load average {out['load_before'][0]:.1f} before",
        f"{'step':<20}{'units':>10}{'seconds':>10}{'peak GB':>10}{'before GB':>11}{'load':>7}{'r':>8}",
    ]
    for row in out["steps"]:
        if "error" in row:
            lines.append(f"{NAMES[row['step']]:<20} failed: {row['error'].strip().splitlines()[-1]}")
            continue
        lines.append(
            f"{NAMES[row['step']]:<20}{row['n_units']:>10,}{row['seconds']:>10.1f}{row['peak_rss_gb']:>10.2f}"
            f"{row['rss_before_gb']:>11.2f}{row['load_1min']:>7.1f}"
            + (f"{row['r_with_truth']:>8.3f}" if "r_with_truth" in row else "")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-px", type=int, default=20_000, help="side of the slide in pixels at 0.5 um/px")
    parser.add_argument("--bin-um", type=float, default=16.0, help="side of the square bins in microns")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/omx_slide"))
    parser.add_argument("--no-plot", action="store_true", help="skip the prediction map")
    # internal steps, each run in a process of its own by the launcher
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--reset", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        t = time.perf_counter()
        made = make_slide(args.workdir / f"slide_{args.size_px}px.zarr", args.size_px)
        print(json.dumps({"made": args.size_px, **made, "seconds": round(time.perf_counter() - t, 1)}))
    elif args.reset:
        print(json.dumps({"deleted": reset(args.workdir / f"slide_{args.size_px}px.zarr")}))
    elif args.fit:
        print(json.dumps({"fit": fit_model(args.workdir, args.bin_um)}))
    elif args.step:
        print(json.dumps(run_step(args, args.step)))
    else:
        launch(args)


if __name__ == "__main__":
    main()
