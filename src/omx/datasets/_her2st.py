"""The her2st study (Andersson et al., Nat Commun 12, 6012, 2021): find, read and download it (with pooch)."""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omx._docs import doc_params
from omx._settings import OmxWarning
from omx._utils import logger
from omx.datasets._registry import HER2ST, HER2ST_CITATION, data_dir, fetch
from omx.io import read_st

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["download_her2st", "her2st", "her2st_genes"]

#: Environment variable that points at a local copy of the study.
ENV_VAR = "OMX_HER2ST_DIR"

CITATION = HER2ST_CITATION
GITHUB_URL = "https://github.com/almaan/her2st"
ARCHIVE_URL = "https://github.com/almaan/her2st/archive/refs/heads/master.zip"
ZENODO_DOI = "10.5281/zenodo.4751624"

_GENES_FILE = "genes_785.txt"
_ARCHIVE = "her2st.zip"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_SAMPLE_DIR = Path(__file__).resolve().parent / "_data" / "her2st_sample"

_WHERE = (
    f"Put the study (folders data/ST-cnts, data/ST-spotfiles, data/ST-imgs) in a folder and pass it as `path=`, "
    f"set the environment variable {ENV_VAR} to it, or place it at ../shared/data/her2st or $OMX_DATA_DIR/her2st. "
    f"`omx.datasets.download_her2st()` fetches sections B4, C2, C3 and C4 there with pinned checksums; the whole "
    f"study is at {GITHUB_URL} (or Zenodo, doi {ZENODO_DOI}). Cite: {CITATION}"
)


def _is_study(path: Path) -> bool:
    return (path / "data" / "ST-cnts").is_dir()


def _find_her2st_dir(path: str | Path | None = None) -> Path | None:
    """Return the her2st folder.

    ``path``, then ``$OMX_HER2ST_DIR``, then ``shared/data/her2st`` above the working folder or the repository, then
    the folder `download_her2st` fills by default (``$OMX_DATA_DIR/her2st`` or omx's cache folder).
    """
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
    downloaded = data_dir() / HER2ST.name
    return downloaded if _is_study(downloaded) else None


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
        ``shared/data/her2st`` in the current folder and its parents, then beside the omx source tree, then in the
        folder `download_her2st` fills by default (``$OMX_DATA_DIR/her2st``).
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


def _registered_sections() -> dict[str, list[str]]:
    """Registry files of each her2st section (plus the shared cluster names), by section."""
    out: dict[str, list[str]] = {}
    shared = [f.path for f in HER2ST.files if not re.search(r"/[A-H]\d[-_/.]", f.path)]
    for f in HER2ST.files:
        m = re.search(r"/([A-H]\d)[-_/.]", f.path)
        if m:
            out.setdefault(m[1], list(shared)).append(f.path)
    return out


def _has_image(files: Sequence[str]) -> bool:
    return any(f.startswith("data/ST-imgs/") for f in files)


def download_her2st(
    dest: str | Path | None = None,
    *,
    sections: str | Sequence[str] | None = None,
    url: str | None = None,
    known_hash: str | None = None,
    timeout: float = 60.0,
    progressbar: bool = True,
) -> Path:
    """Download sections of the her2st study with pinned checksums and return the folder to pass to `her2st`.

    Each file (counts, spot file, full-resolution H&E image, published cluster labels and, for A1, pathologist
    labels) is fetched from the study's repository at a fixed commit, ``https://github.com/almaan/her2st/raw/
    <commit>/<path>``, through `omx.datasets.fetch`, and checked against its sha256; files already there with that
    checksum are not downloaded again. The log says which files are fetched and how big (about 5 MB a section).
    Without network the error lists each file's URL and where to put it.

    Sections with pinned checksums: B4, C2, C3, C4 and A1 (A1 without its image: put one at
    ``data/ST-imgs/A/A1/`` or ``app/www/imgs/A1_HE_image_dark.png`` to read it). The stereoscope proportions under
    ``res/ST-deconv`` are not included (the repository keeps them in another layout). For the other 31 sections,
    download the whole repository as a zip with ``url=`` (unpinned unless ``known_hash`` is given), or
    ``git clone https://github.com/almaan/her2st``; the data are also archived on Zenodo (doi 10.5281/zenodo.4751624)
    as password-protected zip files, the password given by the authors in https://github.com/almaan/her2st/issues/2.

    The 785-gene panel (``genes_785.txt``) is not part of the study: the copy packaged with omx is added.
    Licence CC BY 4.0; cite Andersson et al., Nat Commun 12, 6012 (2021).

    Parameters
    ----------
    dest
        Folder to download into (created if needed); None uses ``$OMX_DATA_DIR/her2st`` (or omx's cache folder),
        where `her2st` looks when no path is given.
    sections
        Sections to fetch; None fetches B4, C2, C3 and C4 (every section with a pinned image).
    url
        Instead of single files, download this zip archive of the whole repository (e.g.
        ``"https://github.com/almaan/her2st/archive/refs/heads/master.zip"``, several hundred MB), unzip it into
        ``dest`` and delete it; ``sections`` must then be None. An archive ``her2st.zip`` already in ``dest`` is used
        as it is, and a study already unpacked there is returned without a download.
    known_hash
        With ``url``: checksum of the archive, e.g. ``"sha256:..."``; a download that does not match raises a
        `ValueError` and is deleted. None checks nothing (GitHub builds a branch's archive on request, so its bytes
        may change; pooch logs the SHA256 of what it fetched, which can be passed here later).
    timeout
        Seconds to wait for the server.
    progressbar
        Show a progress bar per download.

    Returns
    -------
    Path of the study folder (the one holding ``data/ST-cnts``).
    """
    dest = Path(dest).expanduser() if dest is not None else data_dir() / HER2ST.name
    if url is not None:
        if sections is not None:
            raise ValueError("`sections=` fetches single files with pinned checksums; it cannot be used with `url=`.")
        return _download_archive(dest, url=url, known_hash=known_hash, timeout=timeout, progressbar=progressbar)
    if known_hash is not None:
        raise ValueError("`known_hash=` checks a whole archive given as `url=`; single files have pinned checksums.")

    available = _registered_sections()
    if sections is None:
        sections = [s for s, files in available.items() if _has_image(files)]
    sections = [sections] if isinstance(sections, str) else list(sections)
    unknown = [s for s in sections if s not in available]
    if unknown:
        raise ValueError(
            f"No pinned files for her2st section(s) {unknown}; sections with pinned checksums: {sorted(available)}. "
            f"For the others, pass the repository's archive as `url=` (see the docstring) or clone {GITHUB_URL}."
        )
    files = list(dict.fromkeys(f for s in sections for f in available[s]))
    fetch(HER2ST.name, files, path=dest, progressbar=progressbar, timeout=timeout)
    for s in sections:
        if not _has_image(available[s]):
            warnings.warn(
                f"her2st section {s} has no image with a pinned checksum: to read it, put its H&E image in "
                f"{dest / 'data' / 'ST-imgs' / s[0] / s}/ (full resolution) or at "
                f"{dest / 'app' / 'www' / 'imgs' / f'{s}_HE_image_dark.png'} (the repository's downscaled copy).",
                OmxWarning,
                stacklevel=2,
            )
    if not (dest / _GENES_FILE).is_file():
        shutil.copyfile(_SAMPLE_DIR / _GENES_FILE, dest / _GENES_FILE)
    return dest


def _download_archive(dest: Path, *, url: str, known_hash: str | None, timeout: float, progressbar: bool) -> Path:
    """Download and unzip a zip archive of the whole repository (no per-file checksums)."""
    import pooch

    for found in (dest, *dest.glob("*")):
        if _is_study(found):
            logger.info(f"her2st is already in {found}; nothing downloaded.")
            return found
    dest.mkdir(parents=True, exist_ok=True)
    logger.info(f"Downloading {url} to {dest / _ARCHIVE} (the whole repository: several hundred MB).")
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
