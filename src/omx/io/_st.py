"""Reader for Spatial Transcriptomics (ST v1) sections in the layout of the her2st study.

The layout (Andersson et al., Nat Commun 12, 6012, 2021; https://github.com/almaan/her2st)::

    <root>/data/ST-cnts/<S>.tsv.gz                         counts, spots x genes, row names "<x>x<y>"
    <root>/data/ST-spotfiles/<S>_selection.tsv             x y new_x new_y pixel_x pixel_y selected
    <root>/data/ST-imgs/<patient>/<S>/*.jpg                full-resolution H&E image
    <root>/app/www/imgs/<S>_HE_image_dark.png              downscaled H&E image (used when the above is missing)
    <root>/data/ST-pat/lbl/<S>_labeled_coordinates.tsv     pathologist labels (optional)
    <root>/res/ST-cluster/lbl/<S>-cluster-annotation.tsv.gz  expression clusters (optional)
    <root>/res/ST-cluster/motivation.csv                   cluster names per patient (optional)
    <root>/res/ST-deconv/props/{major,minor}/<S>-proportion.tsv  stereoscope proportions (optional)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from omx._docs import doc_params
from omx._schema import Key
from omx._settings import warn
from omx._utils import as_list, logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["read_st"]

#: ST v1: spots 100 um across, 200 um centre to centre.
ST_SPOT_RADIUS_UM = 50.0
ST_SPOT_PITCH_UM = 200.0

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_PYRAMID_MIN_SIDE = 1000
_CHUNKS = (3, 1024, 1024)

#: Width in pixels of the original scan that ``app/www/imgs/<S>_HE_image_dark.png`` was scaled down from.
#: The spotfile pixel coordinates refer to the original; only the sections listed here can be rescaled
#: without the ``pixel_scale=`` argument.
_APP_IMAGE_ORIGINAL_WIDTH = {"A1": 6954}


@dataclass
class SectionParts:
    """One section's pieces, before they are turned into SpatialData elements."""

    name: str
    patient: str | None  # None where it is not known (no category in ``obs["patient"]``)
    #: (y, x, 3) uint8 in memory, or the levels of a lazy pyramid: dask arrays (c, y, x) uint8, full resolution
    #: first (a single level is downsampled by spatialdata, several are used as they are)
    image: np.ndarray | Sequence[Any]
    mpp: float  # microns per pixel of ``image``
    centres_px: np.ndarray  # (n, 2) spot centres (x, y) in pixels of ``image``
    array_xy: np.ndarray  # (n, 2) integer array coordinates
    counts: sparse.csr_matrix  # (n, len(genes)) int32
    genes: list[str]
    radius_um: float
    obs: pd.DataFrame | None = None  # extra per-spot columns, rows in spot order
    obsm: dict[str, pd.DataFrame | np.ndarray] = field(default_factory=dict)
    spot_names: Sequence[str] | None = None  # row names after "<section>_"; None: "<array_x>x<array_y>"


@doc_params()
def read_st(
    path: str | Path,
    sections: str | Sequence[str] | None = None,
    *,
    genes: Sequence[str] | None = None,
    mpp: float | Mapping[str, float] | None = None,
    pixel_scale: float | Mapping[str, float] | None = None,
    spot_radius: float = ST_SPOT_RADIUS_UM,
    spot_pitch: float = ST_SPOT_PITCH_UM,
) -> SpatialData:
    """Read Spatial Transcriptomics (ST v1) sections in the her2st layout into one SpatialData.

    Each section ``S`` gives an image ``"S_he"``, circles ``"S_spots"`` and its rows of the single table
    ``"table"``; the coordinate system ``S`` is in microns. Counts and spotfile are joined on the spot ids
    they share; labels, clusters and stereoscope proportions are added where their files exist.

    Parameters
    ----------
    path
        Root of the study folder (the one that holds ``data/ST-cnts``).
    {sections}
    {genes_read}
    mpp
        Microns per pixel of each section's image, one number or ``{section: mpp}``. By default it is
        estimated from the spot grid: a least-squares fit of the spots' pixel coordinates against their
        array coordinates, with ``spot_pitch`` microns between neighbouring spots.
    pixel_scale
        Factor from the spotfile's ``pixel_x``/``pixel_y`` to pixels of the image that is read, one number or
        ``{section: factor}``. By default 1 for full-resolution images and ``2000 / 6954`` for the
        downscaled ``A1_HE_image_dark.png``; other downscaled app images need it.
    spot_radius
        Spot radius in microns (ST v1: 50).
    spot_pitch
        Centre-to-centre distance of neighbouring spots in microns (ST v1: 200).

    Returns
    -------
    SpatialData with, for each section ``S``:

    - ``images["S_he"]``: uint8 RGB multiscale image, transformation ``Scale([mpp, mpp])`` to ``S``;
    - ``shapes["S_spots"]``: circles at the spot centres in microns, column ``"radius"``;

    and ``tables["table"]`` annotating all ``"S_spots"``: ``X`` raw counts (csr, int32), ``obs`` columns
    ``"section"``, ``"patient"``, ``"region"``, ``"spot_id"``, ``"array_x"``, ``"array_y"`` and, where the files
    exist, ``"pathologist_label"``, ``"cluster"``, ``"cluster_annotation"``; ``obsm["spatial"]`` (centres in
    microns) and ``obsm["stereoscope_major"]`` / ``obsm["stereoscope_minor"]`` (DataFrames, NaN rows for
    sections without them). ``attrs["omx"]["units"]`` maps each section to ``"um"``.
    """
    root = Path(path).expanduser()
    cnt_dir = root / "data" / "ST-cnts"
    if not cnt_dir.is_dir():
        raise FileNotFoundError(
            f"{root} does not look like an ST / her2st study folder: {cnt_dir} is missing. "
            "Pass the folder that holds data/ST-cnts, data/ST-spotfiles and data/ST-imgs."
        )
    names = select_samples(sections, _find_sections(root), what="Sections", file=f"{cnt_dir}/<section>.tsv[.gz]")

    cluster_names = _read_cluster_names(root)
    parts = [
        _read_section(
            root,
            s,
            mpp=_per_section(mpp, s, "mpp"),
            pixel_scale=_per_section(pixel_scale, s, "pixel_scale"),
            spot_radius=spot_radius,
            spot_pitch=spot_pitch,
            cluster_names=cluster_names,
        )
        for s in names
    ]
    return assemble_sections(parts, genes=genes)


# ----------------------------------------------------------------------------------------------------------- files
def select_samples(requested, available: list[str], *, what: str, file: str) -> list[str]:
    """The requested samples (all available when None), each once and each with its ``file``; else a clear error."""
    names = as_list(requested)
    if names is None:
        if not available:
            raise FileNotFoundError(f"No {what.lower()} found: no {file}.")
        return list(available)
    missing = [s for s in names if s not in available]
    if missing:
        raise KeyError(f"{what} {missing} have no {file}. Available {what.lower()}: {available}.")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} are listed twice: {names}.")
    return names


def _find_sections(root: Path) -> list[str]:
    names = {re.sub(r"\.tsv(\.gz)?$", "", p.name) for p in (root / "data" / "ST-cnts").glob("*.tsv*")}
    return sorted(n for n in names if n and not n.endswith(".tsv"))


def _first(paths, what: str, section: str) -> Path | None:
    paths = sorted(p for p in paths if p.is_file())
    if len(paths) > 1:
        warn(f"{section}: {len(paths)} {what} files found ({[p.name for p in paths]}); using {paths[0]}.")
    return paths[0] if paths else None


def _find_image(root: Path, section: str) -> tuple[Path, str | None, bool]:
    """Return (image path, patient from the folder name or None, whether it is the downscaled app image)."""
    full = _first(
        (p for p in root.glob(f"data/ST-imgs/*/{section}/*") if p.suffix.lower() in _IMAGE_SUFFIXES),
        "full-resolution image",
        section,
    )
    if full is not None:
        return full, full.parent.parent.name, False
    small = _first(
        (p for p in root.glob(f"app/www/imgs/{section}_*") if p.suffix.lower() in _IMAGE_SUFFIXES),
        "downscaled image",
        section,
    )
    if small is not None:
        return small, None, True
    raise FileNotFoundError(
        f"{section}: no H&E image found; looked for data/ST-imgs/*/{section}/*.jpg|png|tif "
        f"and app/www/imgs/{section}_*.png under {root}."
    )


def _per_section(value, section: str, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get(section)
        if value is None:
            return None
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` for {section} must be a positive number, got {value}.")
    return value


# ---------------------------------------------------------------------------------------------------------- images
def _read_image(path: Path) -> np.ndarray:
    """Read an image as a uint8 (y, x, 3) RGB array, converting other modes with a log message."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # (c, y, x) -> (y, x, c)
    else:
        from PIL import Image, UnidentifiedImageError

        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # whole-slide H&E images are larger than PIL's bomb guard
        try:
            with Image.open(path) as im:
                if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I;16L", "I"):
                    logger.info(f"{path.name}: converting PIL mode {im.mode!r} to RGB.")
                    im = im.convert("RGB")
                arr = np.asarray(im)
        except UnidentifiedImageError as err:
            head = path.read_bytes()[:64]
            hint = " It is a git-lfs pointer: fetch the real file with `git lfs pull`." if b"git-lfs" in head else ""
            raise ValueError(f"Cannot read {path} as an image.{hint}") from err
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return _to_rgb_uint8(arr, name=path.name)


def _to_rgb_uint8(arr: np.ndarray, *, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        logger.info(f"{name}: greyscale image, repeating it into 3 RGB channels.")
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{name}: expected an RGB image (y, x, 3), got an array of shape {arr.shape}.")
    if arr.shape[-1] in (2, 4):
        logger.info(f"{name}: dropping the alpha channel.")
        arr = arr[..., :-1]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() < 2**16):
        top = 255 if arr.max() <= 255 else 65535
        logger.info(f"{name}: converting {arr.dtype} to uint8 (dividing by {top / 255:g}).")
        return (arr.astype(np.float32) * (255.0 / top)).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating) and np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1:
        logger.info(f"{name}: converting float image in [0, 1] to uint8.")
        return (np.nan_to_num(arr) * 255).round().astype(np.uint8)
    raise ValueError(
        f"{name}: cannot convert an image of dtype {arr.dtype} with values in "
        f"[{arr.min()}, {arr.max()}] to uint8 RGB; convert it to 8-bit RGB first."
    )


def _pyramid_factors(shape: tuple[int, ...]) -> list[int]:
    """Halve until the smallest side is below ~1000 px."""
    side, factors = min(shape), []
    while side >= _PYRAMID_MIN_SIDE:
        side //= 2
        factors.append(2)
    return factors


# ------------------------------------------------------------------------------------------------------ spot grid
def _estimate_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, *, pitch: float, section: str) -> float:
    """Microns per pixel from a least-squares affine fit of pixel against array coordinates."""
    if len(array_xy) < 3:
        raise ValueError(f"{section}: {len(array_xy)} spots are too few to estimate microns per pixel; pass `mpp=`.")
    design = np.column_stack([array_xy, np.ones(len(array_xy))])
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    step = np.linalg.norm(coef[:2], axis=1)  # pixels per array step along x and along y
    if not np.all(step > 0) or np.linalg.matrix_rank(design) < 3:
        raise ValueError(f"{section}: the spot grid is degenerate; pass `mpp=`.")
    rms = float(np.sqrt(np.mean(np.sum((design @ coef - pixel_xy) ** 2, axis=1))))
    px_per_step = float(step.mean())
    if rms > 0.25 * px_per_step:
        warn(
            f"{section}: the spot grid fits poorly (rms {rms:.1f} px for a step of {px_per_step:.1f} px); "
            "check the spotfile or pass `mpp=`."
        )
    return pitch / px_per_step


# --------------------------------------------------------------------------------------------------------- tables
def _read_counts(path: Path, section: str) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", index_col=0)
    header = pd.read_csv(path, sep="\t", index_col=0, header=None, nrows=1)  # names as written, not "G.1"
    df.columns = header.iloc[0].astype(str).to_numpy()
    df.index = df.index.astype(str)
    if df.index.duplicated().any():
        raise ValueError(f"{path}: duplicated spot ids {df.index[df.index.duplicated()][:5].tolist()}.")
    if df.columns.duplicated().any():
        dup = df.columns[df.columns.duplicated()]
        warn(f"{section}: {len(dup)} duplicated gene names (e.g. {dup[:3].tolist()}); summing them.")
        df = df.T.groupby(level=0, sort=False).sum().T
    return df


def _counts_matrix(counts: pd.DataFrame | np.ndarray | sparse.spmatrix, section: str) -> sparse.csr_matrix:
    """Check that ``counts`` (spots x genes: a DataFrame, an array or a sparse matrix) are raw counts; int32 csr."""
    matrix = sparse.csr_matrix(counts) if sparse.issparse(counts) else None
    values = matrix.data if matrix is not None else np.asarray(counts)
    if not np.issubdtype(values.dtype, np.integer):
        values = values.astype(np.float64)
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise ValueError(f"{section}: the counts are not integers; omx expects raw UMI counts.")
    if values.size and values.min() < 0:
        raise ValueError(f"{section}: the counts hold negative values; omx expects raw UMI counts.")
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{section}: counts exceed the int32 range.")
    if matrix is None:
        return sparse.csr_matrix(values.astype(np.int32))
    return sparse.csr_matrix((values.astype(np.int32), matrix.indices, matrix.indptr), shape=matrix.shape)


def _read_spotfile(path: Path, section: str) -> pd.DataFrame:
    spots = pd.read_csv(path, sep="\t")
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(spots.columns):
        raise ValueError(f"{path}: expected columns {sorted(need)}, found {list(spots.columns)}.")
    if "selected" in spots.columns:
        keep = spots["selected"].astype(float) == 1
        if not keep.all():
            logger.debug(f"{section}: keeping {int(keep.sum())} of {len(spots)} spotfile rows marked selected.")
        spots = spots[keep]
    spots = spots.assign(x=spots["x"].round().astype(int), y=spots["y"].round().astype(int))
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    return spots[~spots.index.duplicated()]


def _read_labels(root: Path, section: str, ids: pd.Index) -> pd.Series | None:
    path = _first(root.glob(f"data/ST-pat/lbl/{section}_labeled_coordinates.tsv*"), "label", section)
    if path is None:
        return None
    lbl = pd.read_csv(path, sep="\t").dropna(subset=["x", "y"])
    key = lbl["x"].round().astype(int).astype(str) + "x" + lbl["y"].round().astype(int).astype(str)
    labels = pd.Series(lbl["label"].astype(str).str.strip().to_numpy(), index=key)
    labels = labels[~labels.index.duplicated()].reindex(ids)
    logger.debug(f"{section}: pathologist labels for {int(labels.notna().sum())} of {len(ids)} spots.")
    return labels


def _read_cluster_names(root: Path) -> dict[tuple[str, str], str]:
    """``{(patient, cluster): name}`` from ``motivation.csv``, whose free-text columns hold unquoted commas."""
    path = root / "res" / "ST-cluster" / "motivation.csv"
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    header = [h.strip() for h in lines[0].split(",")[:3]] if lines else []
    if header != ["patient", "cluster", "annotated as"]:
        warn(f"{path}: unexpected header {header}; cluster names are not added.")
        return {}
    names = {}
    for line in lines[1:]:
        fields = [f.strip() for f in line.split(",", 3)]
        if len(fields) >= 3 and fields[0]:
            names[(fields[0], fields[1])] = fields[2]
    return names


def _read_clusters(root: Path, section: str, ids: pd.Index) -> pd.Series | None:
    path = _first(root.glob(f"res/ST-cluster/lbl/{section}-cluster-annotation.tsv*"), "cluster", section)
    if path is None:
        return None
    cl = pd.read_csv(path, sep="\t")
    key = cl["x"].round().astype(int).astype(str) + "x" + cl["y"].round().astype(int).astype(str)
    clusters = pd.Series(cl["label"].astype(str).to_numpy(), index=key)
    clusters = clusters[~clusters.index.duplicated()].reindex(ids)
    logger.debug(f"{section}: clusters for {int(clusters.notna().sum())} of {len(ids)} spots.")
    return clusters


def _read_proportions(root: Path, section: str, tier: str, ids: pd.Index) -> pd.DataFrame | None:
    path = _first(root.glob(f"res/ST-deconv/props/{tier}/{section}-proportion.tsv*"), f"{tier} proportion", section)
    if path is None:
        return None
    props = pd.read_csv(path, sep="\t", index_col=0)
    props.index = props.index.astype(str)
    # trailing spaces ("NK cells ") and "/" (not allowed in zarr keys) in the published cell-type names
    cols = [str(c).strip().replace("/", "_") for c in props.columns]
    if cols != [str(c) for c in props.columns]:
        logger.debug(f"{section}: cleaned {tier} cell-type names (stripped spaces, '/' -> '_').")
    props.columns = cols
    props = props[~props.index.duplicated()].reindex(ids).astype(np.float64)
    n_missing = int(props.isna().any(axis=1).sum())
    if n_missing:
        logger.debug(f"{section}: no {tier} proportions for {n_missing} of {len(ids)} spots (NaN rows).")
    return props


def _read_section(
    root: Path,
    section: str,
    *,
    mpp: float | None,
    pixel_scale: float | None,
    spot_radius: float,
    spot_pitch: float,
    cluster_names: dict[tuple[str, str], str],
) -> SectionParts:
    cnt_path = _first(root.glob(f"data/ST-cnts/{section}.tsv*"), "counts", section)
    spot_path = _first(root.glob(f"data/ST-spotfiles/{section}_selection.tsv*"), "spotfile", section)
    if spot_path is None:
        raise FileNotFoundError(f"{section}: no spotfile data/ST-spotfiles/{section}_selection.tsv under {root}.")
    counts = _read_counts(cnt_path, section)
    spots = _read_spotfile(spot_path, section)

    ids = counts.index[counts.index.isin(spots.index)]
    n_drop_c, n_drop_s = len(counts) - len(ids), len(spots) - len(ids)
    if n_drop_c or n_drop_s:
        logger.info(
            f"{section}: {len(ids)} spots in both counts and spotfile; dropped {n_drop_c} only in the counts "
            f"and {n_drop_s} only in the spotfile."
        )
    if len(ids) == 0:
        raise ValueError(f"{section}: the counts and the spotfile share no spot ids.")
    counts, spots = counts.loc[ids], spots.loc[ids]

    img_path, patient, downscaled = _find_image(root, section)
    if patient is None:
        match = re.match(r"[A-Za-z]+", section)
        patient = match.group(0) if match else section
    image = _read_image(img_path)
    if pixel_scale is None and downscaled:
        if section not in _APP_IMAGE_ORIGINAL_WIDTH:
            raise ValueError(
                f"{section}: only the downscaled image {img_path} was found and its original width is unknown; "
                "pass `pixel_scale=` (image width / original width) or add the full-resolution image under "
                f"data/ST-imgs/<patient>/{section}/."
            )
        pixel_scale = image.shape[1] / _APP_IMAGE_ORIGINAL_WIDTH[section]
    pixel_scale = 1.0 if pixel_scale is None else pixel_scale
    centres = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64) * pixel_scale

    grid_cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(spots.columns) else ["x", "y"]
    estimate = _estimate_mpp(spots[grid_cols].to_numpy(np.float64), centres, pitch=spot_pitch, section=section)
    if mpp is None:
        mpp = estimate
        logger.info(f"{section}: {mpp:.3f} um per pixel estimated from the spot grid ({img_path.name}).")
    else:
        message = f"{section}: using mpp={mpp:.3f} um per pixel; the spot grid suggests {estimate:.3f}."
        if abs(mpp / estimate - 1) > 0.1:
            warn(message)
        else:
            logger.info(message)

    h, w = image.shape[:2]
    outside = (centres[:, 0] < 0) | (centres[:, 0] >= w) | (centres[:, 1] < 0) | (centres[:, 1] >= h)
    if outside.any():
        warn(f"{section}: {int(outside.sum())} spot centres lie outside the {w} x {h} image.")

    extra = pd.DataFrame(index=ids)
    labels = _read_labels(root, section, ids)
    if labels is not None:
        extra["pathologist_label"] = labels
    clusters = _read_clusters(root, section, ids)
    if clusters is not None:
        extra["cluster"] = clusters
        if cluster_names:
            extra["cluster_annotation"] = [
                cluster_names.get((patient, c)) if isinstance(c, str) else None for c in clusters
            ]
    obsm = {}
    for tier in ("major", "minor"):
        props = _read_proportions(root, section, tier, ids)
        if props is not None:
            obsm[f"stereoscope_{tier}"] = props

    return SectionParts(
        name=section,
        patient=patient,
        image=image,
        mpp=float(mpp),
        centres_px=centres,
        array_xy=spots[["x", "y"]].to_numpy(np.int64),
        counts=_counts_matrix(counts, section),
        genes=[str(g) for g in counts.columns],
        radius_um=float(spot_radius),
        obs=extra.reset_index(drop=True),
        obsm=obsm,
    )


# ------------------------------------------------------------------------------------------------------- assemble
def _image_element(image: np.ndarray | Sequence[Any], transformations: dict):
    """An RGB image element: (y, x, 3) in memory, or pyramid levels as dask arrays (c, y, x), full resolution first.

    An in-memory image or a single level is halved by spatialdata until its smallest side is below ~1000 px; the
    levels of a pyramidal file are used as they are, each one scaled to the full-resolution pixels.
    """
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation

    if isinstance(image, np.ndarray) or len(image) == 1:
        data = np.transpose(image, (2, 0, 1)) if isinstance(image, np.ndarray) else image[0]
        return Image2DModel.parse(
            data,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=_pyramid_factors(data.shape[1:]) or None,
            chunks=_CHUNKS,
            transformations=transformations,
        )
    # coordinates at pixel centres in full-resolution pixels, as spatialdata gives the levels it computes itself
    full_y, full_x = image[0].shape[1:]
    levels = {
        f"scale{i}": xr.Dataset(
            {
                "image": xr.DataArray(
                    level,
                    dims=("c", "y", "x"),
                    coords={
                        "c": ["r", "g", "b"],
                        "y": (np.arange(level.shape[1]) + 0.5) * full_y / level.shape[1],
                        "x": (np.arange(level.shape[2]) + 0.5) * full_x / level.shape[2],
                    },
                )
            }
        )
        for i, level in enumerate(image)
    }
    tree = xr.DataTree.from_dict(levels)
    set_transformation(tree, transformations, set_all=True)
    Image2DModel.validate(tree)
    return tree


def _gene_index(parts: Sequence[SectionParts], genes: Sequence[str] | None) -> list[str]:
    union = list(dict.fromkeys(g for p in parts for g in p.genes))
    if genes is None:
        return union
    genes = list(dict.fromkeys(as_list(genes)))
    known = set(union)
    absent = [g for g in genes if g not in known]
    if absent:
        warn(f"{len(absent)} of {len(genes)} requested genes were measured in no section, dropped: {absent[:10]}")
    return [g for g in genes if g in known]


def _reindex_genes(counts: sparse.csr_matrix, genes: Sequence[str], target: dict[str, int]) -> sparse.csr_matrix:
    col_map = np.array([target.get(g, -1) for g in genes], dtype=np.int64)
    coo = counts.tocoo()
    new_cols = col_map[coo.col]
    keep = new_cols >= 0
    out = sparse.csr_matrix(
        (coo.data[keep], (coo.row[keep], new_cols[keep])), shape=(counts.shape[0], len(target)), dtype=np.int32
    )
    out.sum_duplicates()
    out.sort_indices()
    return out


def assemble_sections(parts: Sequence[SectionParts], *, genes: Sequence[str] | None = None) -> SpatialData:
    """Turn sections into one SpatialData in the omx layout (see the module docstring of `omx.io`)."""
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    var_names = _gene_index(parts, genes)
    target = {g: i for i, g in enumerate(var_names)}
    section_names = [p.name for p in parts]
    regions = [f"{s}_spots" for s in section_names]

    images, shapes, obs_frames, blocks = {}, {}, [], []
    for part, region in zip(parts, regions, strict=True):
        s, n = part.name, len(part.centres_px)
        images[f"{s}_he"] = _image_element(part.image, {s: Scale([part.mpp, part.mpp], axes=("y", "x"))})
        centres_um = part.centres_px * part.mpp
        shapes[region] = ShapesModel.parse(
            centres_um,
            geometry=0,
            radius=np.full(n, part.radius_um),
            index=pd.RangeIndex(n),
            transformations={s: Identity()},
        )
        ax, ay = part.array_xy[:, 0], part.array_xy[:, 1]
        obs = pd.DataFrame(
            {
                "section": s,
                "patient": part.patient,
                "region": region,
                "spot_id": np.arange(n, dtype=np.int64),
                "array_x": ax.astype(np.int64),
                "array_y": ay.astype(np.int64),
            },
            index=[f"{s}_{x}x{y}" for x, y in zip(ax, ay, strict=True)]
            if part.spot_names is None
            else [f"{s}_{name}" for name in part.spot_names],
        )
        if part.obs is not None and len(part.obs.columns):
            extra = part.obs.copy()
            extra.index = obs.index
            obs = pd.concat([obs, extra.astype(object)], axis=1)
        obs_frames.append((obs, centres_um))
        blocks.append(_reindex_genes(part.counts, part.genes, target))

    obs = pd.concat([o for o, _ in obs_frames], axis=0)
    for col in ("section", "patient", "region"):
        order = [c for c in dict.fromkeys(obs[col]) if not pd.isna(c)]
        obs[col] = pd.Categorical(obs[col], categories=order)
    for col in obs.columns.difference(["section", "patient", "region", "spot_id", "array_x", "array_y"]):
        obs[col] = obs[col].astype("category")
    if not obs.index.is_unique:
        raise ValueError("Spot names are not unique across sections; are sections listed twice?")

    adata = ad.AnnData(
        X=sparse.vstack(blocks, format="csr", dtype=np.int32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(var_names, dtype=object)),
    )
    adata.obsm["spatial"] = np.vstack([c for _, c in obs_frames]).astype(np.float64)
    for key in dict.fromkeys(k for p in parts for k in p.obsm):
        frames = [p.obsm.get(key) for p in parts]
        if all(isinstance(f, np.ndarray) for f in frames):
            adata.obsm[key] = np.vstack(frames)
            continue
        if any(isinstance(f, np.ndarray) for f in frames):
            raise TypeError(f"obsm[{key!r}] mixes arrays and DataFrames across sections.")
        columns = list(dict.fromkeys(c for f in frames if f is not None for c in f.columns))
        rows = []
        for f, (o, _) in zip(frames, obs_frames, strict=True):
            values = np.full((len(o), len(columns)), np.nan) if f is None else f.reindex(columns=columns).to_numpy()
            rows.append(pd.DataFrame(values.astype(np.float64), index=o.index, columns=columns))
        adata.obsm[key] = pd.concat(rows, axis=0)

    table = TableModel.parse(adata, region=regions, region_key="region", instance_key="spot_id")
    sdata = SpatialData(
        images=images,
        shapes=shapes,
        tables={"table": table},
        attrs={Key.ATTRS: {"units": dict.fromkeys(section_names, "um")}},
    )
    logger.info(
        f"Read {len(section_names)} sections ({', '.join(section_names)}): {adata.n_obs} spots x {adata.n_vars} genes."
    )
    return sdata
