"""Wall time and peak memory of `omx.pp.segment_nuclei` on large synthetic H&E images read from disk.

    python benchmarks/nuclei_scale.py                          # 10,000, 20,000 and 30,000 px squares
    python benchmarks/nuclei_scale.py --sizes 10000 20000 --root /tmp/omx_nuclei_bench

Each image is a zarr-backed SpatialData under ``--root`` (made once, then reused): pink eosin background with
dark purple hematoxylin nuclei (the discs and stain colours of `omx.datasets.toy_sdata`) at the toy's nucleus
density, 0.5 um per pixel. It is drawn block by block with dask (a block's nuclei come from a generator seeded by
the block's position, so nuclei that cross block borders are drawn whole), so making it never holds the image in
memory. Segmentation of each size runs in a fresh process, so its peak RSS (max resident memory) is its own;
before this change the labels alone took 4 bytes per pixel (3.6 GB at 30,000 x 30,000).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

MPP = 0.5
BLOCK = 2048  # the image's chunks
PAD = 16  # pixels drawn around a block: more than a nucleus radius plus the blur


def _nuclei(seed: int, by: int, bx: int):
    """Centres (x, y in image pixels), radii and stain strengths of the nuclei whose centres lie in block (by, bx)."""
    from omx.datasets._toy import _NUCLEI_PER_UM2, _NUCLEUS_RADIUS_UM

    rng = np.random.default_rng([seed, by + 1, bx + 1])  # seeds are non-negative; by, bx start at -1
    n = rng.poisson(_NUCLEI_PER_UM2 * (BLOCK * MPP) ** 2)
    centre = (rng.uniform(0, BLOCK, size=(n, 2)) + [bx * BLOCK, by * BLOCK]).astype(np.int64)
    radius = np.round(_NUCLEUS_RADIUS_UM / MPP * rng.uniform(0.85, 1.15, size=n)).astype(np.int64)
    return centre, radius, rng.uniform(0.8, 1.2, size=n)


def _block(seed: int, block_id) -> np.ndarray:
    """One ``(3, BLOCK, BLOCK)`` uint8 block of the image."""
    from omx.datasets._toy import _draw_nuclei, _stain_rgb

    _, by, bx = block_id
    parts = [_nuclei(seed, by + dy, bx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    centre = np.concatenate([p[0] for p in parts]) - [bx * BLOCK - PAD, by * BLOCK - PAD]
    radius, strength = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    side = BLOCK + 2 * PAD
    hema = ndimage.gaussian_filter(_draw_nuclei((side, side), centre, radius, strength), 0.6 / MPP)
    hema = hema[PAD:-PAD, PAD:-PAD] * 0.9 + 0.04
    rng = np.random.default_rng([seed, by, bx, 1])
    eosin = (0.30 + 0.05 * rng.random((BLOCK, BLOCK))).astype(np.float32)
    return _stain_rgb(hema, eosin, rng).transpose(2, 0, 1)


def make_image(path: Path, size: int, seed: int = 0) -> None:
    """Write a ``size`` x ``size`` synthetic H&E SpatialData to ``path``, block by block."""
    import dask
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    n = -(-size // BLOCK)
    lazy = da.map_blocks(
        lambda block_id=None: _block(seed, block_id),
        dtype="uint8",
        chunks=((3,), (BLOCK,) * n, (BLOCK,) * n),
    )[:, :size, :size]
    image = Image2DModel.parse(
        lazy,
        dims=("c", "y", "x"),
        transformations={"global": Scale([MPP, MPP], axes=("y", "x"))},
    )
    sdata = SpatialData(images={"he": image})
    sdata.attrs["omx"] = {"units": {"global": "um"}}
    with dask.config.set(scheduler="threads", num_workers=1):  # one block at a time
        sdata.write(path)


def run_one(path: Path) -> dict:
    """Segment the image at ``path`` (read from disk) and report time, nuclei and peak memory."""
    import dask
    from spatialdata import read_zarr

    import omx

    sdata = read_zarr(path)
    size = int(sdata.images["he"].sizes["x"])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    t = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=1):
        omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    seconds = time.perf_counter() - t
    labels = sdata.labels["he_nuclei"].data
    centres = np.c_[sdata.shapes["he_nuclei_shapes"].geometry.y, sdata.shapes["he_nuclei_shapes"].geometry.x]
    y, x = np.round(centres[:: max(1, len(centres) // 1000)]).astype(int).T  # spot check 1,000 nuclei
    return {
        "size_px": size,
        "n_nuclei": sdata.tables["omx_cells"].n_obs,
        "seconds": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "rss_after_read_gb": loaded,
        "labels_in_memory_before_gb": 4 * size * size / 1024**3,
        "labels_chunks": str(labels.chunksize),
        "label_at_centroid": float(np.mean(labels.vindex[y, x].compute() > 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 20_000, 30_000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/omx_nuclei_bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker)))
        return
    if args.make:
        make_image(args.make, args.sizes[0], args.seed)
        return
    import pandas as pd

    records = []
    for size in args.sizes:
        path = args.root / f"he_{size}_seed{args.seed}.zarr"
        if not path.exists():
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--make", str(path), "--sizes", str(size), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"making the {size} px image failed")
            print(f"made {path} in {time.perf_counter() - t:.0f} s", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"size {size} failed")
        records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(records[-1], flush=True)
    print(f"\nsegment_nuclei on synthetic H&E read from zarr ({os.cpu_count()} CPUs; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}):")  # fmt: skip
    print(pd.DataFrame(records).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
