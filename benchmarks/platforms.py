"""10x layouts through spatialdata-io and omx: time, memory and accuracy against omx's own reader.

    python benchmarks/platforms.py --part visium    # 3 Visium folders of the packaged sample
    python benchmarks/platforms.py --part hd        # one whole section as Visium HD (2, 8, 16 um bins)
    python benchmarks/platforms.py --part xenium    # the Xenium-like object: cells and nuclei

Visium: the packaged sample's sections C2, C3, C4 written as Space Ranger folders (`write_sample_visium`), read with
`spatialdata_io.visium` and concatenated; a ridge on handcrafted features is fitted on C2 + C3 and scored on C4
(mean per-gene Pearson r, log1p CP10k). The same data read by `omx.datasets.her2st_sample` (ST's 100 um spots)
are scored the same way, and the Visium object again with 100 um patches (`size_um=100`): the two must agree, as
only the declared spot size differs. Each part runs in a fresh process; peak memory is the process's maximum RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings
from pathlib import Path


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def mean_r(sdata, key: str) -> float:
    import omx

    return float(omx.get.scores(sdata, key)["pearson"].mean())


def visium(root: Path) -> None:
    import spatialdata as sd
    import spatialdata_io

    import omx

    t = time.perf_counter()
    folders = {s: omx.datasets.write_sample_visium(root, s) for s in ("C2", "C3", "C4")}
    print(f"write 3 Visium folders: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    objs = [spatialdata_io.visium(f, fullres_image_file=f"{s}_full_image.tif") for s, f in folders.items()]
    sdata = sd.concatenate(objs, concatenate_tables=True)
    print(f"read with spatialdata_io.visium + concatenate: {time.perf_counter() - t:.1f} s")
    kw = {"train": ["C2", "C3"], "predict": ["C4"], "model": "ridge", "show_progress_bar": False}
    t = time.perf_counter()
    omx.tl.fit_predict(sdata, key_added="p55", **kw)
    print(
        f"fit_predict, no extra arguments (55 um patches): {time.perf_counter() - t:.1f} s, "
        f"C4 mean r {mean_r(sdata, 'p55'):.4f}"
    )
    omx.tl.fit_predict(sdata, key_added="p100", size_um=100, **kw)
    print(f"fit_predict, size_um=100: C4 mean r {mean_r(sdata, 'p100'):.4f}")
    native = omx.datasets.her2st_sample()
    omx.tl.fit_predict(native, key_added="native", **kw)
    print(f"omx.datasets.her2st_sample (ST layout, 100 um spots): C4 mean r {mean_r(native, 'native'):.4f}")
    print(f"peak RSS {peak_gb():.2f} GB")


def hd(root: Path) -> None:
    import spatialdata_io

    import omx

    t = time.perf_counter()
    folder = omx.datasets.write_sample_visium_hd(root, "C3", crop_um=None)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1024**2
    print(f"write a whole section as Visium HD: {time.perf_counter() - t:.1f} s, {size:.0f} MB")
    t = time.perf_counter()
    sdata = spatialdata_io.visium_hd(folder, load_segmentations_only=False)
    print(
        f"read with spatialdata_io.visium_hd: {time.perf_counter() - t:.1f} s; "
        + ", ".join(f"{k}: {v.n_obs} bins" for k, v in sdata.tables.items())
    )
    model = omx.models.Ridge(show_progress_bar=False)
    ref = omx.datasets.her2st_sample()
    omx.tl.fit_predict(ref, train=["C2"], predict=["C4"], model=model, show_progress_bar=False)
    for key in ("square_016um", "square_008um"):
        t = time.perf_counter()
        spots = omx.pp.resolve_spots(sdata, table_key=key)
        t_resolve = time.perf_counter() - t
        t = time.perf_counter()
        omx.tl.predict_expression(sdata, model, table_key=key, show_progress_bar=False)
        print(
            f"{key}: resolve {t_resolve:.1f} s (mpp {spots.mpp:.4f}), predict_expression "
            f"{time.perf_counter() - t:.1f} s for {spots.n_spots} bins; peak RSS so far {peak_gb():.2f} GB"
        )


def xenium() -> None:
    import omx

    t = time.perf_counter()
    x = omx.datasets.sample_xenium("C4")
    print(f"sample_xenium: {time.perf_counter() - t:.1f} s, {x.tables['table'].n_obs} cells")
    ref = omx.datasets.her2st_sample()
    model = omx.models.Ridge(show_progress_bar=False)
    genes = list(x.tables["table"].var_names)
    omx.tl.fit_predict(ref, train=["C2", "C3"], predict=["C4"], model=model, genes=genes, show_progress_bar=False)
    t = time.perf_counter()
    omx.tl.predict_expression(x, model, show_progress_bar=False)
    print(f"predict_expression on the cells: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    omx.pp.segment_nuclei(x, show_progress_bar=False)
    print(f"segment_nuclei on he_image: {time.perf_counter() - t:.1f} s, {x.tables['omx_cells'].n_obs} nuclei")
    print(f"peak RSS {peak_gb():.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["visium", "hd", "xenium"], required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import omx

    omx.settings.verbosity = "warning"
    with tempfile.TemporaryDirectory() as tmp:
        if args.part == "visium":
            visium(Path(tmp))
        elif args.part == "hd":
            hd(Path(tmp))
        else:
            xenium()


if __name__ == "__main__":
    main()
