"""Public 10x Genomics Visium H&E + expression data sets, fetched with pinned checksums and read with spatialdata-io."""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from omx._docs import doc_params
from omx._utils import logger
from omx.datasets._registry import fetch, get_dataset

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["download_visium", "visium_breast_block_a", "visium_breast_ffpe"]

#: Registered data sets laid out as a Space Ranger output folder.
VISIUM_DATASETS = ("visium_breast_ffpe", "visium_breast_block_a")
_COUNTS, _SPATIAL, _IMAGE = "filtered_feature_bc_matrix.h5", "spatial.tar.gz", "image.tif"


def _untar_spatial(archive: Path, folder: Path) -> None:
    """Unpack ``spatial.tar.gz`` into ``folder`` (giving ``folder/spatial/...``): plain files and folders only."""
    root = folder.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            target = (root / m.name).resolve()
            inside = target == root or root in target.parents
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts or not inside:
                raise ValueError(f"{archive} holds {m.name!r}: not a plain file or folder inside it; nothing unpacked.")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library's checks as well
            tar.extractall(root, members=members, filter="data")
        else:  # pragma: no cover
            tar.extractall(root, members=members)


@doc_params()
def download_visium(
    name: str,
    path: str | Path | None = None,
    *,
    fullres_image: bool = True,
    progressbar: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download a registered 10x Visium data set and lay it out as a Space Ranger output folder.

    The folder holds ``filtered_feature_bc_matrix.h5``, ``spatial/`` (unpacked from ``spatial.tar.gz``:
    tissue positions, scale factors, hires and lowres images) and the full-resolution H&E ``image.tif``; pass it to
    :func:`spatialdata_io.visium` with ``fullres_image_file="image.tif"``. Files already there with their pinned
    checksums are not downloaded again. See `omx.datasets.registry` for sizes, licences and citations.

    Parameters
    ----------
    name
        ``"visium_breast_ffpe"`` or ``"visium_breast_block_a"``.
    path
        Folder to put the data set in; None uses ``$OMX_DATA_DIR/<name>`` (or omx's cache folder).
    {fullres_image}
    {progressbar}
    {timeout}

    Returns
    -------
    The data set's folder.
    """
    if name not in VISIUM_DATASETS:
        raise KeyError(f"{name!r} is not a registered Visium data set; use one of {list(VISIUM_DATASETS)}.")
    files = [_COUNTS, _SPATIAL, *([_IMAGE] if fullres_image else [])]
    paths = fetch(name, files, path=path, progressbar=progressbar, timeout=timeout)
    folder = paths[_COUNTS].parent
    if not (folder / "spatial" / "scalefactors_json.json").is_file():
        _untar_spatial(paths[_SPATIAL], folder)
    return folder


#: The parameters of the Visium readers, in their docstrings.
_READER_PARAMS = """
path
    Folder to keep the data set in; None uses ``$OMX_DATA_DIR/<name>`` (or omx's cache folder), ``<name>`` being
    the reader's name.
fullres_image
    Fetch and read the full-resolution H&E image (the largest download); without it the SpatialData has the
    hires and lowres images only.
progressbar
    Show a progress bar per download.
"""


def _read(name: str, path: str | Path | None, fullres_image: bool, progressbar: bool) -> SpatialData:
    from spatialdata_io import visium

    folder = download_visium(name, path, fullres_image=fullres_image, progressbar=progressbar)
    dataset = get_dataset(name)
    logger.info(f"Reading {name} from {folder}. Licence {dataset.licence}; cite: {dataset.citation}")
    return visium(folder, dataset_id=name, fullres_image_file=_IMAGE if fullres_image else None)


@doc_params(visium_reader=_READER_PARAMS)
def visium_breast_ffpe(
    path: str | Path | None = None, *, fullres_image: bool = True, progressbar: bool = True
) -> SpatialData:
    """Download (once) and read 10x Genomics' Visium FFPE human breast cancer section (DCIS and invasive carcinoma).

    "Human Breast Cancer: Ductal Carcinoma In Situ, Invasive Carcinoma (FFPE)", Space Ranger 1.3.0, 10x Genomics
    (2021), https://www.10xgenomics.com/datasets. Licence CC BY 4.0: cite 10x Genomics and the data set's page.
    The originals are at ``https://cf.10xgenomics.com/samples/spatial-exp/1.3.0/Visium_FFPE_Human_Breast_Cancer/``
    (``Visium_FFPE_Human_Breast_Cancer_filtered_feature_bc_matrix.h5``, ``..._spatial.tar.gz``,
    ``..._image.tif``); omx fetches the same files from the scverse mirror ``exampledata.scverse.org``, where
    squidpy's registry pins their sha256.

    Parameters
    ----------
    {visium_reader}

    Returns
    -------
    SpatialData as :func:`spatialdata_io.visium` reads it, with ``dataset_id="visium_breast_ffpe"``: images
    ``"visium_breast_ffpe_full_image"`` (with ``fullres_image``), ``"..._hires_image"`` and
    ``"..._lowres_image"``, circles ``"visium_breast_ffpe"`` and the counts in ``tables["table"]``.
    """
    return _read("visium_breast_ffpe", path, fullres_image, progressbar)


@doc_params(visium_reader=_READER_PARAMS)
def visium_breast_block_a(
    path: str | Path | None = None, *, fullres_image: bool = True, progressbar: bool = True
) -> SpatialData:
    """Download (once) and read 10x Genomics' Visium human breast cancer section, Block A Section 1 (fresh frozen).

    "Human Breast Cancer (Block A Section 1)", Space Ranger 1.1.0, 10x Genomics (2020),
    https://www.10xgenomics.com/datasets. Licence CC BY 4.0: cite 10x Genomics and the data set's page. The
    originals are at ``https://cf.10xgenomics.com/samples/spatial-exp/1.1.0/V1_Breast_Cancer_Block_A_Section_1/``
    (``V1_Breast_Cancer_Block_A_Section_1_filtered_feature_bc_matrix.h5``, ``..._spatial.tar.gz``,
    ``..._image.tif``); omx fetches the same files from the scverse mirror ``exampledata.scverse.org``, where
    squidpy's registry pins their sha256.

    Parameters
    ----------
    {visium_reader}

    Returns
    -------
    SpatialData as :func:`spatialdata_io.visium` reads it, with ``dataset_id="visium_breast_block_a"``: images
    ``"visium_breast_block_a_full_image"`` (with ``fullres_image``), ``"..._hires_image"`` and
    ``"..._lowres_image"``, circles ``"visium_breast_block_a"`` and the counts in ``tables["table"]``.
    """
    return _read("visium_breast_block_a", path, fullres_image, progressbar)
