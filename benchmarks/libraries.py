"""Where omx keeps its own code beside a library that does the same job: time, memory and agreement.

    python benchmarks/libraries.py           # every case (a few minutes on 2 cores)
    python benchmarks/libraries.py --quick   # smaller inputs

For each case, omx's function and the library's run on the same input: the best of ``--repeat`` timed calls
after one warm-up call, the peak memory that numpy allocates during one call (tracemalloc), and the largest
absolute difference between the two results. The guide's design notes ("libraries we use and code we keep")
quote these numbers; the cases where omx switched to the library are checked by the tests instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tracemalloc
import warnings

import numpy as np
from scipy import sparse


def _timed(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall time (s) of ``repeat`` calls after a warm-up, peak traced memory (MiB) of one call, the result."""
    out = fn()
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return best, peak, out


def _row(case: str, size: str, ours, theirs, repeat: int, *, diff=None) -> dict:
    t_ours, m_ours, a = _timed(ours, repeat)
    t_lib, m_lib, b = _timed(theirs, repeat)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))
    return {
        "case": case,
        "size": size,
        "omx_s": t_ours,
        "library_s": t_lib,
        "omx_MiB": m_ours,
        "library_MiB": m_lib,
        "max_abs_diff": float(np.abs(a[both] - b[both]).max()) if diff is None else diff(a, b),
        "same_nan": same_nan,
    }


# ------------------------------------------------------------------------------------------- normalisation
def _counts(rng, n: int, g: int, density: float) -> sparse.csr_matrix:
    """Sparse UMI counts (her2st C sections: 24 % of entries non-zero, ~2.7 UMIs per non-zero entry)."""
    return sparse.random(
        n, g, density=density, format="csr", dtype=np.float32, rng=rng, data_rvs=lambda k: rng.poisson(1.7, k) + 1
    )


def log_normalize_cases(rng, quick: bool, repeat: int) -> list[dict]:
    import anndata as ad
    import scanpy as sc

    from omx._utils import log_normalize

    def scanpy_way(X, cols):
        out = sc.pp.normalize_total(ad.AnnData(X), target_sum=1e4, inplace=False)["X"]  # every gene
        out = sc.pp.log1p(out[:, cols] if cols is not None else out)
        return out.toarray() if sparse.issparse(out) else out

    n, g = (1000, 15000) if quick else (3000, 15000)
    X = _counts(rng, n, g, 0.24)
    cols = np.sort(rng.choice(g, 785, replace=False))
    rows = [
        _row(
            "log1p(CP10k) of 785 genes: omx._utils.log_normalize vs sc.pp.normalize_total + sc.pp.log1p",
            f"{n} x {g} sparse",
            lambda: log_normalize(X, columns=cols),
            lambda: scanpy_way(X, cols),
            repeat,
        )
    ]
    n = 20_000 if quick else 100_000
    D = rng.poisson(2.0, size=(n, 500)).astype(np.float32)
    rows.append(
        _row(
            "log1p(CP10k), all genes: omx._utils.log_normalize vs sc.pp.normalize_total + sc.pp.log1p",
            f"{n} x 500 dense",
            lambda: log_normalize(D),
            lambda: scanpy_way(D, None),
            repeat,
        )
    )
    return rows


def scanpy_import_s() -> float:
    code = "import time; t = time.perf_counter(); import scanpy; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- image
def stain_cases(rng, quick: bool, repeat: int) -> list[dict]:
    from skimage.color import rgb2hed

    from omx.encoders._handcrafted import _OD_LUT, _QUANTILES, HED_FROM_RGB

    b, p = (64, 96) if quick else (256, 96)
    # H&E-like colours with every intensity present (0 included: black padding)
    x = rng.integers(0, 256, size=(b, p, p, 3), dtype=np.uint8)

    def ours():  # as HandcraftedEncoder: lookup table of -log((I + 1) / 256), channels first, one matmul
        od = np.take(_OD_LUT, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        return np.maximum(np.matmul(HED_FROM_RGB.T, od.reshape(b, 3, -1)), 0.0).reshape(b, 3, p, p)

    def skimage_way():  # -log(max(I / 255, 1e-6)) / -log(1e-6): rescaled to natural optical density
        return np.moveaxis(rgb2hed(x) * -np.log(1e-6), -1, 1)

    def tissue_diff(a, c):  # pixels of intensity >= 16 in every channel, i.e. not black padding
        keep = np.broadcast_to((x.min(axis=-1) >= 16)[:, None], a.shape)
        return float(np.abs(a - c)[keep].max())

    rows = [
        _row(
            "H, E, DAB concentrations: HandcraftedEncoder (lookup table) vs skimage.color.rgb2hed, all pixels",
            f"{b} x {p}x{p} px",
            ours,
            skimage_way,
            repeat,
        ),
        _row(
            "  same, pixels with every channel >= 16 (no black padding)",
            f"{b} x {p}x{p} px",
            ours,
            skimage_way,
            repeat,
            diff=tissue_diff,
        ),
    ]
    grid = rng.random((32, 6, 576)).astype(np.float32)  # one batch of the encoder's quantile grid

    def sort_and_pick():
        s = np.sort(grid, axis=-1)
        return s[..., [int(round(q * (s.shape[-1] - 1))) for q in _QUANTILES]]

    rows.append(
        _row(
            "nearest-rank 10/50/90 % quantiles: sort and index vs np.quantile(method='nearest')",
            "32 x 6 x 576",
            sort_and_pick,
            lambda: np.moveaxis(np.quantile(grid, _QUANTILES, axis=-1, method="nearest"), 0, -1),
            repeat,
        )
    )
    return rows


# ------------------------------------------------------------------------------------------------- metrics
def _gene_metric_rows(a: np.ndarray, p: np.ndarray, repeat: int) -> list[dict]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    from omx import metrics

    def scipy_pearson():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConstantInputWarning for the constant gene
            return pearsonr(a, p, axis=0).statistic

    def scipy_spearman():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.array([spearmanr(a[:, j], p[:, j]).statistic for j in range(a.shape[1])])

    size = f"{a.shape[0]} spots x {a.shape[1]} genes"
    return [
        _row("per-gene Pearson r: omx.metrics.pearson vs scipy.stats.pearsonr(axis=0)", size,
             lambda: metrics.pearson(a, p), scipy_pearson, repeat),
        _row("per-gene Spearman: omx.metrics.spearman vs scipy.stats.spearmanr per gene", size,
             lambda: metrics.spearman(a, p), scipy_spearman, 1 if a.shape[0] > 10_000 else repeat),
        _row("per-gene MSE: omx.metrics.mse vs sklearn mean_squared_error(multioutput='raw_values')", size,
             lambda: metrics.mse(a, p), lambda: mean_squared_error(a, p, multioutput="raw_values"), repeat),
    ]  # fmt: skip


def metric_cases(rng, quick: bool, repeat: int) -> list[dict]:
    from scipy.spatial.distance import jensenshannon

    from omx.models._deconv import jsd

    rows = []
    for n, g in ((200, 785), (1000, 785)) if quick else ((200, 785), (3000, 785), (100_000, 500)):
        a = rng.normal(size=(n, g))
        p = a + rng.normal(size=(n, g))
        a[:, 0] = 1.0  # a constant gene: NaN for every correlation
        rows += _gene_metric_rows(a, p, repeat)
    n = 10_000 if quick else 100_000
    P = rng.dirichlet(np.ones(8), size=n)
    Q = rng.dirichlet(np.ones(8), size=n)
    P[:10, 3] = 0.0  # cell types absent from some spots
    rows.append(_row("Jensen-Shannon divergence of proportions: omx jsd vs scipy jensenshannon(base=2)**2",
                     f"{n} spots x 8 types", lambda: jsd(P, Q),
                     lambda: jensenshannon(P, Q, base=2, axis=1) ** 2, repeat))  # fmt: skip
    return rows


def sklearn_rejects_nan() -> str:
    from sklearn.metrics import mean_squared_error

    from omx import metrics

    y = np.array([[1.0, 2.0], [np.nan, 3.0], [2.0, 5.0]])
    try:
        mean_squared_error(y, y + 1, multioutput="raw_values")
    except ValueError as err:
        return f"sklearn raises ({str(err).splitlines()[0][:60]}); omx.metrics.mse gives {metrics.mse(y, y + 1)}"
    return "sklearn accepted NaN"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per function (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import pandas as pd

    rng = np.random.default_rng(args.seed)
    rows = []
    for cases in (log_normalize_cases, stain_cases, metric_cases):
        rows += cases(rng, args.quick, args.repeat)
    table = pd.DataFrame(rows).set_index(["case", "size"])
    with pd.option_context("display.width", 250, "display.max_colwidth", 100, "display.float_format", "{:.3g}".format):
        print(table.to_string())
    print(f"\nimport scanpy in a fresh process: {scanpy_import_s():.1f} s")
    print(f"NaN in the targets: {sklearn_rejects_nan()}")


if __name__ == "__main__":
    main()
