"""10x Genomics output folders and a Xenium-like SpatialData written from the packaged her2st sample.

They let omx be tried, tested and taught on 10x's own layouts without a download: spatialdata-io reads the
folders as it reads a Space Ranger output. The counts and the H&E are the sample's real ones; what 10x would
have measured at a finer scale is simulated, and each function says how.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from omx._docs import doc_params
from omx._utils import logger
from omx.pp._spots import VISIUM_SPOT_UM, XENIUM_PIXEL_UM

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["sample_xenium", "write_sample_visium", "write_sample_visium_hd"]

_HIRES_SIDE = 2000
_LOWRES_SIDE = 600


def _sample_section(section: str):
    """The packaged sample's section: level-0 image (y, x, 3), mpp, spot centres in pixels, counts, obs, genes."""
    import spatialdata as sd

    from omx.datasets._sample import her2st_sample
    from omx.pp._spots import image_mpp

    sdata = her2st_sample(section)
    image = sdata.images[f"{section}_he"]
    image = np.moveaxis(sd.get_pyramid_levels(image, n=0).values, 0, -1)
    mpp = image_mpp(sdata, sdata.images[f"{section}_he"])
    table = sdata.tables["table"]
    centres = np.asarray(table.obsm["spatial"], dtype=float) / mpp
    return image, mpp, centres, sparse.csr_matrix(table.X), table.obs.copy(), list(table.var_names)


def _barcodes(n: int, seed: int) -> list[str]:
    """``n`` distinct 16-base barcodes with 10x's ``-1`` suffix, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        code = "".join(rng.choice(list("ACGT"), 16))
        if code not in seen:
            seen.add(code)
            out.append(f"{code}-1")
    return out


def write_10x_h5(path: Path, counts: sparse.spmatrix, barcodes: Sequence[str], genes: Sequence[str], library: str):
    """Write a feature-barcode matrix in Cell Ranger's HDF5 format (v3: ``/matrix`` with ``features``)."""
    import h5py

    m = sparse.csr_matrix(counts, dtype=np.int32)  # barcodes x genes, i.e. genes x barcodes in CSC
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([library], dtype="S")
        f.attrs["chemistry_description"] = "omx sample (her2st counts in a 10x layout)"
        f.attrs["software_version"] = "omx sample writer"
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data)
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([m.shape[1], m.shape[0]], dtype=np.int32))
        feats = g.create_group("features")
        feats.create_dataset("id", data=np.array(genes, dtype="S"))
        feats.create_dataset("name", data=np.array(genes, dtype="S"))
        feats.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), dtype="S"))
        feats.create_dataset("genome", data=np.array(["GRCh38"] * len(genes), dtype="S"))
        feats.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))


def _write_images(folder: Path, image: np.ndarray) -> dict[str, float]:
    """Space Ranger's ``tissue_hires_image.png`` and ``tissue_lowres_image.png``; return their scale factors."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    side = max(image.shape[:2])
    scales = {}
    for name, target in (("hires", _HIRES_SIDE), ("lowres", _LOWRES_SIDE)):
        scale = min(1.0, target / side)
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        Image.fromarray(image).resize(size, Image.Resampling.LANCZOS).save(folder / f"tissue_{name}_image.png")
        scales[f"tissue_{name}_scalef"] = scale
    return scales


def _write_tiff(path: Path, image: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, photometric="rgb", tile=(256, 256), compression="zlib")


@doc_params()
def write_sample_visium(dest: str | Path, section: str = "C2", *, seed: int = 0) -> Path:
    """Write one section of the packaged her2st sample as a 10x Visium (Space Ranger 2) output folder.

    The folder holds what `spatialdata_io.visium` reads::

        <dest>/<section>/<section>_filtered_feature_bc_matrix.h5   Cell Ranger HDF5, raw integer counts
        <dest>/<section>/<section>_full_image.tif                  the full-resolution H&E (tiled TIFF)
        <dest>/<section>/spatial/tissue_positions.csv              barcode, in_tissue, array_row/col, pixels
        <dest>/<section>/spatial/scalefactors_json.json            spot diameter in full-resolution pixels, ...
        <dest>/<section>/spatial/tissue_hires_image.png            (and tissue_lowres_image.png)

    Read it with ``spatialdata_io.visium(path, fullres_image_file=f"{section}_full_image.tif")``. Counts, spot
    positions and H&E are the sample's real ones (Andersson et al., Nat Commun 12, 6012, 2021; CC BY 4.0). The
    spots are ST v1 spots (100 um on a 200 um grid) declared as Visium's 55 um spots, so the microns per pixel that
    a reader derives from the spot diameter are the image's true ones; barcodes are made up.

    Parameters
    ----------
    {dest_sample}
    {section_sample}
    seed
        Seed of the made-up barcodes.

    Returns
    -------
    The output folder ``<dest>/<section>``.
    """
    out = _new_folder(dest, section)
    image, mpp, centres, counts, obs, genes = _sample_section(section)
    barcodes = _barcodes(len(obs), seed)
    write_10x_h5(out / f"{section}_filtered_feature_bc_matrix.h5", counts, barcodes, genes, section)
    _write_tiff(out / f"{section}_full_image.tif", image)
    scales = _write_images(out / "spatial", image)
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": obs["array_y"].to_numpy(int),
            "array_col": obs["array_x"].to_numpy(int),
            "pxl_row_in_fullres": np.round(centres[:, 1]).astype(int),
            "pxl_col_in_fullres": np.round(centres[:, 0]).astype(int),
        }
    )
    positions.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    scalefactors = {
        "spot_diameter_fullres": VISIUM_SPOT_UM / mpp,
        "fiducial_diameter_fullres": 1.6 * VISIUM_SPOT_UM / mpp,
        **scales,
    }
    (out / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=2))
    logger.info(f"Wrote a Visium output folder of {section} ({len(barcodes)} spots x {len(genes)} genes) to {out}.")
    return out


def _new_folder(dest: str | Path, section: str) -> Path:
    out = Path(dest).expanduser() / section
    if out.exists():
        raise FileExistsError(f"{out} already exists; omx does not write over it. Pass another `dest=`.")
    out.mkdir(parents=True)
    return out


def _bins_in_spots(centres: np.ndarray, radius_px: float, pitch_px: float, box: np.ndarray):
    """Fine bins (a square lattice of ``pitch_px``) inside ``box`` whose centres lie in a spot: rows, cols, spot."""
    from scipy.spatial import cKDTree

    (x0, y0), (x1, y1) = box
    cols = np.arange(int(np.floor(x0 / pitch_px)), int(np.ceil(x1 / pitch_px)))
    rows = np.arange(int(np.floor(y0 / pitch_px)), int(np.ceil(y1 / pitch_px)))
    cc, rr = np.meshgrid(cols, rows)
    xy = np.c_[(cc.ravel() + 0.5) * pitch_px, (rr.ravel() + 0.5) * pitch_px]
    dist, spot = cKDTree(centres).query(xy)
    inside = dist <= radius_px
    return rr.ravel()[inside], cc.ravel()[inside], spot[inside]


def _split_counts(counts: sparse.csr_matrix, spot_of_bin: np.ndarray, rng) -> sparse.csr_matrix:
    """Each spot's counts spread over its bins at random (multinomial, equal chances): bins x genes."""
    counts = sparse.csr_matrix(counts)
    bins_of = pd.Series(np.arange(len(spot_of_bin))).groupby(spot_of_bin).apply(np.asarray).to_dict()
    rows, cols, vals = [], [], []
    for spot, bins in bins_of.items():
        lo, hi = counts.indptr[spot], counts.indptr[spot + 1]
        for gene, n in zip(counts.indices[lo:hi], counts.data[lo:hi], strict=True):
            draw = rng.multinomial(int(n), np.full(len(bins), 1.0 / len(bins)))
            hit = np.flatnonzero(draw)
            rows.append(bins[hit])
            cols.append(np.full(len(hit), gene))
            vals.append(draw[hit])
    shape = (len(spot_of_bin), counts.shape[1])
    if not rows:
        return sparse.csr_matrix(shape, dtype=np.int32)
    m = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape)
    return m.tocsr().astype(np.int32)


@doc_params()
def write_sample_visium_hd(
    dest: str | Path,
    section: str = "C2",
    *,
    bin_sizes: Sequence[int] = (2, 8, 16),
    crop_um: float | None = 800.0,
    seed: int = 0,
) -> Path:
    """Write part of one section of the packaged her2st sample as a 10x Visium HD (Space Ranger 3) output folder.

    The folder holds what `spatialdata_io.visium_hd` reads::

        <dest>/<section>/<section>_feature_slice.h5                    layout metadata (file format 1.0)
        <dest>/<section>/microscope_image/<section>.tif                the full-resolution H&E
        <dest>/<section>/spatial/                                      hires and lowres images, scale factors
        <dest>/<section>/binned_outputs/square_008um/filtered_feature_bc_matrix.h5
        <dest>/<section>/binned_outputs/square_008um/spatial/tissue_positions.parquet
        <dest>/<section>/binned_outputs/square_008um/spatial/scalefactors_json.json

    Read it with ``spatialdata_io.visium_hd(path, load_segmentations_only=False)``. The H&E is the sample's; the
    bins are simulated from its real spot counts: every 2 um bin whose centre lies in a measured ST spot
    (100 um across) gets a random share of that spot's UMIs (multinomial, equal chances), and the 8 and 16 um
    bins are sums of their 2 um bins, as in Space Ranger. Bins between spots hold nothing and are left out, so
    the expression of one bin follows its spot, not its own few microns of tissue.

    Parameters
    ----------
    {dest_sample}
    {section_sample}
    bin_sizes
        Bin sizes in microns to write (multiples of 2).
    crop_um
        Side of the square, centred on the spots, whose spots' bins are written (spots cut by its edge are left
        out; an 800 um square holds 8 to 10 whole spots and about 17,000 2 um bins); None writes the whole section
        (about 360,000 2 um bins).
    seed
        Seed of the counts' split into bins and of the barcodes.

    Returns
    -------
    The output folder ``<dest>/<section>``.
    """
    if any(int(b) != b or b < 2 or b % 2 for b in bin_sizes):
        raise ValueError(f"Bin sizes must be even numbers of microns (Visium HD: 2, 8, 16); got {list(bin_sizes)}.")
    out = _new_folder(dest, section)
    image, mpp, centres, counts, _, genes = _sample_section(section)
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    if crop_um is None:
        box = np.array([[0.0, 0.0], [w, h]])
    else:
        mid = np.median(centres, axis=0)
        half = crop_um / mpp / 2
        box = np.clip(np.array([mid - half, mid + half]), 0, [w, h])
    radius_px = 50.0 / mpp  # ST v1 spots are 100 um across
    # whole spots only: a spot cut by the crop would pour all its UMIs into its few bins inside
    inside = ((centres - radius_px) >= box[0]).all(axis=1) & ((centres + radius_px) <= box[1]).all(axis=1)
    whole = np.flatnonzero(inside)
    if len(whole) == 0:
        raise ValueError(f"No whole spot of {section} lies in a {crop_um} um square; pass a larger `crop_um=`.")
    rows2, cols2, spot = _bins_in_spots(centres[whole], radius_px, 2.0 / mpp, box)
    spot = whole[spot]
    fine = _split_counts(counts, spot, rng)
    logger.info(f"{section}: {len(rows2)} 2 um bins in {len(np.unique(spot))} spots.")

    _write_tiff(out / "microscope_image" / f"{section}.tif", image)
    scales = _write_images(out / "spatial", image)
    (out / "spatial" / "scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": 55.0 / mpp, "microns_per_pixel": mpp, "bin_size_um": 2.0, **scales})
    )
    _write_feature_slice(out / f"{section}_feature_slice.h5")
    for size in bin_sizes:
        k = int(size) // 2
        key = pd.MultiIndex.from_arrays([rows2 // k, cols2 // k])
        codes, uniques = pd.factorize(key)
        agg = sparse.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniques), len(codes)))
        binned = (agg @ fine).astype(np.int32)
        r = np.array([u[0] for u in uniques])
        c = np.array([u[1] for u in uniques])
        name = f"square_{int(size):03d}um"
        barcodes = [f"s_{int(size):03d}um_{a:05d}_{b:05d}-1" for a, b in zip(r, c, strict=True)]
        folder = out / "binned_outputs" / name
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", binned, barcodes, genes, section)
        positions = pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": np.ones(len(r), dtype=int),
                "array_row": r,
                "array_col": c,
                "pxl_row_in_fullres": (r + 0.5) * size / mpp,
                "pxl_col_in_fullres": (c + 0.5) * size / mpp,
            }
        )
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        factors = {"bin_size_um": float(size), "spot_diameter_fullres": size / mpp, "microns_per_pixel": mpp}
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({**factors, **scales}))
    logger.info(f"Wrote a Visium HD output folder of {section} (bins {list(bin_sizes)} um) to {out}.")
    return out


def _write_feature_slice(path: Path) -> None:
    """The ``feature_slice.h5`` whose metadata spatialdata-io reads (file format and layout transform)."""
    import h5py

    layout = {"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    with h5py.File(path, "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout)})


def sample_xenium(section: str = "C2", *, crop_um: float = 400.0, n_genes: int = 300, seed: int = 0) -> SpatialData:
    """A Xenium-like SpatialData built from the packaged her2st sample, with spatialdata-io's names and transforms.

    It has what `spatialdata_io.xenium` returns with its defaults, plus the H&E it registers through its alignment
    file:

    - coordinate system ``"global"`` in morphology pixels (0.2125 um); shapes ``"cell_boundaries"`` and
      ``"nucleus_boundaries"`` in microns with ``Scale(1 / 0.2125)`` to it, indexed by ``cell_id``;
    - image ``"morphology_focus"`` (uint16, channels ``DAPI``, ..., identity to ``"global"``) and labels
      ``"cell_labels"``;
    - image ``"he_image"`` (RGB, with the affine of a Xenium H&E alignment file: H&E pixels to morphology pixels);
    - table ``"table"`` annotating ``"cell_labels"`` (instance key ``"cell_labels"``), ``obs["cell_id"]`` and
      ``obsm["spatial"]`` in microns; ``attrs["spatialdata_io_reader"] = "xenium"``.

    Cells are simulated on the sample's real H&E and counts: cells of about 12 um lie on a jittered 15 um lattice
    inside the measured spots of a ``crop_um`` square, and each spot's UMIs of the ``n_genes`` most expressed genes
    are shared among its cells at random (multinomial, equal chances).

    Parameters
    ----------
    section
        ``"C2"``, ``"C3"`` or ``"C4"``.
    crop_um
        Side of the square, centred on the spots, that holds cells.
    n_genes
        Size of the gene panel (the most expressed genes of the section).
    seed
        Seed of the cells' positions and counts.

    Returns
    -------
    The Xenium-like SpatialData.
    """
    import anndata as ad
    import geopandas as gpd
    import shapely
    import spatialdata as sd
    from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Identity, Scale

    image, mpp, centres, counts, _, genes = _sample_section(section)
    rng = np.random.default_rng(seed)
    top = np.argsort(-np.asarray(counts.sum(axis=0)).ravel(), kind="stable")[:n_genes]
    counts, genes = counts[:, top], [genes[i] for i in top]
    centres_um = centres * mpp
    mid = np.median(centres_um, axis=0)
    pitch = 15.0
    grid = np.arange(-crop_um / 2, crop_um / 2, pitch)
    gx, gy = np.meshgrid(grid, grid)
    cells_um = mid + np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-3, 3, (gx.size, 2))
    from scipy.spatial import cKDTree

    dist, spot = cKDTree(centres_um).query(cells_um)
    keep = dist <= 50.0
    cells_um, spot = cells_um[keep], spot[keep]
    cell_counts = _split_counts(counts, spot, rng)
    n = len(cells_um)
    cell_ids = [f"cell{i:05d}-1" for i in range(n)]
    # Xenium's frame is turned 3 degrees against the H&E and starts 40 um before the first cell: a cell at u
    # (the H&E's microns) is at v = R (u - o) in Xenium's microns; the alignment maps H&E pixels p to morphology
    # pixels g = R (p mpp - o) / 0.2125, as a Xenium H&E alignment file does.
    theta = np.deg2rad(3.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    origin = cells_um.min(axis=0) - 40.0
    cells_um = (cells_um - origin) @ rot.T
    ps = XENIUM_PIXEL_UM
    affine = np.eye(3)
    affine[:2, :2] = rot * mpp / ps
    affine[:2, 2] = -(rot @ origin) / ps

    to_global = Scale([1.0 / ps, 1.0 / ps], axes=("x", "y"))
    centres_shp = shapely.points(cells_um)
    cell_poly = gpd.GeoDataFrame(geometry=shapely.buffer(centres_shp, 6.0, quad_segs=4), index=pd.Index(cell_ids))
    nuc_poly = gpd.GeoDataFrame(geometry=shapely.buffer(centres_shp, 3.0, quad_segs=4), index=pd.Index(cell_ids))
    shapes = {
        "cell_boundaries": ShapesModel.parse(cell_poly, transformations={"global": to_global}),
        "nucleus_boundaries": ShapesModel.parse(nuc_poly, transformations={"global": to_global}),
    }

    side = int(np.ceil((cells_um.max() + 20.0) / ps))
    yy, xx = np.mgrid[0:side, 0:side]
    nearest_dist, nearest = cKDTree(cells_um / ps).query(np.c_[xx.ravel(), yy.ravel()])
    label = np.where(nearest_dist <= 6.0 / ps, nearest + 1, 0).reshape(side, side).astype(np.int32)
    dapi = (np.where(nearest_dist <= 3.0 / ps, 4000, 300).reshape(side, side)).astype(np.uint16)
    morphology = np.stack([dapi, dapi // 2, dapi // 3, dapi // 4])
    images = {
        "morphology_focus": Image2DModel.parse(
            morphology,
            dims=("c", "y", "x"),
            c_coords=["DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"],
            transformations={"global": Identity()},
            scale_factors=[2, 2],
        ),
        "he_image": Image2DModel.parse(
            np.moveaxis(image, -1, 0),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={"global": Affine(affine, input_axes=("x", "y"), output_axes=("x", "y"))},
            scale_factors=[2, 2],
        ),
    }
    labels = {"cell_labels": Labels2DModel.parse(label, dims=("y", "x"), transformations={"global": Identity()})}

    obs = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "region": pd.Categorical(["cell_labels"] * n),
            "cell_labels": np.arange(1, n + 1, dtype=np.int32),
            "transcript_counts": np.asarray(cell_counts.sum(axis=1)).ravel(),
            "cell_area": np.full(n, np.pi * 36.0),
            "nucleus_area": np.full(n, np.pi * 9.0),
        },
        index=pd.Index(cell_ids),
    )
    adata = ad.AnnData(X=cell_counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = cells_um
    table = TableModel.parse(adata, region="cell_labels", region_key="region", instance_key="cell_labels")
    sdata = sd.SpatialData(images=images, labels=labels, shapes=shapes, tables={"table": table})
    sdata.attrs["spatialdata_io_reader"] = "xenium"
    return sdata
