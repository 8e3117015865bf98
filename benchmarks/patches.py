"""Patch extraction throughput and memory.

    python benchmarks/patches.py            # both measurements
    python benchmarks/patches.py --large    # only the 20,000 x 20,000 px / 100,000-spot run

Prints patches per second for 224-px patches from an in-memory image, and time and peak memory (RSS) for a
20,000 x 20,000 px synthetic image with 100,000 spots, patched and encoded (handcrafted features) as a stream.
"""

from __future__ import annotations

import argparse
import resource
import time

import geopandas as gpd
import numpy as np
import pandas as pd
import spatialdata as sd
from anndata import AnnData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import omx


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synthetic(size_px: int, n_spots: int, mpp: float = 0.5, seed: int = 0, chunks: int = 4096) -> sd.SpatialData:
    rng = np.random.default_rng(seed)
    # cheap H&E-like texture: pink background with purple noise, built in row blocks to bound memory
    img = np.empty((3, size_px, size_px), dtype=np.uint8)
    base = np.array([230, 170, 210], dtype=np.int16)[:, None, None]
    for y in range(0, size_px, chunks):
        block = rng.integers(-40, 20, size=(1, min(chunks, size_px - y), size_px), dtype=np.int16)
        img[:, y : y + chunks] = np.clip(base + block, 0, 255).astype(np.uint8)
    side = int(np.ceil(np.sqrt(n_spots)))
    pitch_um = size_px * mpp / (side + 1)
    xs, ys = np.meshgrid(np.arange(1, side + 1) * pitch_um, np.arange(1, side + 1) * pitch_um)
    xy = np.c_[xs.ravel(), ys.ravel()][:n_spots]
    gdf = gpd.GeoDataFrame({"radius": np.full(n_spots, 27.5)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]))
    image = Image2DModel.parse(
        img, dims=("c", "y", "x"), chunks=(3, 2048, 2048), transformations={"S": Scale([mpp, mpp], axes=("y", "x"))}
    )
    shapes = ShapesModel.parse(gdf, transformations={"S": Identity()})
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * n_spots), "spot_id": np.arange(n_spots)})
    obs.index = obs.index.astype(str)
    table = TableModel.parse(AnnData(obs=obs), region="spots", region_key="region", instance_key="spot_id")
    return sd.SpatialData(
        images={"he": image}, shapes={"spots": shapes}, tables={"table": table}, attrs={"omx": {"units": {"S": "um"}}}
    )


def throughput() -> None:
    sdata = synthetic(8000, 4000)
    spots = omx.pp.resolve_spots(sdata)
    for size_um in (112.0, 56.0, 224.0):  # 224 px at 0.5 um/px (native), 0.25 (upsampled), 1.0 (downsampled)
        t = time.perf_counter()
        n = 0
        for idx, _ in omx.pp.iter_patches(spots, size_um=size_um, size_px=224, batch_size=256):
            n += len(idx)
        dt = time.perf_counter() - t
        print(f"224-px patches, {size_um / 224:.2f} um/px from 0.50 um/px: {n / dt:,.0f} patches/s ({n} in {dt:.2f} s)")


def large() -> None:
    t = time.perf_counter()
    sdata = synthetic(20000, 100_000)
    print(
        f"built 20,000 x 20,000 px image, 100,000 spots in {time.perf_counter() - t:.1f} s; "
        f"peak RSS {peak_rss_gb():.2f} GB"
    )
    encoder = omx.encoders.HandcraftedEncoder()
    t = time.perf_counter()
    feats = None
    for idx, patches in omx.pp.iter_patches(sdata, size_um=55, size_px=encoder.patch_px, batch_size=512):
        f = encoder.transform(patches)
        if feats is None:
            feats = np.empty((100_000, f.shape[1]), dtype=np.float32)
        feats[idx] = f
    dt = time.perf_counter() - t
    print(
        f"100,000 spots patched and encoded ({encoder.patch_px} px, {feats.shape[1]} features) in {dt:.1f} s "
        f"({100_000 / dt:,.0f} spots/s); peak RSS {peak_rss_gb():.2f} GB"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="only the large run")
    args = parser.parse_args()
    if not args.large:
        throughput()
    large()
