"""Benchmarks of nuclei, deconvolution and image-only proportions; each part prints its numbers.

Run one part per process (peak memory is per process)::

    python benchmarks/deconvolution.py segment   # nuclei on a full her2st section: seconds, peak GB, counts
    python benchmarks/deconvolution.py simulate  # simulated spots: Bayesian model vs NNLS, interval coverage
    python benchmarks/deconvolution.py scale     # omx.tl.deconvolve on 4,000 spots x 30 cell types: seconds
    python benchmarks/deconvolution.py hd        # a million 8 um bins x 30 types: seconds and peak memory
    python benchmarks/deconvolution.py her2st    # signatures from training sections, held-out vs stereoscope
    python benchmarks/deconvolution.py image     # proportions from H&E only, held-out vs stereoscope
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time

import numpy as np
import pandas as pd


def peak_gb() -> float:
    """Peak resident memory of this process in GB (Linux ru_maxrss is in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def bench_segment(section: str) -> None:
    """Nuclei of a full her2st section."""
    import omx

    sdata = omx.datasets.her2st(sections=[section])
    image_key = f"{section}_he"
    shape = sdata.images[image_key]["scale0"]["image"].shape
    before = peak_gb()
    t0 = time.perf_counter()
    omx.pp.segment_nuclei(sdata, image_key=image_key, show_progress_bar=False)
    dt = time.perf_counter() - t0
    cells = sdata.tables["omx_cells"]
    n = sdata.tables["table"].obs["omx_n_nuclei"]
    print(f"segment_nuclei {section}: image {shape[2]} x {shape[1]} px, {cells.n_obs} nuclei in {dt:.1f} s")
    print(f"  peak RSS {peak_gb():.2f} GB (after loading, before segmenting: {before:.2f} GB)")
    print(f"  nuclei per spot: median {n.median():.0f}, IQR {n.quantile(0.25):.0f}-{n.quantile(0.75):.0f}")
    print(
        f"  area um2: median {cells.obs['area_um2'].median():.1f}; "
        f"in a spot: {(cells.obs['spot_index'] >= 0).mean():.2f}"
    )


def simulate(n_spots=1000, n_types=8, n_genes=500, n_cells_ref=2000, seed=0, platform_sd=0.5):
    """Single-cell reference and spots summed from 5-15 cells with known proportions plus a platform effect.

    Returns ``(reference AnnData, spot counts, true proportions, cell type names, nuclei per spot)``.
    """
    from anndata import AnnData

    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.2, n_genes)
    types = [f"type_{k}" for k in range(n_types)]
    lfc = rng.normal(0, 1.0, (n_types, n_genes)) * (rng.random((n_types, n_genes)) < 0.3)
    size = rng.lognormal(0, 0.3, n_types)  # RNA content per cell differs between types
    mean = base * np.exp(lfc) * size[:, None]
    mean = mean / mean.sum(1, keepdims=True) * 2000 * size[:, None]  # ~2,000 UMIs per cell
    disp = 5.0

    def draw_cells(labels):
        mu = mean[labels]
        return rng.negative_binomial(disp, disp / (disp + mu))

    ref_labels = rng.integers(0, n_types, n_cells_ref)
    ref = AnnData(X=draw_cells(ref_labels).astype(np.float32))
    ref.obs["cell_type"] = pd.Categorical([types[k] for k in ref_labels])
    ref.var_names = [f"g{i}" for i in range(n_genes)]
    n_cells = rng.integers(5, 16, n_spots)
    conc = np.full(n_types, 0.5)
    props = rng.dirichlet(conc, n_spots)
    counts = np.zeros((n_spots, n_genes))
    truth = np.zeros((n_spots, n_types))
    platform = rng.lognormal(0, platform_sd, n_genes)
    capture = rng.lognormal(np.log(0.1), 0.3, n_spots)
    for s in range(n_spots):
        labels = rng.choice(n_types, n_cells[s], p=props[s])
        truth[s] = np.bincount(labels, minlength=n_types) / n_cells[s]
        mu = mean[labels].sum(0) * platform * capture[s]
        counts[s] = rng.negative_binomial(disp, disp / (disp + mu))
    nuclei = np.maximum(0, n_cells + rng.integers(-2, 3, n_spots))  # imperfect segmentation
    return ref, counts, truth, types, nuclei


def bench_simulate(seeds=(0, 1, 2)) -> None:
    """Bayesian model vs NNLS on the same signatures, simulated spots; calibration of the credible intervals."""
    from omx.models._deconv import (
        DeconvolutionModel,
        interval_coverage,
        jsd,
        nnls_proportions,
        signatures_from_reference,
    )

    rows = []
    for seed in seeds:
        ref, Y, truth, types, nuclei = simulate(seed=seed)
        sig, names = signatures_from_reference(ref, "cell_type", min_cells_per_type=10)
        assert list(names) == types
        t0 = time.perf_counter()
        p_nnls = nnls_proportions(Y, sig)
        t_nnls = time.perf_counter() - t0
        for use_nuclei in (True, False):
            model = DeconvolutionModel(seed=seed, show_progress_bar=False)
            t0 = time.perf_counter()
            model.fit(Y, sig, n_cells=nuclei if use_nuclei else None)
            dt = time.perf_counter() - t0
            p = model.proportions_
            present = truth > 0
            inside90 = (truth >= model.q05_ - 1e-9) & (truth <= model.q95_ + 1e-9)
            inside50 = (truth >= model.q25_ - 1e-9) & (truth <= model.q75_ + 1e-9)
            row = {
                "seed": seed, "nuclei": use_nuclei, "seconds": dt, "steps": model.n_steps_,
                "rmse": _rmse(truth, p), "jsd": float(jsd(truth, p).mean()),
                "rmse_nnls": _rmse(truth, p_nnls), "jsd_nnls": float(jsd(truth, p_nnls).mean()), "t_nnls": t_nnls,
                "cov90": interval_coverage(truth, model.q05_, model.q95_, model.absent_, level=0.9),
                "cov50": interval_coverage(truth, model.q25_, model.q75_, model.absent_, level=0.5),
                "naive90": float(inside90.mean()), "naive50": float(inside50.mean()),
                "present90": float(inside90[present].mean()), "present50": float(inside50[present].mean()),
                "zero_share": float((~present).mean()),
            }  # fmt: skip
            rows.append(row)
            print(
                f"seed {seed}, nuclei {'given' if use_nuclei else 'not given'}: {Y.shape[0]} spots x {Y.shape[1]} "
                f"genes x {len(types)} types; Bayesian RMSE {row['rmse']:.4f} JSD {row['jsd']:.4f} ({dt:.1f} s, "
                f"{model.n_steps_} SVI steps); NNLS RMSE {row['rmse_nnls']:.4f} JSD {row['jsd_nnls']:.4f}\n"
                f"    coverage of 90 % / 50 % intervals: {row['cov90']:.3f} / {row['cov50']:.3f} (true zeros by "
                f"randomised PIT); plain {row['naive90']:.3f} / {row['naive50']:.3f}; types present "
                f"{row['present90']:.3f} / {row['present50']:.3f} ({row['zero_share']:.0%} of true proportions are 0)"
            )
            sys.stdout.flush()
    df = pd.DataFrame(rows)
    print("mean over seeds and nuclei settings:")
    print(df.drop(columns=["seed", "nuclei"]).mean().round(4).to_string())


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def simulate_bins(n_bins: int, n_types: int = 30, n_genes: int = 500, seed: int = 0, chunk: int = 100_000):
    """Visium HD-like 8 um bins: 0-3 cells each, ~100-200 UMIs; counts as a float32 CSR matrix, built in chunks.

    Returns ``(signatures, counts, true proportions (float32, NaN for bins without cells), nuclei per bin)``.
    """
    from scipy import sparse

    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.2, n_genes)
    lfc = rng.normal(0, 1.0, (n_types, n_genes)) * (rng.random((n_types, n_genes)) < 0.3)
    size = rng.lognormal(0, 0.3, n_types)
    mean = base * np.exp(lfc)
    mean = mean / mean.sum(1, keepdims=True) * 1500 * size[:, None]  # mean counts per cell in the reference
    platform = rng.lognormal(0, 0.3, n_genes)
    blocks, truth, nuclei = [], [], []
    for start in range(0, n_bins, chunk):
        n = min(chunk, n_bins - start)
        cells = rng.poisson(1.5, n) + 1  # 8 um bins: one to a few cells
        props = rng.dirichlet(np.full(n_types, 0.1), n)
        counts = rng.multinomial(cells, props)
        mu = (counts @ mean) * platform * 0.1
        blocks.append(sparse.csr_matrix(rng.poisson(mu).astype(np.float32)))
        truth.append((counts / cells[:, None]).astype(np.float32))
        nuclei.append(cells)
    return mean, sparse.vstack(blocks, format="csr"), np.concatenate(truth), np.concatenate(nuclei)


def bench_hd(n_bins: int, device: str = "auto") -> None:
    """A million 8 um bins x 30 types: time and peak memory of the model on sparse counts."""
    from omx.models._deconv import DeconvolutionModel, interval_coverage, jsd

    t0 = time.perf_counter()
    S, Y, truth, nuclei = simulate_bins(n_bins)
    keep = np.asarray(Y.sum(1)).ravel() > 0
    Y, truth, nuclei = Y[keep], truth[keep], nuclei[keep]
    print(
        f"simulated {Y.shape[0]:,} bins with counts x {Y.shape[1]} genes x {S.shape[0]} types "
        f"({Y.nnz / Y.shape[0]:.0f} genes detected per bin, {np.asarray(Y.sum(1)).mean():.0f} UMIs) in "
        f"{time.perf_counter() - t0:.0f} s; peak so far {peak_gb():.2f} GB"
    )
    sys.stdout.flush()
    model = DeconvolutionModel(device=device, show_progress_bar=False)
    t0 = time.perf_counter()
    model.fit(Y, S, n_cells=nuclei.astype(float))
    dt = time.perf_counter() - t0
    cov = interval_coverage(truth, model.q05_, model.q95_, model.absent_, level=0.9)
    print(
        f"hd: {Y.shape[0]:,} bins x {S.shape[0]} types, device {_device(device)}: {dt:.0f} s "
        f"({model.n_steps_} SVI steps on {min(Y.shape[0], model.max_fit_spots):,} bins); peak RSS {peak_gb():.2f} GB; "
        f"JSD {jsd(truth, model.proportions_).mean():.3f}; 90 % interval coverage {cov:.3f}"
    )


def _device(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def bench_scale() -> None:
    """4,000 spots x 30 cell types on this CPU: `omx.tl.deconvolve` with its defaults, from a SpatialData table."""
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    import omx
    from omx.models._deconv import jsd, nnls_proportions, signatures_from_reference

    ref, Y, truth, types, nuclei = simulate(n_spots=4000, n_types=30, n_genes=2000, n_cells_ref=6000, seed=1)
    spots = AnnData(X=Y.astype(np.float32), var=pd.DataFrame(index=ref.var_names))
    spots.obs_names = [f"s{i}" for i in range(len(Y))]
    spots.obs["omx_n_nuclei"] = nuclei.astype(float)
    sdata = SpatialData(tables={"table": TableModel.parse(spots)})
    t0 = time.perf_counter()
    model = omx.tl.deconvolve(sdata, ref, labels_key="cell_type", show_progress_bar=False)
    dt = time.perf_counter() - t0
    p = sdata.tables["table"].obsm["omx_proportions"][types].to_numpy()
    S, names = signatures_from_reference(ref, "cell_type")  # types sorted as strings: type_0, type_1, type_10, ...
    t0 = time.perf_counter()
    p_nnls = pd.DataFrame(nnls_proportions(Y, S), columns=names)[types].to_numpy()
    dt_nnls = time.perf_counter() - t0
    print(
        f"scale: omx.tl.deconvolve, 4,000 spots x 2,000 genes x 30 types, defaults: {dt:.1f} s "
        f"({model.n_steps_} steps, torch threads {_threads()}); Bayesian RMSE {_rmse(truth, p):.4f} "
        f"JSD {jsd(truth, p).mean():.4f}; NNLS RMSE {_rmse(truth, p_nnls):.4f} JSD {jsd(truth, p_nnls).mean():.4f} "
        f"({dt_nnls:.1f} s); peak {peak_gb():.2f} GB"
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def bench_her2st(key: str = "stereoscope_major") -> None:
    """her2st: signatures from training sections; deconvolve held-out ones; agreement with stereoscope.

    Two splits: leave one patient out (A, B, C) and leave one section out (A1, B4, C2, C3, C4). Genes and
    signatures come from the training sections only (`omx.tl.signatures_from_proportions`). Compared on the same
    signatures: NNLS, and omx's model with and without a per-gene platform effect.
    """

    import omx
    from omx.models._deconv import jsd, nnls_proportions

    sdata = omx.datasets.her2st()
    table = sdata.tables["table"]
    section = table.obs["section"].astype(str).to_numpy()
    sections = sorted(set(section))
    types = list(table.obsm[key].columns)
    splits = {f"patient {p}": [s for s in sections if s[0] == p] for p in sorted({s[0] for s in sections})}
    splits |= {f"section {s}": [s] for s in sections}
    print(f"her2st: {len(sections)} sections, {table.n_obs} spots; {key}")
    variants = {"omx": {"platform_sd": 0.0}, "omx_platform": {"platform_sd": 0.5}}
    rows = []
    for name, held in splits.items():
        train = [s for s in sections if s not in held]
        t0 = time.perf_counter()
        ref = omx.tl.signatures_from_proportions(sdata, key=key, sections=train)
        t_sig = time.perf_counter() - t0
        m = np.isin(section, held)
        lib = np.asarray(table.X[m][:, table.var_names.get_indexer(ref.var_names)].sum(1)).ravel()
        at = np.flatnonzero(m)[lib > 0]
        true = table.obsm[key].iloc[at][types].to_numpy()
        Y = table.X[at][:, table.var_names.get_indexer(ref.var_names)]
        preds = {"nnls": pd.DataFrame(nnls_proportions(Y, ref.X), columns=ref.obs_names)[types].to_numpy()}
        seconds = {}
        for v, kw in variants.items():
            t0 = time.perf_counter()
            omx.tl.deconvolve(sdata, ref, sections=held, key_added=f"p_{v}", overwrite=True, show_progress_bar=False,
                              **kw)  # fmt: skip
            seconds[v] = time.perf_counter() - t0
            preds[v] = table.obsm[f"p_{v}"].iloc[at][types].to_numpy()
        row = {"split": name, "n_spots": len(at), "genes": ref.n_vars, "t_signatures": t_sig}
        for v, pred in preds.items():
            r = [np.corrcoef(true[:, k], pred[:, k])[0, 1] for k in range(len(types))]
            row |= {f"jsd_{v}": float(jsd(true, pred).mean()), f"r_{v}": float(np.nanmean(r))}
            row |= {f"r_{v}_{t}": rk for t, rk in zip(types, r, strict=True)}
        rows.append(row)
        print(
            f"  {name} ({len(at)} spots, {ref.n_vars} genes; signatures {t_sig:.0f} s, model "
            f"{seconds['omx']:.0f} s): mean per-type r / JSD: omx {row['r_omx']:.3f} / {row['jsd_omx']:.3f}; "
            f"with platform effect {row['r_omx_platform']:.3f} / {row['jsd_omx_platform']:.3f}; "
            f"NNLS {row['r_nnls']:.3f} / {row['jsd_nnls']:.3f}"
        )
        sys.stdout.flush()
    df = pd.DataFrame(rows)
    for kind in ("patient", "section"):
        d = df[df["split"].str.startswith(kind)]
        print(f"leave one {kind} out, mean over {len(d)} held-out {kind}s (r / JSD):")
        for v in ("omx", "omx_platform", "nnls"):
            print(f"  {v:13s} {d[f'r_{v}'].mean():.3f} / {d[f'jsd_{v}'].mean():.3f}")
        print("  per cell type, omx | NNLS:")
        for t in types:
            print(f"    {t:14s} {d[f'r_omx_{t}'].mean():.3f} | {d[f'r_nnls_{t}'].mean():.3f}")
    print(f"peak {peak_gb():.2f} GB")


def bench_image(key: str = "stereoscope_major") -> None:
    """Proportions from H&E only, leave-one-section-out over the local sections, compared with stereoscope."""
    import omx
    from omx.models._deconv import jsd

    sdata = omx.datasets.her2st()  # the sections present locally
    table = sdata.tables["table"]
    sections = sorted(table.obs["section"].astype(str).unique())
    types = list(table.obsm[key].columns)
    out = []
    for held in sections:
        train = [s for s in sections if s != held]
        t0 = time.perf_counter()
        omx.tl.predict_proportions(
            sdata,
            train=train,
            predict=[held],
            key=key,
            key_added="omx_img_prop",
            overwrite=True,
            show_progress_bar=False,
        )
        dt = time.perf_counter() - t0
        m = np.flatnonzero((table.obs["section"] == held).to_numpy())
        pred = table.obsm["omx_img_prop"].iloc[m][types].to_numpy()
        true = table.obsm[key].iloc[m][types].to_numpy()
        base = np.tile(
            table.obsm[key].iloc[np.flatnonzero(table.obs["section"].isin(train).to_numpy())].mean(0), (len(m), 1)
        )
        r = [np.corrcoef(true[:, k], pred[:, k])[0, 1] for k in range(len(types))]
        out.append({"section": held, "jsd": float(jsd(true, pred).mean()), "jsd_mean": float(jsd(true, base).mean()),
                    **dict(zip(types, r, strict=True))})  # fmt: skip
        print(
            f"  {held} ({len(m)} spots, {dt:.0f} s): JSD {out[-1]['jsd']:.3f} (training mean as prediction "
            f"{out[-1]['jsd_mean']:.3f}); mean Pearson r {np.nanmean(r):.3f}"
        )
        sys.stdout.flush()
    df = pd.DataFrame(out)
    print("per cell type, mean Pearson r over held-out sections:")
    for t in types:
        print(f"  {t:14s} {df[t].mean():.3f}")
    print(f"mean JSD {df['jsd'].mean():.3f} (training mean {df['jsd_mean'].mean():.3f})")


def main() -> None:
    """Run one part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["segment", "simulate", "scale", "hd", "her2st", "image"])
    parser.add_argument("--bins", type=int, default=1_000_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--section", default="C2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "segment":
        bench_segment(args.section)
    elif args.part == "simulate":
        bench_simulate()
    elif args.part == "hd":
        bench_hd(args.bins, args.device)
    elif args.part == "scale":
        bench_scale()
    elif args.part == "her2st":
        bench_her2st()
    else:
        bench_image()


if __name__ == "__main__":
    main()
