"""Super-resolution where the fine truth is known: her2st pseudo-spots, and synthetic Visium HD bins.

    python benchmarks/superres.py                   # both
    python benchmarks/superres.py --data her2st     # her2st only (needs shared/data/her2st)
    python benchmarks/superres.py --data hd         # synthetic Visium HD only

her2st: each section's 100-um ST spots are merged into pseudo-spots of 3 x 3 array positions (600 um across; the
counts of up to 9 spots summed). `omx.tl.super_resolve` is trained on the pseudo-spots of the training sections
only (the original spots are its fine units; their counts are never read) and predicts every original spot of the
held-out section, whose own pseudo-spots it may use (``anchor=True``), as a user super-resolving a coarse
measurement would. Folds: leave one section out over C2, C3, C4 and B4 (her2st benchmark sections). Scores: mean
per-gene Pearson r against the measured spots (log1p(CP10k)), over the 785-gene panel and over the 50 genes most
variable across the training pseudo-spots. Baselines, which see the held-out pseudo-spots too:

- ``pseudo-spot value``: each spot gets its pseudo-spot's value;
- ``interpolation``: Gaussian-kernel interpolation of the pseudo-spot values at the spot centres, with the kernel
  width (sigma, in pseudo-spot pitches) chosen on the training sections' spots (their fine truth, which omx never
  sees), and, as an upper bound, with the width best for the held-out section itself (``interpolation (best)``).

``omx (image only)`` is the model's prediction without the held-out pseudo-spots.

Synthetic Visium HD: the tissue of ``benchmarks/scale.py`` (two smooth fields drive nuclei and the expression of 50
genes), with a third field of short wavelength (60-90 um) that drives nucleus size and 25 of the genes, so that
there is detail finer than the spots for the image to show. Counts of 8-um bins are drawn, and 55-um Visium spots
(100 um apart) are the sums of the bins whose centres lie in them. Trained on the spots of one section, the model
predicts every 8-um bin of another; scores against the bins' true log-means (the noise-free truth) and against their
counts, with the same baselines (each bin gets its nearest spot's value, or the interpolated spot values).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from omx.tl._superres import _kernel_mean as kernel_mean

SECTIONS = ["C2", "C3", "C4", "B4"]
BLOCK = 3  # pseudo-spots of BLOCK x BLOCK array positions
SIGMAS = (0.25, 0.35, 0.5, 0.7, 1.0)  # interpolation kernel widths, in pseudo-spot pitches


def mean_r(truth: np.ndarray, pred: np.ndarray, cols: np.ndarray | None = None) -> float:
    from omx.metrics import pearson

    r = pearson(truth, pred)
    if cols is not None:
        r = r[cols]
    return float(np.nanmean(r))


# ---------------------------------------------------------------------------------------------------- her2st
def pseudo_spots(sdata, section: str):
    """Pseudo-spot shapes (polygons: the hull of the member circles) and summed counts of one section."""
    import geopandas as gpd
    import shapely
    from scipy import sparse
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    table = sdata.tables["table"]
    rows = np.flatnonzero(table.obs["section"].astype(str).to_numpy() == section)
    obs = table.obs.iloc[rows]
    spots = sdata.shapes[f"{section}_spots"].loc[obs["spot_id"].to_numpy()]
    block = (obs["array_x"].to_numpy() // BLOCK).astype(int) * 1000 + (obs["array_y"].to_numpy() // BLOCK).astype(int)
    labels, member = np.unique(block, return_inverse=True)
    circles = shapely.buffer(np.asarray(spots.geometry.values), spots["radius"].to_numpy())
    hulls = [shapely.convex_hull(shapely.union_all(circles[member == k])) for k in range(len(labels))]
    gdf = gpd.GeoDataFrame(
        {"n_spots": np.bincount(member)}, geometry=hulls, index=pd.Index([f"{section}_p{k}" for k in labels])
    )
    shapes = ShapesModel.parse(gdf, transformations=get_transformation(sdata.shapes[f"{section}_spots"], get_all=True))
    X = table.X[rows]
    summed = sparse.csr_matrix((np.ones(len(rows)), (member, np.arange(len(rows)))), shape=(len(labels), len(rows)))
    return shapes, summed @ X, member


def her2st(seed: int) -> pd.DataFrame:
    import anndata as ad
    from scipy import sparse
    from spatialdata.models import TableModel

    import omx
    from omx._utils import log_normalize

    sdata = omx.datasets.her2st(sections=SECTIONS)
    panel = omx.datasets.her2st_genes()
    table = sdata.tables["table"]
    panel = [g for g in panel if g in table.var_names]
    parts, members = [], {}
    for s in SECTIONS:
        shapes, X, member = pseudo_spots(sdata, s)
        sdata.shapes[f"{s}_pseudo"] = shapes
        members[s] = member
        obs = pd.DataFrame(
            {"region": f"{s}_pseudo", "pid": shapes.index, "section": s, "patient": s[0]}, index=shapes.index
        )
        parts.append(ad.AnnData(sparse.csr_matrix(X), obs=obs, var=pd.DataFrame(index=table.var_names)))
    pseudo = ad.concat(parts)
    pseudo.obs["region"] = pseudo.obs["region"].astype("category")
    sdata.tables["pseudo"] = TableModel.parse(
        pseudo, region=[f"{s}_pseudo" for s in SECTIONS], region_key="region", instance_key="pid"
    )
    fine = {s: f"{s}_spots" for s in SECTIONS}
    gene_idx = table.var_names.get_indexer(panel)

    def spot_truth(s):
        rows = np.flatnonzero(table.obs["section"].astype(str).to_numpy() == s)
        shapes = sdata.shapes[f"{s}_spots"].loc[table.obs["spot_id"].to_numpy()[rows]]
        xy = np.asarray(shapes.geometry.get_coordinates())
        return log_normalize(table.X[rows], columns=gene_idx), xy

    def pseudo_values(s):
        rows = np.flatnonzero(pseudo.obs["section"].astype(str).to_numpy() == s)
        c = sdata.shapes[f"{s}_pseudo"].geometry.centroid
        return log_normalize(pseudo.X[rows], columns=gene_idx), np.c_[c.x, c.y]

    def pitch(xy):
        from scipy.spatial import cKDTree

        return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))

    results = []
    for held in SECTIONS:
        train = [s for s in SECTIONS if s != held]
        y_true, xy = spot_truth(held)
        pv, pxy = pseudo_values(held)
        base_a = pv[members[held]]
        # kernel width of the interpolation chosen on the training sections' own spots
        best_sigma = max(
            SIGMAS,
            key=lambda f: np.mean(
                [
                    mean_r(spot_truth(s)[0], kernel_mean(pseudo_values(s)[1], pseudo_values(s)[0],
                                                                spot_truth(s)[1], f * pitch(pseudo_values(s)[1])))
                    for s in train
                ]
            ),
        )  # fmt: skip
        base_b = kernel_mean(pxy, pv, xy, best_sigma * pitch(pxy))
        oracle = max(mean_r(y_true, kernel_mean(pxy, pv, xy, f * pitch(pxy))) for f in SIGMAS)
        # the 50 genes most variable across the training pseudo-spots
        train_pv = np.concatenate([pseudo_values(s)[0] for s in train])
        top = np.argsort(-train_pv.var(axis=0))[:50]
        row = {"section": held, "train": "+".join(train), "sigma_pitches": best_sigma}
        for anchor in (True, False):
            key = f"sr_{held}_{anchor}"
            t = time.perf_counter()
            omx.tl.super_resolve(
                sdata, train=train, predict=[held], fine=fine, table_key="pseudo", genes=panel, anchor=anchor,
                key_added=key, seed=seed, show_progress_bar=False,
            )  # fmt: skip
            seconds = time.perf_counter() - t
            out = sdata.tables[key]
            pred = (
                pd.DataFrame(out.X, index=out.obs["spot_id"].to_numpy())
                .loc[table.obs["spot_id"].to_numpy()[table.obs["section"].astype(str).to_numpy() == held]]
                .to_numpy()
            )
            name = "omx" if anchor else "omx (image only)"
            row[f"{name}: all"], row[f"{name}: top50"], row[f"{name}: s"] = (
                mean_r(y_true, pred), mean_r(y_true, pred, top), seconds
            )  # fmt: skip
            del sdata.tables[key]
        for name, pred in (("pseudo-spot value", base_a), ("interpolation", base_b)):
            row[f"{name}: all"], row[f"{name}: top50"] = mean_r(y_true, pred), mean_r(y_true, pred, top)
        row["interpolation (best): all"] = oracle
        results.append(row)
        print(pd.Series(row).to_string(), flush=True)
    return pd.DataFrame(results)


# ---------------------------------------------------------------------------------------------------- synthetic HD
HD_MPP, HD_SIDE_UM, HD_MARGIN_UM = 0.5, 2000.0, 60.0
BIN_UM, SPOT_RADIUS_UM, SPOT_PITCH_UM = 8.0, 27.5, 100.0
FINE = 1.0  # amplitude of the short-wavelength field in the image and the genes
DEPTH = 0.5  # counts per bin relative to exp(log-mean)


def hd_truth(xy_um: np.ndarray):
    """True log-mean of the 50 genes at ``xy_um``: scale.py's two fields, plus the fine field for genes 0-24."""
    from scale import N_GENES, fields, fine_field, gene_weights

    base, weights = gene_weights()
    fine_w = np.zeros(N_GENES)
    fine_w[: N_GENES // 2] = np.random.default_rng(1).normal(0.0, 0.8, N_GENES // 2)
    ff = fine_field(xy_um[:, 0], xy_um[:, 1])
    density, size = fields(xy_um[:, 0], xy_um[:, 1])
    return base + np.column_stack([density + FINE * ff, size + FINE * ff]) @ weights.T + np.outer(ff, fine_w)


def hd_section(name: str, seed: int, offset_um: float):
    """One synthetic Visium HD section: image, 8-um bins with counts and truth, 55-um spots summing the bins.

    ``offset_um`` shifts the section's window on the fields, so that two sections show different tissue.
    """
    import anndata as ad
    import geopandas as gpd
    import shapely
    from scale import draw_tile
    from scipy import sparse
    from scipy.spatial import cKDTree
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity, Scale

    from omx._utils import log_normalize

    n_px = int(HD_SIDE_UM / HD_MPP)
    o_px = int(offset_um / HD_MPP)
    img = np.zeros((3, n_px, n_px), np.uint8)
    for y0 in range(0, n_px, 1000):
        for x0 in range(0, n_px, 1000):
            h, w = min(1000, n_px - y0), min(1000, n_px - x0)
            img[:, y0 : y0 + h, x0 : x0 + w] = draw_tile(o_px + y0, o_px + x0, h, w, mpp=HD_MPP, fine=FINE)
    image = Image2DModel.parse(
        img, dims=("c", "y", "x"), scale_factors=[2, 2], transformations={name: Scale([HD_MPP, HD_MPP], ("x", "y"))}
    )
    n_bins = int(HD_SIDE_UM / BIN_UM)
    rr, cc = np.divmod(np.arange(n_bins * n_bins), n_bins)
    centres = np.c_[(cc + 0.5) * BIN_UM, (rr + 0.5) * BIN_UM]
    log_mu = hd_truth(centres + offset_um)
    rng = np.random.default_rng(seed)
    bin_counts = rng.poisson(DEPTH * np.exp(log_mu))
    half = BIN_UM / 2
    boxes = shapely.box(centres[:, 0] - half, centres[:, 1] - half, centres[:, 0] + half, centres[:, 1] + half)
    bins = ShapesModel.parse(
        gpd.GeoDataFrame({"array_row": rr, "array_col": cc}, geometry=boxes), transformations={name: Identity()}
    )
    # Visium spots: a hexagonal lattice 100 um apart, each the sum of the bins whose centres lie in it
    rows = np.arange(HD_MARGIN_UM, HD_SIDE_UM - HD_MARGIN_UM, SPOT_PITCH_UM * np.sqrt(3) / 2)
    spot_xy = np.array(
        [(x + (i % 2) * SPOT_PITCH_UM / 2, y) for i, y in enumerate(rows)
         for x in np.arange(HD_MARGIN_UM, HD_SIDE_UM - HD_MARGIN_UM - SPOT_PITCH_UM / 2, SPOT_PITCH_UM)]
    )  # fmt: skip
    found = cKDTree(centres).query_ball_point(spot_xy, r=SPOT_RADIUS_UM)
    member = sparse.csr_matrix(
        (
            np.ones(sum(map(len, found))),
            (np.repeat(np.arange(len(found)), list(map(len, found))), np.concatenate(found)),
        ),
        shape=(len(spot_xy), len(centres)),
    )
    spots = ShapesModel.parse(
        spot_xy, geometry=0, radius=np.full(len(spot_xy), SPOT_RADIUS_UM), transformations={name: Identity()}
    )
    obs = pd.DataFrame({"region": f"{name}_spots", "spot_id": np.arange(len(spot_xy)), "section": name})
    obs.index = [f"{name}_{i}" for i in range(len(spot_xy))]
    genes = [f"g{i}" for i in range(log_mu.shape[1])]
    table = ad.AnnData(sparse.csr_matrix(member @ bin_counts, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))
    truth = log_normalize(np.exp(log_mu))  # the bins' noise-free expression on omx's scale
    measured = log_normalize(bin_counts)
    return {
        "image": image, "bins": bins, "spots": spots, "table": table, "truth": truth, "measured": measured,
        "bin_xy": centres, "spot_xy": spot_xy,
    }  # fmt: skip


def hd(seed: int) -> pd.DataFrame:
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import TableModel

    import omx

    parts = {"T": hd_section("T", seed, 0.0), "H": hd_section("H", seed + 1, 3000.0)}
    table = ad.concat([p["table"] for p in parts.values()])
    table.obs["region"] = table.obs["region"].astype("category")
    sdata = sd.SpatialData(
        images={f"{n}_he": p["image"] for n, p in parts.items()},
        shapes={
            **{f"{n}_spots": p["spots"] for n, p in parts.items()},
            **{f"{n}_bins": p["bins"] for n, p in parts.items()},
        },
        tables={
            "table": TableModel.parse(table, region=["T_spots", "H_spots"], region_key="region", instance_key="spot_id")
        },
        attrs={"omx": {"units": {"T": "um", "H": "um"}}},
    )
    train, held = parts["T"], parts["H"]
    rows = {}

    def spot_values(p):
        from omx._utils import log_normalize

        return log_normalize(p["table"].X)

    def nearest(p):
        from scipy.spatial import cKDTree

        return spot_values(p)[cKDTree(p["spot_xy"]).query(p["bin_xy"])[1]]

    sigma = max(
        SIGMAS, key=lambda f: mean_r(train["truth"], kernel_mean(train["spot_xy"], spot_values(train), train["bin_xy"],
                                                                  f * SPOT_PITCH_UM))
    )  # fmt: skip
    preds = {
        "nearest spot value": nearest(held),
        "interpolation": kernel_mean(held["spot_xy"], spot_values(held), held["bin_xy"], sigma * SPOT_PITCH_UM),
    }
    for anchor in (True, False):
        key = f"sr_{anchor}"
        t = time.perf_counter()
        omx.tl.super_resolve(
            sdata, train=["T"], predict=["H"], fine={"H": "H_bins"}, bin_um=BIN_UM, anchor=anchor, key_added=key,
            seed=seed, show_progress_bar=False,
        )  # fmt: skip
        out = sdata.tables[key]
        name = "omx" if anchor else "omx (image only)"
        rows[f"{name}: s"] = time.perf_counter() - t
        preds[name] = pd.DataFrame(out.X, index=out.obs["spot_id"].to_numpy()).sort_index().to_numpy()
    fine_genes = np.arange(25)
    for name, pred in preds.items():
        rows[f"{name}: truth"] = mean_r(held["truth"], pred)
        rows[f"{name}: truth, fine genes"] = mean_r(held["truth"], pred, fine_genes)
        rows[f"{name}: counts"] = mean_r(held["measured"], pred)
    rows["sigma_pitches"] = sigma
    rows["bins"] = len(held["bin_xy"])
    rows["spots (train, held-out)"] = f"{len(train['spot_xy'])}, {len(held['spot_xy'])}"
    return pd.Series(rows).to_frame().T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["her2st", "hd", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--feature-store", type=Path, default=None, help="keep features here between runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import omx

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="omx_superres_") as tmp:
        omx.settings.feature_store = args.feature_store or tmp  # each section's features once, across folds
        if args.data in ("her2st", "both"):
            res = her2st(args.seed)
            res.to_csv(args.out / "superres_her2st.csv", index=False)
            cols = [c for c in res.columns if c.endswith((": all", ": top50"))]
            print("\nher2st, mean over folds:\n" + res[cols].mean().round(4).to_string())
        if args.data in ("hd", "both"):
            res = hd(args.seed)
            res.to_csv(args.out / "superres_hd.csv", index=False)
            print("\nsynthetic Visium HD (8-um bins):\n" + res.T.to_string())


if __name__ == "__main__":
    main()
