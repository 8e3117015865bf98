"""Build the her2st sample packaged with omx (src/omx/datasets/_data/her2st_sample) from the full study.

The sample keeps the study's layout, so `omx.io.read_st` reads both the same way. For each section it
crops the H&E image to the spots' bounding box plus a margin, downsamples it to ~2 um per pixel (JPEG),
moves the spotfile and cluster pixel coordinates into the new image, and keeps only the genes of the
785-gene panel in the counts. Stereoscope proportions, cluster names and the gene panel are copied.

Usage (from the repository root)::

    PYTHONPATH=src python scripts/make_sample.py [--src ../shared/data/her2st] [--sections C2 C3 C4]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from omx.io._st import ST_SPOT_PITCH_UM, _estimate_mpp

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "src" / "omx" / "datasets" / "_data" / "her2st_sample"
TARGET_MPP = 2.0
MARGIN_UM = 300.0
JPEG_QUALITY = 85
MAX_BYTES = 10 * 1024 * 1024

README = """\
# her2st sample (packaged with omx)

Sections {sections} (patient C, serial sections of one HER2-positive breast tumour) of the her2st study:

> Andersson, A., Larsson, L., Stenbeck, L. et al. Spatial deconvolution of HER2-positive breast cancer
> delineates tumor-associated cell type interactions. Nat Commun 12, 6012 (2021).
> https://doi.org/10.1038/s41467-021-26271-2 . Data: https://github.com/almaan/her2st ,
> Zenodo doi 10.5281/zenodo.4751624.

Licence: CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Cite the paper above when you use
these data. The sample is a modified copy, built by `scripts/make_sample.py` in the omx repository from the
study's files. What was changed:

- H&E images (`data/ST-imgs/C/<section>/*.jpg`): cropped to the bounding box of the spot centres plus a
  {margin:g} um margin and downsampled from ~0.69 to ~{mpp:g} um per pixel (Lanczos), saved as JPEG quality
  {quality}.
- Spotfiles (`data/ST-spotfiles/<section>_selection.tsv`): `pixel_x`, `pixel_y` moved into the cropped,
  downsampled image; other columns unchanged.
- Counts (`data/ST-cnts/<section>.tsv.gz`): only the genes of the 785-gene panel (`genes_785.txt`, the
  panel predicted by HisToGene, Hist2ST, THItoGene, mclSTExp and others); values unchanged.
- Expression clusters (`res/ST-cluster/lbl/<section>-cluster-annotation.tsv.gz`): `pixel_x`, `pixel_y` and
  the row names moved like the spotfiles; `warped_x`, `warped_y` (another frame) unchanged.
- Copied unchanged: stereoscope proportions (`res/ST-deconv/props/{{major,minor}}/`), cluster names
  (`res/ST-cluster/motivation.csv`).

| section | image (px) | um per px | spots | genes |
|---|---|---|---|---|
{rows}
"""


def _write_tsv_gz(df: pd.DataFrame, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as fh:  # mtime=0: the same bytes on every run
        fh.write(df.to_csv(sep="\t", **kwargs).encode())


def make_section(src: Path, dest: Path, section: str, panel: list[str]) -> str:
    """Write one section of the sample; return its README table row."""
    images = sorted(p for p in src.glob(f"data/ST-imgs/*/{section}/*") if p.suffix.lower() in (".jpg", ".png"))
    if not images:
        raise FileNotFoundError(f"{section}: no full-resolution image under {src}/data/ST-imgs.")
    img_path = images[0]
    patient = img_path.parent.parent.name

    spots = pd.read_csv(src / "data" / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    pixel = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    mpp = _estimate_mpp(spots[["new_x", "new_y"]].to_numpy(np.float64), pixel, pitch=ST_SPOT_PITCH_UM, section=section)
    factor = TARGET_MPP / mpp  # source pixels per output pixel

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(img_path) as im:
        im = im.convert("RGB")
        margin = MARGIN_UM / mpp
        x0, y0 = np.maximum(pixel.min(axis=0) - margin, 0)
        x1, y1 = np.minimum(pixel.max(axis=0) + margin, im.size)
        out_w, out_h = int((x1 - x0) / factor), int((y1 - y0) / factor)
        box = (x0, y0, x0 + out_w * factor, y0 + out_h * factor)
        small = im.resize((out_w, out_h), Image.Resampling.LANCZOS, box=box)
    out_img = dest / "data" / "ST-imgs" / patient / section / img_path.name
    out_img.parent.mkdir(parents=True, exist_ok=True)
    small.save(out_img, quality=JPEG_QUALITY, optimize=True)

    def move(xy: np.ndarray) -> np.ndarray:
        return np.round((xy - [x0, y0]) / factor, 2)

    spots[["pixel_x", "pixel_y"]] = move(pixel)
    out_spots = dest / "data" / "ST-spotfiles" / f"{section}_selection.tsv"
    out_spots.parent.mkdir(parents=True, exist_ok=True)
    spots.to_csv(out_spots, sep="\t", index=False)

    counts = pd.read_csv(src / "data" / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    keep = [g for g in panel if g in counts.columns]
    counts = counts[keep]
    counts.index.name = None
    _write_tsv_gz(counts, dest / "data" / "ST-cnts" / f"{section}.tsv.gz")

    cl_path = src / "res" / "ST-cluster" / "lbl" / f"{section}-cluster-annotation.tsv.gz"
    if cl_path.is_file():
        cl = pd.read_csv(cl_path, sep="\t", index_col=0)
        cl[["pixel_x", "pixel_y"]] = move(cl[["pixel_x", "pixel_y"]].to_numpy(np.float64))
        cl.index = [f"{x:g}x{y:g}" for x, y in cl[["pixel_x", "pixel_y"]].itertuples(index=False)]
        _write_tsv_gz(cl, dest / "res" / "ST-cluster" / "lbl" / cl_path.name)
    for tier in ("major", "minor"):
        prop = src / "res" / "ST-deconv" / "props" / tier / f"{section}-proportion.tsv"
        if prop.is_file():
            (dest / prop.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(prop, dest / prop.relative_to(src))

    print(f"{section}: {img_path.name} {im.size} -> {small.size} px at {mpp * factor:.3f} um/px, {len(keep)} genes")
    return f"| {section} | {small.size[0]} x {small.size[1]} | {mpp * factor:.3f} | {len(spots)} | {len(keep)} |"


def main() -> None:
    """Build the sample and check its size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "her2st")
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--sections", nargs="+", default=["C2", "C3", "C4"])
    args = parser.parse_args()
    src, dest = args.src.resolve(), args.dest.resolve()

    panel = [g.strip() for g in (src / "genes_785.txt").read_text().splitlines() if g.strip()]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copyfile(src / "genes_785.txt", dest / "genes_785.txt")
    motivation = src / "res" / "ST-cluster" / "motivation.csv"
    if motivation.is_file():
        (dest / "res" / "ST-cluster").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(motivation, dest / "res" / "ST-cluster" / "motivation.csv")

    rows = [make_section(src, dest, s, panel) for s in args.sections]
    (dest / "README.md").write_text(
        README.format(
            sections=", ".join(args.sections),
            margin=MARGIN_UM,
            mpp=TARGET_MPP,
            quality=JPEG_QUALITY,
            rows="\n".join(rows),
        )
    )
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    du = subprocess.run(["du", "-sh", str(dest)], capture_output=True, text=True).stdout.strip()
    print(f"{dest}: {size / 2**20:.2f} MiB in files (du: {du})")
    if size > MAX_BYTES:
        raise SystemExit(f"The sample is {size / 2**20:.1f} MiB, over the 10 MiB limit: keep fewer sections.")


if __name__ == "__main__":
    main()
