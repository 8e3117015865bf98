"""Benchmarks of nuclei, deconvolution and image-only proportions; each part prints its numbers.

Run one part per process (peak memory is per process)::

    python benchmarks/deconvolution.py segment   # nuclei on a full her2st section: seconds, peak GB, counts
    python benchmarks/deconvolution.py simulate  # simulated spots: Bayesian model vs NNLS, interval coverage
    python benchmarks/deconvolution.py scale     # omx.tl.deconvolve on 4,000 spots x 30 cell types: seconds
    python benchmarks/deconvolution.py hd        # a million 8 um bins x 30 types: seconds and peak memory
    python benchmarks/deconvolution.py her2st    # signatures from training sections, held-out vs stereoscope
    python benchmarks/deconvolution.py image --cache DIR  # proportions and nucleus types from H&E only vs stereoscope
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
                "seed": seed, "nuclei": use_nuclei, "seconds": dt, "rounds": model.n_steps_,
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
                f"{model.n_steps_} rounds); NNLS RMSE {row['rmse_nnls']:.4f} JSD {row['jsd_nnls']:.4f}\n"
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
    model = DeconvolutionModel(device=device, show_progress_bar=True)
    t0 = time.perf_counter()
    model.fit(Y, S, n_cells=nuclei.astype(float))
    dt = time.perf_counter() - t0
    cov = interval_coverage(truth, model.q05_, model.q95_, model.absent_, level=0.9)
    print(
        f"hd: {Y.shape[0]:,} bins x {S.shape[0]} types, device {_device(device)}: {dt:.0f} s "
        f"({model.n_steps_} rounds of shared parameters on {min(Y.shape[0], model.max_fit_spots):,} bins); "
        f"peak RSS {peak_gb():.2f} GB; "
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
        f"({model.n_steps_} rounds, torch threads {_threads()}); Bayesian RMSE {_rmse(truth, p):.4f} "
        f"JSD {jsd(truth, p).mean():.4f}; NNLS RMSE {_rmse(truth, p_nnls):.4f} JSD {jsd(truth, p_nnls).mean():.4f} "
        f"({dt_nnls:.1f} s); peak {peak_gb():.2f} GB"
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def bench_her2st(key: str = "stereoscope_major") -> None:
    """her2st: signatures from training sections; deconvolve held-out ones; agreement with stereoscope.

    Two splits: leave one patient out (A, B, C) and leave one section out (A1, B4, C2, C3, C4). Genes, signatures,
    the expression prior and its strength come from the training sections only
    (`omx.tl.signatures_from_proportions`). Compared on the same signatures: NNLS; omx without the expression prior
    (per-gene dispersion, the model before the prior); the expression prior's own prediction; omx with the prior and
    either dispersion (the default takes the one chosen by cross-validation); omx with a per-gene platform effect.
    """

    import omx
    from omx.models._deconv import jsd, nnls_proportions
    from omx.tl._deconvolve import _expression_prior

    sdata = omx.datasets.her2st()
    table = sdata.tables["table"]
    section = table.obs["section"].astype(str).to_numpy()
    sections = sorted(set(section))
    types = list(table.obsm[key].columns)
    splits = {f"patient {p}": [s for s in sections if s[0] == p] for p in sorted({s[0] for s in sections})}
    splits |= {f"section {s}": [s] for s in sections}
    print(f"her2st: {len(sections)} sections, {table.n_obs} spots; {key}")
    variants = {
        "omx": {"platform_sd": 0.0},
        "omx_no_prior": {"platform_sd": 0.0, "prior_strength": 0.0, "dispersion": "gene"},
        "omx_gene": {"platform_sd": 0.0, "dispersion": "gene"},
        "omx_common": {"platform_sd": 0.0, "dispersion": "common"},
        "omx_platform": {"platform_sd": 0.5},
    }
    shown = ("omx", "omx_no_prior", "prior_only", "omx_gene", "omx_common", "omx_platform", "nnls")
    rows, done = [], {}
    for name, held in splits.items():
        train = [s for s in sections if s not in held]
        t0 = time.perf_counter()
        if tuple(train) not in done:  # a patient with one section is the same split twice
            done[tuple(train)] = omx.tl.signatures_from_proportions(sdata, key=key, sections=train,
                                                                    show_progress_bar=False)  # fmt: skip
        ref = done[tuple(train)]
        t_sig = time.perf_counter() - t0
        m = np.isin(section, held)
        lib = np.asarray(table.X[m][:, table.var_names.get_indexer(ref.var_names)].sum(1)).ravel()
        at = np.flatnonzero(m)[lib > 0]
        true = table.obsm[key].iloc[at][types].to_numpy()
        Y = table.X[at][:, table.var_names.get_indexer(ref.var_names)]
        preds = {"nnls": pd.DataFrame(nnls_proportions(Y, ref.X), columns=ref.obs_names)[types].to_numpy()}
        expected, _ = _expression_prior(table, table.X[at], ref, strength=1.0)  # the prior even where CV chose 0
        preds["prior_only"] = pd.DataFrame(expected, columns=ref.obs_names)[types].to_numpy()
        seconds = {}
        for v, kw in variants.items():
            t0 = time.perf_counter()
            omx.tl.deconvolve(sdata, ref, sections=held, key_added=f"p_{v}", overwrite=True, show_progress_bar=False,
                              **kw)  # fmt: skip
            seconds[v] = time.perf_counter() - t0
            preds[v] = table.obsm[f"p_{v}"].iloc[at][types].to_numpy()
        info = ref.uns["omx_prior"]
        row = {"split": name, "n_spots": len(at), "genes": ref.n_vars, "t_signatures": t_sig,
               "strength": info["strength"], "dispersion": info["dispersion"]}  # fmt: skip
        for v, pred in preds.items():
            r = [np.corrcoef(true[:, k], pred[:, k])[0, 1] for k in range(len(types))]
            row |= {f"jsd_{v}": float(jsd(true, pred).mean()), f"r_{v}": float(np.nanmean(r))}
            row |= {f"r_{v}_{t}": rk for t, rk in zip(types, r, strict=True)}
        rows.append(row)
        print(
            f"  {name} ({len(at)} spots, {ref.n_vars} genes; signatures and prior {t_sig:.0f} s, prior strength "
            f"{row['strength']:g}, {row['dispersion']} dispersion, model {seconds['omx']:.1f} s): mean r / JSD: "
            + "; ".join(f"{v} {row[f'r_{v}']:.3f} / {row[f'jsd_{v}']:.3f}" for v in shown)
        )
        sys.stdout.flush()
    df = pd.DataFrame(rows)
    for kind in ("patient", "section"):
        d = df[df["split"].str.startswith(kind)]
        print(f"leave one {kind} out, mean over {len(d)} held-out {kind}s (r / JSD):")
        for v in shown:
            print(f"  {v:13s} {d[f'r_{v}'].mean():.3f} / {d[f'jsd_{v}'].mean():.3f}")
        print("  per cell type, omx | without the prior | NNLS:")
        for t in types:
            print(f"    {t:14s} {d[f'r_omx_{t}'].mean():.3f} | {d[f'r_omx_no_prior_{t}'].mean():.3f} | "
                  f"{d[f'r_nnls_{t}'].mean():.3f}")  # fmt: skip
    print(f"peak {peak_gb():.2f} GB")


#: her2st sections whose images are at full resolution: nuclei can be segmented there (A1's image is a copy
#: downscaled to ~3.2 um per pixel, where nuclei are 2-3 pixels across and `segment_nuclei` finds none).
NUCLEI_SECTIONS = ("B4", "C2", "C3", "C4")


def _cells_table(sections, cache: str | None):
    """The ``omx_cells`` table of her2st sections, segmented one section at a time (cached per section as h5ad)."""
    import os

    import anndata as ad

    import omx
    from omx._schema import Key

    parts = []
    for s in sections:
        path = None if cache is None else os.path.join(cache, f"omx_cells_{s}.h5ad")
        if path is not None and os.path.exists(path):
            parts.append(ad.read_h5ad(path))
            continue
        one = omx.datasets.her2st(sections=[s])
        omx.pp.segment_nuclei(one, image_key=f"{s}_he", show_progress_bar=False)
        cells = one.tables[Key.CELLS]
        part = ad.AnnData(obs=cells.obs.copy(), obsm={"spatial": np.asarray(cells.obsm["spatial"])})
        if path is not None:
            os.makedirs(cache, exist_ok=True)
            part.write_h5ad(path)
        parts.append(part)
    cells = ad.concat(parts, join="outer")
    cells.uns[Key.TABLE_MARK] = "cells"
    return cells


def _ridge_clr(sdata, train, held, key, features):
    """The former `predict_proportions`: a Ridge on the spot features to the centred log-ratio, softmaxed back."""
    from omx.models import Ridge

    table = sdata.tables["table"]
    X, Z, g = [], [], []
    for s in train:
        rows, feats = features(s)
        lp = np.log(table.obsm[key].iloc[rows].to_numpy(dtype=float) + 1e-3)
        X.append(feats)
        Z.append(lp - lp.mean(1, keepdims=True))
        g.append(np.full(len(rows), s, dtype=object))
    model = Ridge(show_progress_bar=False).fit(np.concatenate(X), np.concatenate(Z).astype(np.float32),
                                               groups=np.concatenate(g))  # fmt: skip
    rows, feats = features(held)
    Zp = model.predict(feats, groups=np.full(len(rows), held, dtype=object))
    E = np.exp(Zp - Zp.max(1, keepdims=True))
    return rows, E / E.sum(1, keepdims=True)


def _nnls_on_predicted(sdata, train, predict, key, n_genes=1000):
    """NNLS of image-predicted expression (`fit_predict`, ridge) on signatures from the training sections."""
    import omx
    from omx.models._deconv import nnls_proportions

    table = sdata.tables["table"]
    tr = table.obs["section"].isin(train).to_numpy()
    X = table.X[tr]
    detected = np.asarray((X > 0).mean(0)).ravel()
    mean = np.asarray(X.mean(0)).ravel()
    cand = np.flatnonzero(detected > 0.05)
    genes = list(table.var_names[cand[np.argsort(-mean[cand])[:n_genes]]])
    omx.tl.fit_predict(sdata, train=train, predict=predict, model="ridge", genes=genes, key_added="omx_bench_pred",
                       overwrite=True, show_progress_bar=False)  # fmt: skip
    S = omx.tl.signatures_from_proportions(sdata, key=key, sections=train, genes=genes).X
    out = {}
    cols = table.var_names.get_indexer(genes)
    for s in predict:
        rows = np.flatnonzero((table.obs["section"] == s).to_numpy())
        pred = np.asarray(table.layers["omx_bench_pred"][rows][:, cols], dtype=np.float64)
        # predictions are log1p(counts / total * 1e4): back to counts per 10,000 (NNLS is scale-free per spot)
        out[s] = nnls_proportions(np.expm1(np.clip(pred, 0, None)), S)
    return out


def _pearson(true, pred):
    """Pearson r of each cell type's column (NaN where a prediction is constant)."""
    return np.array([
        np.corrcoef(true[:, k], pred[:, k])[0, 1] if np.ptp(pred[:, k]) > 1e-9 and np.ptp(true[:, k]) > 1e-9 else np.nan
        for k in range(true.shape[1])
    ])  # fmt: skip


def bench_image(key: str = "stereoscope_major", cache: str | None = None) -> None:
    """Proportions from H&E only on held-out her2st sections and patients, compared with stereoscope.

    Methods: the image-only model with nuclei (`omx.tl.predict_proportions`, sections with nuclei) and without
    (``cells_key=None``, all sections), the training average, NNLS of image-predicted expression on signatures
    from the training sections, and the former Ridge on the centred log-ratio. Scores per held-out section: mean
    JSD over spots and mean over cell types of the Pearson r with stereoscope (NaN for a constant prediction,
    such as the training average).
    """
    import os

    import omx
    from omx._schema import Key
    from omx.models import Ridge
    from omx.models._deconv import jsd
    from omx.tl._engine import model_patch_settings, resolve_sections, section_inputs

    if cache is not None:
        omx.settings.feature_store = os.path.join(cache, "features")
    sdata = omx.datasets.her2st()  # the sections present locally
    table = sdata.tables["table"]
    sections = sorted(table.obs["section"].astype(str).unique())
    with_nuclei = [s for s in sections if s in NUCLEI_SECTIONS]
    types = list(table.obsm[key].columns)
    t0 = time.perf_counter()
    sdata.tables[Key.CELLS] = _cells_table(with_nuclei, cache)
    print(f"nuclei of {with_nuclei}: {sdata.tables[Key.CELLS].n_obs} ({time.perf_counter() - t0:.0f} s)")
    resolved = resolve_sections(sdata, sections, table_key="table", section_key="section")
    encoder = Ridge(show_progress_bar=False)
    size_um, context = model_patch_settings(encoder, resolved[sections[0]], None, None)

    def features(s):
        return resolved[s].rows, section_inputs(resolved[s], encoder, size_um, context, False, None)

    def splits(secs):
        out = [(f"section {s}", [s]) for s in secs]
        patients = sorted({s[0] for s in secs})
        return out + [(f"patient {p}", [s for s in secs if s[0] == p]) for p in patients if len(patients) > 1]

    rows_out = []
    for label, secs in (("with nuclei", with_nuclei), ("all sections, image features only", sections)):
        print(f"\n== {label}: {', '.join(secs)} (leave-one-section-out, then leave-one-patient-out)")
        for split, held in splits(secs):
            train = [s for s in secs if s not in held]
            t0 = time.perf_counter()
            model = omx.tl.predict_proportions(
                sdata, train=train, predict=held, key=key, key_added="omx_img_prop", overwrite=True,
                cells_key=Key.CELLS if label == "with nuclei" else None, show_progress_bar=False,
            )  # fmt: skip
            dt = time.perf_counter() - t0
            nnls = _nnls_on_predicted(sdata, train, held, key)
            mean = table.obsm[key].iloc[np.flatnonzero(table.obs["section"].isin(train).to_numpy())].mean(0)
            for s in held:
                m = np.flatnonzero((table.obs["section"] == s).to_numpy())
                true = table.obsm[key].iloc[m][types].to_numpy()
                rows, clr = _ridge_clr(sdata, train, s, key, features)
                preds = {
                    "image model": table.obsm["omx_img_prop"].iloc[m][types].to_numpy(),
                    "training mean": np.tile(mean[types].to_numpy(), (len(m), 1)),
                    "NNLS on predicted expr.": nnls[s],
                    "Ridge-CLR (former)": pd.DataFrame(clr, index=rows).loc[m].to_numpy(),
                }
                for method, pred in preds.items():
                    r = _pearson(true, pred)
                    mean_r = float(np.nanmean(r)) if np.isfinite(r).any() else np.nan
                    rows_out.append({"set": label, "split": split, "section": s, "method": method,
                                     "jsd": float(jsd(true, pred).mean()), "r": mean_r,
                                     **{f"r_{t}": v for t, v in zip(types, r, strict=True)}})  # fmt: skip
                line = ", ".join(f"{x['method']} {x['jsd']:.3f} / {x['r']:.3f}" for x in rows_out[-len(preds) :])
                print(f"  {split:10s} {s} ({len(m)} spots): JSD / mean r: {line}")
            print(f"    (image model: {dt:.0f} s; alpha {model.alpha_:g}, nucleus alpha {model.nucleus_alpha_}, "
                  f"spot-model weight {model.weight_:g})")  # fmt: skip
            sys.stdout.flush()
    df = pd.DataFrame(rows_out)
    df["scheme"] = np.where(df["split"].str.startswith("patient"), "leave-one-patient-out", "leave-one-section-out")
    summary = df.groupby(["set", "scheme", "method"], sort=False)[["jsd", "r"]].mean()
    print("\nmeans over held-out sections (JSD lower is better; r = mean over cell types of Pearson r):")
    print(summary.round(4).to_string())
    per_type = df[df["scheme"] == "leave-one-section-out"].groupby(["set", "method"], sort=False)[
        [f"r_{t}" for t in types]].mean()  # fmt: skip
    per_type.columns = types
    print("\nper cell type, leave-one-section-out, mean Pearson r:")
    print(per_type.round(3).to_string())
    if cache is not None:
        df.to_csv(os.path.join(cache, "image_benchmark.csv"), index=False)


def main() -> None:
    """Run one part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["segment", "simulate", "scale", "hd", "her2st", "image"])
    parser.add_argument("--bins", type=int, default=1_000_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--section", default="C2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="image: folder for nuclei tables and features (reused)")
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
        bench_image(cache=args.cache)


if __name__ == "__main__":
    main()
