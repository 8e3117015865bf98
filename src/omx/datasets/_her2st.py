"""The her2st study (Andersson et al., Nat Commun 12, 6012, 2021): find, read and download it (with pooch)."""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omx._docs import doc_params
from omx._utils import logger
from omx.io import read_st

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["download_her2st", "her2st", "her2st_genes"]

#: Environment variable that points at a local copy of the study.
ENV_VAR = "OMX_HER2ST_DIR"

CITATION = (
    "Andersson, A. et al. Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated "
    "cell type interactions. Nat Commun 12, 6012 (2021). https://doi.org/10.1038/s41467-021-26271-2"
)
GITHUB_URL = "https://github.com/almaan/her2st"
ARCHIVE_URL = "https://github.com/almaan/her2st/archive/refs/heads/master.zip"
ZENODO_DOI = "10.5281/zenodo.4751624"

_GENES_FILE = "genes_785.txt"
_ARCHIVE = "her2st.zip"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_SAMPLE_DIR = Path(__file__).resolve().parent / "_data" / "her2st_sample"

_WHERE = (
    f"Put the study (folders data/ST-cnts, data/ST-spotfiles, data/ST-imgs) in a folder and pass it as `path=`, "
    f"set the environment variable {ENV_VAR} to it, or place it at ../shared/data/her2st. Get it from "
    f"{GITHUB_URL} (or Zenodo, doi {ZENODO_DOI}), e.g. with `omx.datasets.download_her2st(dest)`. "
    f"Cite: {CITATION}"
)


def _is_study(path: Path) -> bool:
    return (path / "data" / "ST-cnts").is_dir()


def _find_her2st_dir(path: str | Path | None = None) -> Path | None:
    """Return the her2st folder: ``path``, then ``$OMX_HER2ST_DIR``, then ``shared/data/her2st`` above cwd or repo."""
    if path is not None:
        path = Path(path).expanduser()
        if not _is_study(path):
            raise FileNotFoundError(f"{path} holds no her2st study (data/ST-cnts is missing). {_WHERE}")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        env_path = Path(env).expanduser()
        if not _is_study(env_path):
            raise FileNotFoundError(f"${ENV_VAR}={env} holds no her2st study (data/ST-cnts is missing). {_WHERE}")
        return env_path
    for start in (Path.cwd().resolve(), _REPO_ROOT):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data" / "her2st"
            if _is_study(candidate):
                return candidate
    return None


@doc_params()
def her2st(
    path: str | Path | None = None,
    sections: str | Sequence[str] | None = None,
    *,
    genes: Sequence[str] | None = None,
) -> SpatialData:
    """Read the her2st HER2-positive breast cancer ST study into one SpatialData.

    Andersson et al., Nat Commun 12, 6012 (2021), licence CC BY 4.0: cite the paper when you use the data.
    The layout of the result is that of `omx.io.read_st`.

    Parameters
    ----------
    path
        Folder of the study (the one that holds ``data/ST-cnts``). None looks at ``$OMX_HER2ST_DIR``, then for
        ``shared/data/her2st`` in the current folder and its parents, then beside the omx source tree.
    {sections}
    {genes_read}

    Returns
    -------
    SpatialData with an image ``"<S>_he"``, circles ``"<S>_spots"`` per section and one ``"table"``.
    """
    root = _find_her2st_dir(path)
    if root is None:
        raise FileNotFoundError(f"The her2st data were not found. {_WHERE}")
    logger.info(f"Reading her2st from {root}. Cite: {CITATION}")
    return read_st(root, sections, genes=genes)


def her2st_genes(path: str | Path | None = None) -> list[str]:
    """Return the 785-gene her2st panel predicted by HisToGene, Hist2ST, THItoGene, mclSTExp and others.

    Parameters
    ----------
    path
        Folder of the study holding ``genes_785.txt``; None looks for it like `her2st` and falls back to the
        copy packaged with omx.

    Returns
    -------
    Gene symbols in the file's order.
    """
    root = _find_her2st_dir(path)
    file = root / _GENES_FILE if root is not None else None
    if file is None or not file.is_file():
        if path is not None:
            raise FileNotFoundError(f"{path} has no {_GENES_FILE}.")
        file = _SAMPLE_DIR / _GENES_FILE
    return [g for g in (line.strip() for line in file.read_text().splitlines()) if g]


def download_her2st(
    dest: str | Path,
    *,
    url: str = ARCHIVE_URL,
    known_hash: str | None = None,
    timeout: float = 60.0,
    progressbar: bool = False,
) -> Path:
    """Download the her2st study from GitHub into ``dest`` and return the folder to pass to `her2st`.

    The archive is fetched with :func:`pooch.retrieve` (written to a temporary file and moved into place only when
    complete, checked against ``known_hash`` when one is given), unzipped and deleted. Steps (also the manual way,
    without this function):

    1. download ``https://github.com/almaan/her2st/archive/refs/heads/master.zip`` (several hundred MB:
       counts, spotfiles, images and results of the 36 sections) and unzip it;
    2. if the images under ``data/ST-imgs`` are small text files (git-lfs pointers), clone the repository
       with git-lfs instead: ``git clone https://github.com/almaan/her2st && git -C her2st lfs pull``;
    3. the same data are archived on Zenodo (doi 10.5281/zenodo.4751624) as password-protected zip files;
       the password is given by the authors in https://github.com/almaan/her2st/issues/2.

    The 785-gene panel (``genes_785.txt``) is not part of the study: the copy packaged with omx is added.
    Licence CC BY 4.0; cite Andersson et al., Nat Commun 12, 6012 (2021).

    Parameters
    ----------
    dest
        Folder to download into (created if needed). An archive ``her2st.zip`` already there is used as it is.
    url
        Address of the zip archive of the repository.
    known_hash
        Checksum of the archive, e.g. ``"sha256:..."`` (any form `pooch.retrieve` takes); a download that does not
        match it raises a `ValueError` and is deleted. None checks nothing: GitHub builds a branch's archive on
        request, so its bytes are not guaranteed to stay the same; pooch logs the SHA256 of what it fetched, which
        can be passed here to pin later downloads to the same archive.
    timeout
        Seconds to wait for the server.
    progressbar
        Show a download progress bar.

    Returns
    -------
    Path of the study folder (the one holding ``data/ST-cnts``).
    """
    import pooch

    dest = Path(dest).expanduser()
    for found in (dest, *dest.glob("*")):
        if _is_study(found):
            logger.info(f"her2st is already in {found}; nothing downloaded.")
            return found
    dest.mkdir(parents=True, exist_ok=True)
    logger.info(f"Downloading {url} to {dest / _ARCHIVE} (several hundred MB).")
    try:
        archive = pooch.retrieve(
            url,
            known_hash=known_hash,
            fname=_ARCHIVE,
            path=dest,
            downloader=pooch.HTTPDownloader(progressbar=progressbar, timeout=timeout),
        )
    except OSError as err:  # requests' errors (no network, HTTP errors, time-outs) are OSErrors
        raise ConnectionError(
            f"Could not download {url}: {err}. Download it by hand (or `git clone {GITHUB_URL}`), unzip it and "
            f"pass the folder holding data/ST-cnts to omx.datasets.her2st(path=...)."
        ) from err
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    Path(archive).unlink()
    root = next((p for p in (dest, *dest.glob("*")) if _is_study(p)), None)
    if root is None:
        raise FileNotFoundError(f"The archive from {url} holds no data/ST-cnts folder; see {GITHUB_URL}.")
    if not (root / _GENES_FILE).is_file():
        shutil.copyfile(_SAMPLE_DIR / _GENES_FILE, root / _GENES_FILE)
    logger.info(f"her2st is in {root}. Cite: {CITATION}")
    return root
