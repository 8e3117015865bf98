"""One registry of the public data sets omx can fetch: files, pinned checksums, licences, citations.

Every file has a URL, a ``sha256`` taken from a source named in its data set's ``hash_source`` and a size in bytes
(or None where no trustworthy size is known; `fetch` then asks the server before downloading). Files go to
``data_dir() / <name> /`` and are checked against their hash with pooch; a file already there with the right hash
is used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omx._docs import doc_params
from omx._utils import file_sha256, logger

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DATA_ENV_VAR", "Dataset", "RemoteFile", "data_dir", "fetch", "registry"]

#: Environment variable naming the folder that holds one sub-folder per downloaded data set.
DATA_ENV_VAR = "OMX_DATA_DIR"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: where it goes, where it comes from, its checksum and size."""

    path: str  #: relative path inside the data set's folder, with ``/``
    url: str
    sha256: str  #: 64 hex digits
    size: int | None  #: bytes; None where unknown
    size_source: str  #: where ``size`` comes from


@dataclass(frozen=True)
class Dataset:
    """A public data set: what it is, its licence and citation, and its files."""

    name: str
    description: str
    licence: str
    citation: str
    homepage: str
    hash_source: str  #: where the checksums come from
    files: tuple[RemoteFile, ...] = field(default_factory=tuple)

    def file(self, path: str) -> RemoteFile:
        """Return the file at relative ``path``."""
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"{self.name} has no file {path!r}; its files are {[f.path for f in self.files]}.")


# ------------------------------------------------------------------------------------------------------- her2st
HER2ST_CITATION = (
    "Andersson, A. et al. Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated "
    "cell type interactions. Nat Commun 12, 6012 (2021). https://doi.org/10.1038/s41467-021-26271-2"
)
_HER2ST_RAW = "https://github.com/almaan/her2st/raw"
# Commits of github.com/almaan/her2st at which each file was stored (a commit pins the bytes behind the URL).
_HER2ST_COMMIT_DATA = "9f2260c6aa8347996955d53f0a5f06ac14c93470"  # spotfiles, images, pathologist labels
_HER2ST_COMMIT_COUNTS = "e75e5c53a994726a8ad251aaf653a02d7932eb6a"  # data/ST-cnts
_HER2ST_COMMIT_CLUSTERS = "5ef75b9530d59eff0965ad104672e75a7f0e2023"  # res/ST-cluster/lbl
_HER2ST_COMMIT_MOTIVATION = "47b2e34be3bacfb7564095859c6a6003c26765d9"  # res/ST-cluster/motivation.csv
_HER2ST_SIZE_SOURCE = "exact: bytes of a local copy of the repository file, measured when its sha256 was taken"

# (relative path, commit, sha256, bytes): sha256 and bytes measured on copies of the repository files; text files
# also checked against the repository's stored text (same length and content).
_HER2ST_FILES = (
    ("data/ST-cnts/A1.tsv.gz", _HER2ST_COMMIT_COUNTS,
     "d91035e5d8a9c4ce7865e4c61446deec1a7318602d41b3220e9fcb3ce7e41fe3", 1033376),
    ("data/ST-cnts/B4.tsv.gz", _HER2ST_COMMIT_COUNTS,
     "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb", 563881),
    ("data/ST-cnts/C2.tsv.gz", _HER2ST_COMMIT_COUNTS,
     "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d", 821408),
    ("data/ST-cnts/C3.tsv.gz", _HER2ST_COMMIT_COUNTS,
     "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a", 847901),
    ("data/ST-cnts/C4.tsv.gz", _HER2ST_COMMIT_COUNTS,
     "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da", 886246),
    ("data/ST-spotfiles/A1_selection.tsv", _HER2ST_COMMIT_DATA,
     "e5f79223be2ea2aebb082c4759059ab7079b0132052d0944209048ac57788c5d", 12879),
    ("data/ST-spotfiles/B4_selection.tsv", _HER2ST_COMMIT_DATA,
     "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0", 10560),
    ("data/ST-spotfiles/C2_selection.tsv", _HER2ST_COMMIT_DATA,
     "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c", 7053),
    ("data/ST-spotfiles/C3_selection.tsv", _HER2ST_COMMIT_DATA,
     "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755", 6728),
    ("data/ST-spotfiles/C4_selection.tsv", _HER2ST_COMMIT_DATA,
     "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c", 6960),
    ("data/ST-imgs/B/B4/BT10737_D2_HE.jpg", _HER2ST_COMMIT_DATA,
     "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d", 4076552),
    ("data/ST-imgs/C/C2/5714_HE_BT_C2.jpg", _HER2ST_COMMIT_DATA,
     "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e", 3990230),
    ("data/ST-imgs/C/C3/5714_HE_BT_D1.jpg", _HER2ST_COMMIT_DATA,
     "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568", 3915842),
    ("data/ST-imgs/C/C4/5714_HE_BT_D2.jpg", _HER2ST_COMMIT_DATA,
     "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2", 3806070),
    ("data/ST-pat/lbl/A1_labeled_coordinates.tsv", _HER2ST_COMMIT_DATA,
     "23a0a68dccd54a8397ea4066994edb7110e88373d5b3bc6e35254dda9253fa5f", 22117),
    ("res/ST-cluster/lbl/A1-cluster-annotation.tsv.gz", _HER2ST_COMMIT_CLUSTERS,
     "c23fcfc84336e7ae625ab74976721c26051451d5345bd2e248b440033fa87542", 5849),
    ("res/ST-cluster/lbl/B4-cluster-annotation.tsv.gz", _HER2ST_COMMIT_CLUSTERS,
     "ea7ce6d9630921a9b0d03178988192b7c71baec19eb183ebdfdb991e47d690e4", 5245),
    ("res/ST-cluster/lbl/C2-cluster-annotation.tsv.gz", _HER2ST_COMMIT_CLUSTERS,
     "3211500325b1be1cd2be7480f2b094a48647fc25df4d8fe6afb8c48c15650ece", 4389),
    ("res/ST-cluster/lbl/C3-cluster-annotation.tsv.gz", _HER2ST_COMMIT_CLUSTERS,
     "a1522a14855bc2022ccbb9ea9cbae59837cbcd310bc4c02727ae6bfa37e6d369", 4336),
    ("res/ST-cluster/lbl/C4-cluster-annotation.tsv.gz", _HER2ST_COMMIT_CLUSTERS,
     "a5cc7a3a40983a21ea8400145c80a7dc5b13e7468b987ec0610f4c2123978c71", 4379),
    ("res/ST-cluster/motivation.csv", _HER2ST_COMMIT_MOTIVATION,
     "b7701748b5de40e63771f032a864b5812f9b2aa638459db2257af4ac519f8234", 13088),
)  # fmt: skip

HER2ST = Dataset(
    name="her2st",
    description=(
        "HER2-positive breast tumours, Spatial Transcriptomics (ST v1, 100 um spots): counts, spot files, "
        "full-resolution H&E images and published annotations of sections A1, B4, C2, C3 and C4 of the 36 "
        "(A1 without an image: its full-resolution scan has no pinned checksum here)."
    ),
    licence="CC BY 4.0",
    citation=HER2ST_CITATION,
    homepage="https://github.com/almaan/her2st",
    hash_source=(
        "sha256 of copies of the repository files (github.com/almaan/her2st at the commits in the URLs), taken "
        "by the omx developers; text files compared with the repository's text"
    ),
    files=tuple(
        RemoteFile(path, f"{_HER2ST_RAW}/{commit}/{path}", sha, size, _HER2ST_SIZE_SOURCE)
        for path, commit, sha, size in _HER2ST_FILES
    ),
)

# ----------------------------------------------------------------------------------------------------- 10x Visium
_SCVERSE_MIRROR = "https://exampledata.scverse.org/squidpy/10x_genomics"
_10X_HASH_SOURCE = (
    "squidpy 1.8.2's dataset registry (squidpy/datasets/datasets.yaml), which pins these files on the scverse "
    "mirror exampledata.scverse.org"
)
_10X_SIZE_SOURCE = "unknown: not in squidpy's registry and not measured here; fetch asks the server"
_10X_LICENCE = "CC BY 4.0"


def _visium(sample: str, shas: Mapping[str, str]) -> tuple[RemoteFile, ...]:
    """The three files of a 10x Visium sample on the scverse mirror, stored without the sample prefix."""
    return tuple(
        RemoteFile(local, f"{_SCVERSE_MIRROR}/{sample}/{sample}_{local}", sha, None, _10X_SIZE_SOURCE)
        for local, sha in shas.items()
    )


VISIUM_BREAST_FFPE = Dataset(
    name="visium_breast_ffpe",
    description=(
        "10x Genomics Visium (FFPE) 'Human Breast Cancer: Ductal Carcinoma In Situ, Invasive Carcinoma', Space "
        "Ranger 1.3.0: filtered counts, spatial folder and the full-resolution H&E image. Original files at "
        "https://cf.10xgenomics.com/samples/spatial-exp/1.3.0/Visium_FFPE_Human_Breast_Cancer/"
    ),
    licence=_10X_LICENCE,
    citation=(
        "10x Genomics. Human Breast Cancer: Ductal Carcinoma In Situ, Invasive Carcinoma (FFPE), Spatial Gene "
        "Expression dataset analyzed using Space Ranger 1.3.0 (2021). https://www.10xgenomics.com/datasets"
    ),
    homepage=(
        "https://www.10xgenomics.com/datasets/"
        "human-breast-cancer-ductal-carcinoma-in-situ-invasive-carcinoma-ffpe-1-standard-1-3-0"
    ),
    hash_source=_10X_HASH_SOURCE,
    files=_visium(
        "Visium_FFPE_Human_Breast_Cancer",
        {
            "filtered_feature_bc_matrix.h5": "64321f603f7200b0bedffbe353c04dde72bbe7c7be7390e503d955aa9b2584c5",
            "spatial.tar.gz": "2937fcc44b7adee70f162a9e09857410dcf22eed89a3e3187950dfc1574fea14",
            "image.tif": "b3fbbdb5006769ef7d2b614171e208b6caf901bde52272a02da6e3d019626ce0",
        },
    ),
)

VISIUM_BREAST_BLOCK_A = Dataset(
    name="visium_breast_block_a",
    description=(
        "10x Genomics Visium (fresh frozen) 'Human Breast Cancer (Block A Section 1)', Space Ranger 1.1.0: "
        "filtered counts, spatial folder and the full-resolution H&E image. Original files at "
        "https://cf.10xgenomics.com/samples/spatial-exp/1.1.0/V1_Breast_Cancer_Block_A_Section_1/"
    ),
    licence=_10X_LICENCE,
    citation=(
        "10x Genomics. Human Breast Cancer (Block A Section 1), Spatial Gene Expression dataset analyzed using "
        "Space Ranger 1.1.0 (2020). https://www.10xgenomics.com/datasets"
    ),
    homepage="https://www.10xgenomics.com/datasets/human-breast-cancer-block-a-section-1-1-standard-1-1-0",
    hash_source=_10X_HASH_SOURCE,
    files=_visium(
        "V1_Breast_Cancer_Block_A_Section_1",
        {
            "filtered_feature_bc_matrix.h5": "b3cbb6ead60afad848ebcc07a34835613d9d2d79e416ad8300b210d9de584b65",
            "spatial.tar.gz": "415530a9d31172f63fd358d5d1cefb0798698ef9c0e614f52825894cd45c61bf",
            "image.tif": "73a94ca956d1b5c027dcaf1ac42c15fed4d4a12eefee4b4b597e62f34cc5959e",
        },
    ),
)

#: Every data set omx can fetch, by name.
DATASETS: dict[str, Dataset] = {d.name: d for d in (HER2ST, VISIUM_BREAST_FFPE, VISIUM_BREAST_BLOCK_A)}


# -------------------------------------------------------------------------------------------------------- helpers
def get_dataset(name: str) -> Dataset:
    """Return the registered data set ``name``; the error names those that exist."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"No data set {name!r} in the omx registry; known: {sorted(DATASETS)}.") from None


def data_dir() -> Path:
    """Return the folder that holds omx's downloaded data sets, one sub-folder each.

    ``$OMX_DATA_DIR`` when set, else the user cache folder of pooch (``pooch.os_cache("omx")``, e.g.
    ``~/.cache/omx`` on Linux).

    Returns
    -------
    The folder (not created here).
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("omx"))


def registry(name: str | None = None) -> pd.DataFrame:
    """List the public data sets omx can download, one row per file.

    Parameters
    ----------
    name
        Only this data set; None lists all.

    Returns
    -------
    DataFrame with columns ``dataset``, ``file`` (path inside the data set's folder), ``size`` (bytes; missing where
    unknown), ``sha256``, ``url``, ``licence``, ``citation`` and ``local`` (where `fetch` puts the file).
    """
    import pandas as pd

    datasets = [get_dataset(name)] if name is not None else list(DATASETS.values())
    root = data_dir()
    rows = [
        {
            "dataset": d.name,
            "file": f.path,
            "size": f.size,
            "sha256": f.sha256,
            "url": f.url,
            "licence": d.licence,
            "citation": d.citation,
            "local": str(root / d.name / f.path),
        }
        for d in datasets
        for f in d.files
    ]
    df = pd.DataFrame(rows, columns=["dataset", "file", "size", "sha256", "url", "licence", "citation", "local"])
    df["size"] = df["size"].astype("Int64")
    return df


def format_size(n_bytes: float | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units); None -> ``"size unknown"``."""
    if n_bytes is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError  # pragma: no cover


def _remote_size(url: str, timeout: float) -> int | None:
    """Content-Length the server announces for ``url``, or None (no answer, no header)."""
    import requests

    try:
        response = requests.head(url, allow_redirects=True, timeout=timeout)
        return int(response.headers["Content-Length"]) if response.ok else None
    except (OSError, KeyError, ValueError):  # requests' errors are OSErrors
        return None


def _place_hint(missing: Iterable[tuple[RemoteFile, Path]]) -> str:
    lines = [f"  {f.url}\n    -> {target}" for f, target in missing]
    return (
        "Download these files elsewhere and place each at the path given (the checksum is checked, the name must "
        "match):\n" + "\n".join(lines) + f"\nSet ${DATA_ENV_VAR} to keep omx's data in another folder "
        f"(now {data_dir()})."
    )


@doc_params()
def fetch(
    name: str,
    files: str | Iterable[str] | None = None,
    *,
    path: str | Path | None = None,
    progressbar: bool = True,
    timeout: float = 60.0,
) -> dict[str, Path]:
    """Download files of a registered data set (those not already there) and check their sha256.

    Before downloading, logs which files are missing and their total size. A file already in place with the pinned
    checksum is used as it is; one with another checksum is downloaded again (with a warning naming it).

    Parameters
    ----------
    name
        Data set, a name listed by `omx.datasets.registry`.
    files
        Paths of files inside the data set (column ``file`` of `omx.datasets.registry`); None fetches all.
    path
        Folder of the data set; None uses ``data_dir() / name`` (``$OMX_DATA_DIR/<name>`` when that is set).
    {progressbar}
    {timeout}

    Returns
    -------
    Local path of each requested file, by its path inside the data set.

    Raises
    ------
    ConnectionError
        A download failed (no network, HTTP error): the message lists each missing file's URL and the exact path to
        place it at.
    ValueError
        A downloaded file does not match its pinned checksum (it is deleted).
    """
    import pooch

    dataset = get_dataset(name)
    if files is None:
        wanted = list(dataset.files)
    else:
        wanted = [dataset.file(f) for f in ([files] if isinstance(files, str) else files)]
    folder = Path(path).expanduser() if path is not None else data_dir() / name

    out: dict[str, Path] = {}
    missing: list[tuple[RemoteFile, Path]] = []
    for f in wanted:
        target = folder / f.path
        out[f.path] = target
        if target.is_file():
            found = file_sha256(target)
            if found == f.sha256:
                continue
            logger.warning(
                f"{target} has sha256 {found}, not the pinned {f.sha256} of {name}/{f.path} (a changed, partial "
                "or other file); downloading it again."
            )
        missing.append((f, target))
    if not missing:
        logger.debug(f"{name}: all {len(wanted)} requested files are in {folder} with their pinned checksums.")
        return out

    sizes = [f.size if f.size is not None else _remote_size(f.url, min(timeout, 10.0)) for f, _ in missing]
    known = sum(s for s in sizes if s is not None)
    unknown = sum(s is None for s in sizes)
    if unknown == len(sizes):
        total = "sizes unknown: the server did not say"
    else:
        total = format_size(known) + (f" and {unknown} of unknown size" if unknown else "")
    listing = "\n".join(f"  {f.path} ({format_size(s)}) from {f.url}" for (f, _), s in zip(missing, sizes, strict=True))
    logger.info(
        f"Downloading {len(missing)} file{'s' if len(missing) > 1 else ''} ({total}) of {name} to {folder}:\n"
        f"{listing}\nLicence {dataset.licence}; cite: {dataset.citation}"
    )
    downloader = pooch.HTTPDownloader(progressbar=progressbar, timeout=timeout)
    for i, (f, target) in enumerate(missing):
        try:
            pooch.retrieve(
                f.url,
                known_hash=f"sha256:{f.sha256}",
                fname=target.name,
                path=target.parent,
                downloader=downloader,
            )
        except ValueError as err:  # pooch: the downloaded file's hash is not the pinned one
            raise ValueError(
                f"{name}/{f.path} downloaded from {f.url} does not match its pinned sha256 {f.sha256}; it was "
                f"deleted. The file on the server changed or the download was corrupted: {err}"
            ) from err
        except OSError as err:  # requests' errors (no network, HTTP errors, time-outs) are OSErrors
            stale = [t for _, t in missing[i:] if t.is_file()]
            note = (
                "\nAlready there but with another checksum (replace them): " + ", ".join(map(str, stale))
                if stale
                else ""
            )
            raise ConnectionError(
                f"Could not download {f.url}: {err}\n{len(missing) - i} file(s) of {name} are missing. "
                f"{_place_hint(missing[i:])}{note}"
            ) from err
    logger.info(f"{name} is in {folder}. Licence {dataset.licence}; cite: {dataset.citation}")
    return out
