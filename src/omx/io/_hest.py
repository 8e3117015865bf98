"""Reader for samples of HEST-1k (Jaume et al., NeurIPS 2024 Datasets and Benchmarks) in the layout of its download.

The layout (https://huggingface.co/datasets/MahmoodLab/hest; https://github.com/mahmoodlab/HEST)::

    <root>/HEST_v1_1_0.csv          one row per sample: id, st_technology, organ, species, patient,
                                    pixel_size_um_estimated, spot_diameter, inter_spot_dist, ... (optional)
    <root>/st/<id>.h5ad             AnnData of raw counts per spot; obsm["spatial"] spot centres (x, y) in pixels
                                    of the full-resolution WSI; obs in_tissue, array_row, array_col,
                                    pxl_col_in_fullres, pxl_row_in_fullres
    <root>/wsis/<id>.tif            pyramidal (generic or Big) TIFF, RGB, full resolution
    <root>/metadata/<id>.json       pixel_size_um_estimated, pixel_size_um_embedded, spot_diameter (um),
                                    inter_spot_dist (um), st_technology, magnification, fullres_px_width/height, ...

``patches/``, ``cellvit_seg/``, ``tissue_seg/``, ``spatial_plots/``, ``thumbnails/`` and ``transcripts/`` are not
read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from omx._docs import doc_params
from omx._settings import warn
from omx._utils import as_list, logger
from omx.io._st import SectionParts, _counts_matrix, _per_section, _read_image, assemble_sections, select_samples

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["read_hest"]

#: Spot diameters in microns by ``st_technology``, for samples whose metadata do not give one.
HEST_SPOT_DIAMETER_UM = {"Spatial Transcriptomics": 100.0, "Visium": 55.0}

_CSV_PATTERN = re.compile(r"HEST_v(\d+(?:_\d+)*)\.csv$")
_WSI_SUFFIXES = (".tif", ".tiff")
_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHUNK_PX = 1024


@doc_params()
def read_hest(
    path: str | Path,
    ids: str | Sequence[str] | None = None,
    *,
    genes: Sequence[str] | None = None,
    mpp: float | Mapping[str, float] | None = None,
    spot_diameter: float | Mapping[str, float] | None = None,
) -> SpatialData:
    """Read samples of HEST-1k, in the layout of its download, into one SpatialData.

    Each sample ``S`` gives an image ``"S_he"``, circles ``"S_spots"`` and its rows of the single table ``"table"``;
    the coordinate system ``S`` is in microns, as in `omx.io.read_st`. The whole-slide image is read lazily from its
    pyramidal TIFF (each level of the file becomes a level of the image; a file without levels is downsampled by
    spatialdata), so a 30k-pixel slide is never loaded whole.

    HEST-1k: G. Jaume, P. Doucet, A. H. Song, M. Y. Lu, C. Almagro-Pérez, S. J. Wagner, A. J. Vaidya, R. J. Chen,
    D. F. K. Williamson, A. Kim, F. Mahmood. "HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image
    Analysis." NeurIPS 2024 Datasets and Benchmarks (arXiv:2406.16192). Data: https://huggingface.co/datasets/MahmoodLab/hest,
    licence CC BY-NC-SA 4.0 (the licence of each source study, in the ``license`` column of the metadata csv, also
    applies).

    The folder layout it expects (``<root>`` as downloaded from the hub; only the first three are needed)::

        <root>/st/<id>.h5ad             raw counts per spot; obsm["spatial"]: centres (x, y) in WSI pixels
        <root>/wsis/<id>.tif            pyramidal TIFF, RGB, full resolution
        <root>/metadata/<id>.json       pixel_size_um_estimated, spot_diameter, st_technology, ...
        <root>/HEST_v1_1_0.csv          one row per sample (optional): id, patient, pixel_size_um_estimated, ...

    Parameters
    ----------
    path
        Root of the HEST-1k download (the folder that holds ``st/``, ``wsis/`` and ``metadata/``).
    ids
        Sample ids to read, one (``"TENX95"``) or a list; None reads every sample with an ``st/<id>.h5ad``.
    genes
        Keep only these genes, in this order. Genes not measured in every sample are dropped with an
        `omx.OmxWarning`. None keeps the genes that every sample measured (their intersection: HEST-1k mixes
        technologies and panels, and a gene outside a sample's panel is unknown there, not zero); the number of
        genes left out is logged.
    mpp
        Microns per pixel of the full-resolution WSI, one number or ``{id: mpp}``. By default the metadata json's
        ``pixel_size_um_estimated``, else the csv's, else ``pixel_size_um_embedded`` (json, then csv).
    spot_diameter
        Spot diameter in microns, one number or ``{id: diameter}``. By default the metadata json's
        ``spot_diameter``, else the csv's, else the technology's (ST 100, Visium 55).

    Returns
    -------
    SpatialData with, for each sample ``S``:

    - ``images["S_he"]``: uint8 RGB multiscale image (lazy), transformation ``Scale([mpp, mpp])`` to ``S``;
    - ``shapes["S_spots"]``: circles at the spot centres in microns, column ``"radius"`` (half the diameter);

    and ``tables["table"]`` annotating all ``"S_spots"``: ``X`` raw counts (csr, int32), ``obs`` columns
    ``"section"`` (the sample id), ``"patient"`` (from the csv; missing where HEST does not say), ``"region"``,
    ``"spot_id"``, ``"array_x"`` / ``"array_y"`` (the h5ad's ``array_col`` / ``array_row``; -1 where absent) and
    ``"in_tissue"`` where the h5ad has it; row names ``"<id>_<barcode>"``; ``obsm["spatial"]`` (centres in
    microns). ``attrs["omx"]["units"]`` maps each sample to ``"um"``.
    """
    root = Path(path).expanduser()
    st_dir = root / "st"
    if not st_dir.is_dir():
        raise FileNotFoundError(
            f"{root} does not look like a HEST-1k folder: {st_dir} is missing. "
            "Pass the folder that holds st/, wsis/ and metadata/."
        )
    available = sorted(p.name[: -len(".h5ad")] for p in st_dir.glob("*.h5ad"))
    names = select_samples(ids, available, what="Samples", file=f"{st_dir}/<id>.h5ad")

    table = _read_metadata_csv(root)
    parts = [
        _read_sample(
            root,
            s,
            csv_row=table.get(s, {}),
            mpp=_per_section(mpp, s, "mpp"),
            spot_diameter=_per_section(spot_diameter, s, "spot_diameter"),
        )
        for s in names
    ]
    return assemble_sections(parts, genes=_shared_genes(parts, genes))


# ----------------------------------------------------------------------------------------------------- metadata
def _read_metadata_csv(root: Path) -> dict[str, dict[str, Any]]:
    """Rows of the newest ``HEST_v*.csv`` in ``root`` by sample id (key ``"_file"``: its name); empty without one."""
    found = [
        (tuple(int(v) for v in m.group(1).split("_")), p)
        for p in root.glob("HEST_v*.csv")
        if (m := _CSV_PATTERN.search(p.name))
    ]
    if not found:
        logger.debug(f"No HEST_v*.csv in {root}; using the per-sample metadata json only.")
        return {}
    path = max(found)[1]
    df = pd.read_csv(path)
    if "id" not in df.columns:
        warn(f"{path} has no `id` column; it is not used.")
        return {}
    df = df.drop_duplicates("id")
    return {str(i): {**row, "_file": path.name} for i, row in zip(df["id"], df.to_dict("records"), strict=True)}


def _read_metadata_json(root: Path, sample: str) -> dict[str, Any]:
    path = root / "metadata" / f"{sample}.json"
    if not path.is_file():
        logger.debug(f"{sample}: no {path}.")
        return {}
    with path.open(encoding="utf-8") as fh:
        meta = json.load(fh)
    if not isinstance(meta, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return meta


def _number(value: Any) -> float | None:
    """A positive finite float, or None (missing, NaN, empty, not a number)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _first_number(sources: Sequence[tuple[str, Mapping[str, Any], str]]) -> tuple[float, str] | None:
    """The first usable ``source[key]`` of ``(where, source, key)`` and where it came from."""
    for where, source, key in sources:
        value = _number(source.get(key))
        if value is not None:
            return value, f"{key} of {where}"
    return None


# -------------------------------------------------------------------------------------------------------- images
def _find_wsi(root: Path, sample: str) -> Path:
    for suffix in _WSI_SUFFIXES + _OTHER_IMAGE_SUFFIXES:
        path = root / "wsis" / f"{sample}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{sample}: no whole-slide image {root / 'wsis' / f'{sample}.tif'}; download it from the `wsis/` folder "
        "of https://huggingface.co/datasets/MahmoodLab/hest, or leave the sample out of `ids`."
    )


def _lazy_wsi(path: Path) -> list[Any]:
    """The levels of a (pyramidal) TIFF as lazy uint8 dask arrays (c, y, x), full resolution first."""
    import dask.array as da
    import tifffile
    import zarr

    tif = tifffile.TiffFile(path)  # stays open: the zarr stores read from it when the dask arrays are computed
    series = tif.series[0]
    axes = series.axes.upper()
    extra = [(i, ax) for i, ax in enumerate(axes) if ax not in "YXSC"]
    if any(series.shape[i] != 1 for i, _ in extra):
        raise ValueError(f"{path}: expected an RGB image, the TIFF's first series has axes {axes} {series.shape}.")
    kept = "".join(ax for ax in axes if ax in "YXSC")
    channel = next((ax for ax in kept if ax in "SC"), None)
    levels = []
    chunks = tuple(_CHUNK_PX if ax in "YX" else -1 for ax in axes)
    for i in range(len(series.levels)):
        arr = da.from_zarr(zarr.open(series.aszarr(level=i), mode="r"), chunks=chunks)
        arr = arr[tuple(0 if ax not in "YXSC" else slice(None) for ax in axes)]
        if channel is None:
            arr = da.stack([arr] * 3, axis=0)  # greyscale
        else:
            arr = arr.transpose(kept.index(channel), kept.index("Y"), kept.index("X"))
            n = arr.shape[0]
            if n in (2, 4):
                arr = arr[:-1]  # alpha
            if arr.shape[0] == 1:
                arr = da.concatenate([arr] * 3, axis=0)
            if arr.shape[0] != 3:
                raise ValueError(f"{path}: expected an RGB image, the TIFF has {n} channels ({axes} {series.shape}).")
        levels.append(arr)
    dtype = levels[0].dtype
    if dtype != np.uint8:
        if dtype != np.uint16:
            raise ValueError(f"{path}: cannot read a {dtype} whole-slide image lazily; convert it to 8-bit RGB.")
        top = 255 if int(levels[-1].max().compute()) <= 255 else 65535  # the smallest level decides
        logger.info(f"{path.name}: converting uint16 to uint8 (dividing by {top / 255:g}).")
        levels = [(lv.astype(np.float32) * (255.0 / top)).round().astype(np.uint8) for lv in levels]
    if len(levels) > 1:
        logger.debug(f"{path.name}: {len(levels)} pyramid levels, {[tuple(lv.shape[1:]) for lv in levels]}.")
    return levels


# ------------------------------------------------------------------------------------------------------- samples
def _read_sample(
    root: Path,
    sample: str,
    *,
    csv_row: Mapping[str, Any],
    mpp: float | None,
    spot_diameter: float | None,
) -> SectionParts:
    import anndata as ad

    h5ad_path = root / "st" / f"{sample}.h5ad"
    json_path = root / "metadata" / f"{sample}.json"
    meta = _read_metadata_json(root, sample)
    csv_name = csv_row.get("_file", "the HEST_v*.csv")

    if mpp is None:
        found = _first_number(
            [
                (str(json_path), meta, "pixel_size_um_estimated"),
                (csv_name, csv_row, "pixel_size_um_estimated"),
                (str(json_path), meta, "pixel_size_um_embedded"),
                (csv_name, csv_row, "pixel_size_um_embedded"),
            ]
        )
        if found is None:
            raise ValueError(
                f"{sample}: no pixel size; neither {json_path} nor the HEST_v*.csv in {root} gives "
                "`pixel_size_um_estimated` or `pixel_size_um_embedded`. Download the sample's metadata json "
                f"(metadata/{sample}.json) or pass `mpp=` (microns per pixel of the full-resolution WSI)."
            )
        mpp, mpp_source = found
    else:
        mpp_source = "`mpp=`"
    technology = meta.get("st_technology") or csv_row.get("st_technology")
    technology = technology if isinstance(technology, str) else None
    if spot_diameter is None:
        found = _first_number([(str(json_path), meta, "spot_diameter"), (csv_name, csv_row, "spot_diameter")])
        if found is not None:
            spot_diameter = found[0]
        elif technology in HEST_SPOT_DIAMETER_UM:
            spot_diameter = HEST_SPOT_DIAMETER_UM[technology]
        else:
            raise ValueError(
                f"{sample}: no spot diameter in {json_path} or the HEST_v*.csv, and none is known for technology "
                f"{technology!r}; pass `spot_diameter=` (microns)."
            )

    wsi_path = _find_wsi(root, sample)
    if wsi_path.suffix.lower() in _WSI_SUFFIXES:
        image = _lazy_wsi(wsi_path)
        height, width = image[0].shape[1:]
    else:
        image = _read_image(wsi_path)
        height, width = image.shape[:2]
    expected = (_number(meta.get("fullres_px_height")), _number(meta.get("fullres_px_width")))
    if all(expected) and (round(expected[0]), round(expected[1])) != (height, width):
        warn(
            f"{sample}: {wsi_path.name} is {width} x {height} px but {json_path.name} says "
            f"{round(expected[1])} x {round(expected[0])}; the spots may not land on the tissue."
        )

    adata = ad.read_h5ad(h5ad_path)
    if "spatial" in adata.obsm:
        centres = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        centres = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    else:
        raise ValueError(
            f"{h5ad_path}: no spot centres (obsm['spatial'] or obs pxl_col_in_fullres/pxl_row_in_fullres)."
        )
    if not np.all(np.isfinite(centres)):
        raise ValueError(f"{h5ad_path}: {int((~np.isfinite(centres)).any(axis=1).sum())} spot centres are NaN.")
    outside = (centres[:, 0] < 0) | (centres[:, 0] >= width) | (centres[:, 1] < 0) | (centres[:, 1] >= height)
    if outside.any():
        warn(f"{sample}: {int(outside.sum())} spot centres lie outside the {width} x {height} image.")

    if {"array_col", "array_row"} <= set(adata.obs.columns):
        array_xy = adata.obs[["array_col", "array_row"]].to_numpy().astype(np.int64)
    else:
        array_xy = np.full((adata.n_obs, 2), -1, dtype=np.int64)
    genes = [str(g) for g in adata.var_names]
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()]
    if len(duplicated):
        warn(f"{sample}: {len(duplicated)} duplicated gene names (e.g. {duplicated[:3].tolist()}); summing them.")
    extra = pd.DataFrame(index=pd.RangeIndex(adata.n_obs))
    if "in_tissue" in adata.obs.columns:
        extra["in_tissue"] = adata.obs["in_tissue"].to_numpy()
    patient = csv_row.get("patient", meta.get("patient"))
    patient = str(patient) if isinstance(patient, str | int) and str(patient).strip() else None

    logger.info(
        f"{sample}: {adata.n_obs} spots x {adata.n_vars} genes ({technology or 'technology unknown'}), "
        f"{mpp:.4g} um per pixel ({mpp_source}), spots {spot_diameter:g} um across, WSI {width} x {height} px."
    )
    return SectionParts(
        name=sample,
        patient=patient,
        image=image,
        mpp=float(mpp),
        centres_px=centres,
        array_xy=array_xy,
        counts=_counts_matrix(adata.X, f"{sample} ({h5ad_path})"),
        genes=genes,
        radius_um=float(spot_diameter) / 2,
        obs=extra,
        spot_names=[str(b) for b in adata.obs_names],
    )


def _shared_genes(parts: Sequence[SectionParts], genes: Sequence[str] | None) -> list[str]:
    """The genes every sample measured (in the first sample's order), or those of ``genes`` among them."""
    shared = set(parts[0].genes).intersection(*(p.genes for p in parts[1:]))
    if genes is None:
        n_union = len(set().union(*(p.genes for p in parts)))
        if len(shared) < n_union:
            logger.info(
                f"Keeping the {len(shared)} genes that all {len(parts)} samples measured; "
                f"{n_union - len(shared)} measured in only some are left out (pass `genes=` to choose)."
            )
        kept = [g for g in dict.fromkeys(parts[0].genes) if g in shared]
    else:
        genes = list(dict.fromkeys(as_list(genes)))
        absent = [g for g in genes if g not in shared]
        if absent:
            warn(
                f"{len(absent)} of {len(genes)} requested genes are not measured in every sample, dropped: "
                f"{absent[:10]}"
            )
        kept = [g for g in genes if g in shared]
    if not kept:
        raise ValueError(
            f"No gene is measured in all of the samples {[p.name for p in parts]} (among those asked for); "
            "read samples with different panels separately, or pass `genes=` with genes they share."
        )
    return kept
