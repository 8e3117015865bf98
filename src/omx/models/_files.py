"""The folder a saved model lives in: how `Model.save` writes it and what `Model.load` checks before trusting it.

A model folder holds ``params.json`` and one weights file. ``params.json`` records the layout's `FORMAT`, the omx
version that wrote it, the model's class, parameters and fitted state, and the byte size and sha256 of every weights
file (``files``). Saving writes everything under temporary names in the folder and moves it into place,
``params.json`` last, so that a save cut short never leaves a folder that loads. Loading checks the format, the
sizes and the checksums, and reads arrays without pickle (numpy ``allow_pickle=False``, torch ``weights_only=True``);
every problem is a `ModelFileError` that names the file, what is wrong and what to do.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from omx._settings import warn
from omx._utils import file_sha256

if TYPE_CHECKING:
    from collections.abc import Callable

PARAMS_FILE = "params.json"
#: Version of the model-folder layout that this omx writes, and the newest it reads. 0: folders written before omx
#: recorded it (no ``format``, no ``files``), loaded without checksums; 1: ``format`` and ``files`` (the byte size
#: and sha256 of every weights file). Raise it when a change would make an older omx misread a new folder.
FORMAT = 1
#: Entries of ``params.json`` that every format has, and their JSON types.
_ENTRIES = {"class": str, "init_params": dict, "state": dict, "history": dict, "weights": str}
_RESAVE = "Save the model again, or copy the whole folder again from where it was saved."


class ModelFileError(ValueError):
    """A saved model that cannot be loaded: a damaged, truncated, foreign or too new model folder.

    The message names the file, what is wrong with it and what to do.
    """


# ---------------------------------------------------------------------------------------------------- writing
def write_model_folder(path: Path, meta: dict[str, Any], writers: dict[str, Callable[[Path], None]]) -> None:
    """Write ``params.json`` (`meta` with `FORMAT` and the ``files`` entry) and the files `writers` make.

    ``writers[name](file)`` writes the file that ends up as ``path / name``. Every file is written under a temporary
    name in `path` and moved into place afterwards, ``params.json`` last; the ``params.json`` of a model saved there
    before is removed first, so that until the last move the folder holds no model rather than a mixed one.
    """
    json.dumps(meta)  # fails before anything is written when a value is not JSON-able
    previous = _listed_files(path / PARAMS_FILE)
    temps: dict[str, Path] = {}
    try:
        files = {}
        for name, write in writers.items():
            temps[name] = _temporary(path, name)
            write(temps[name])
            files[name] = {"size": temps[name].stat().st_size, "sha256": file_sha256(temps[name])}
        temps[PARAMS_FILE] = _temporary(path, PARAMS_FILE)
        with open(temps[PARAMS_FILE], "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, **meta, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        (path / PARAMS_FILE).unlink(missing_ok=True)
        for name in writers:
            os.replace(temps.pop(name), path / name)
        os.replace(temps.pop(PARAMS_FILE), path / PARAMS_FILE)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    for name in previous - set(writers):  # weights of the model saved there before, under another name
        (path / name).unlink(missing_ok=True)


def _temporary(folder: Path, name: str) -> Path:
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(temp)


def _listed_files(params: Path) -> set[str]:
    """The weights files that an existing ``params.json`` names (none when it is absent or unreadable)."""
    try:
        meta = json.loads(params.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(meta, dict):
        return set()
    names = {meta.get("weights"), *(meta.get("files") or {})}
    return {name for name in names if isinstance(name, str) and _is_plain_name(name)}


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


# ---------------------------------------------------------------------------------------------------- reading
def read_params(path: Path) -> dict[str, Any]:
    """Read and check the ``params.json`` of the model folder `path`; ``meta["format"]`` is set (0 for old ones)."""
    from omx import __version__

    file = path / PARAMS_FILE
    if not file.is_file():
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass the folder written by `model.save(path)`.")
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} is a file; pass the folder written by `model.save(path)`, not a file in it."
            )
        cut_short = (
            " A save into it was cut short before it finished: save the model again."
            if any(path.glob(".*.tmp"))
            else ""
        )
        raise FileNotFoundError(
            f"No {PARAMS_FILE} in {path}, so it holds no saved model.{cut_short} Pass the folder written by "
            "`model.save(path)`."
        )
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{file} is not valid JSON ({err}): it is damaged (a copy or save cut short) or not an omx model's. "
            f"{_RESAVE}"
        ) from err
    if not isinstance(meta, dict) or not ("class" in meta or "format" in meta):
        got = f"keys {sorted(meta)[:8]}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ModelFileError(
            f"{file} is not the {PARAMS_FILE} of an omx model: it has no 'class' or 'format' entry (it holds {got}). "
            "Pass a folder written by `model.save(path)`."
        )
    written_by = meta.get("omx_version")
    form = meta.setdefault("format", 0)
    if not isinstance(form, int) or isinstance(form, bool) or form < 0:
        raise ModelFileError(f"{file} has format {form!r}, which is not a format version (an integer >= 0). {_RESAVE}")
    if form > FORMAT:
        raise ModelFileError(
            f"{file} was written by omx {written_by} in model-file format {form}, but this omx ({__version__}) reads "
            f"formats up to {FORMAT}. Upgrade omx (`pip install -U omx`) to load it."
        )
    entries = {**_ENTRIES, **({"files": dict} if form >= 1 else {})}
    if missing := [key for key in entries if key not in meta]:
        raise ModelFileError(
            f"{file} lacks the entries {missing} of an omx model's {PARAMS_FILE}: it is damaged or was not written "
            f"by `model.save`. {_RESAVE}"
        )
    if wrong := [f"{k} ({type(meta[k]).__name__})" for k, kind in entries.items() if not isinstance(meta[k], kind)]:
        raise ModelFileError(f"{file} has entries of the wrong type: {wrong}. It is damaged. {_RESAVE}")
    if not _is_plain_name(meta["weights"]):
        raise ModelFileError(
            f"{file} names {meta['weights']!r} as its weights, which is not a file in {path}; omx reads only the "
            f"model's own folder. {_RESAVE}"
        )
    return meta


def check_files(path: Path, meta: dict[str, Any]) -> Path:
    """Check that the weights file is there and, from format 1 on, its size and sha256; return its path."""
    params = path / PARAMS_FILE
    weights = path / meta["weights"]
    if not weights.is_file():
        raise ModelFileError(
            f"{weights} is missing; {params} names it as the model's weights. Copy the whole folder {path} again "
            "(the weights file with params.json), or save the model again."
        )
    if meta["format"] == 0:
        return weights  # written before omx recorded sizes and checksums
    files = meta["files"]
    if meta["weights"] not in files:
        raise ModelFileError(f"{params} records no size and sha256 for {meta['weights']}; it is damaged. {_RESAVE}")
    for name, record in files.items():
        file = path / name
        if not (
            _is_plain_name(name)
            and isinstance(record, dict)
            and isinstance(record.get("size"), int)
            and isinstance(record.get("sha256"), str)
        ):
            raise ModelFileError(f"{params} has a damaged entry for {name!r} in 'files': {record!r}. {_RESAVE}")
        if not file.is_file():
            raise ModelFileError(f"{file} is missing; {params} lists it. {_RESAVE}")
        size, expected = file.stat().st_size, record["size"]
        if size != expected:
            how = "truncated (a copy or download cut short)" if size < expected else "longer than when it was saved"
            raise ModelFileError(
                f"{file} is {size:,} bytes, but {params} recorded {expected:,}: it is {how}. {_RESAVE}"
            )
        if (digest := file_sha256(file)) != record["sha256"]:
            raise ModelFileError(
                f"{file} is corrupt: its sha256 ({digest[:16]}...) is not the one {params} recorded "
                f"({record['sha256'][:16]}...), although its size is right. {_RESAVE}"
            )
    return weights


def read_npz(file: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, refusing object arrays (pickled Python objects) and anything but arrays."""
    never = "which omx never loads: unpickling can run any code"
    with open(file, "rb") as f:  # closed here even when numpy fails on a damaged file
        try:
            data = np.load(f, allow_pickle=False)
        except ValueError as err:
            if "pickle" not in str(err):
                raise
            raise ModelFileError(f"{file} is a pickle file, not an .npz archive of arrays, {never}. {_RESAVE}") from err
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ModelFileError(f"{file} is a single .npy array, not the .npz archive of an omx model. {_RESAVE}")
        with data:
            return _read_arrays(file, data, never)


def _read_arrays(file: Path, data: np.lib.npyio.NpzFile, never: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name in data.files:
        try:
            value = data[name]
        except ValueError as err:
            if "pickle" not in str(err):
                raise
            raise ModelFileError(
                f"{file} holds {name!r} as an object array (pickled Python objects), {never}. An omx model's "
                "weights are plain numeric arrays; save the model again with omx."
            ) from err
        if not isinstance(value, np.ndarray):
            raise ModelFileError(f"{file} holds {name!r}, which is not a .npy array. {_RESAVE}")
        arrays[name] = value
    return arrays


def version_tuple(version: Any) -> tuple[int, ...] | None:
    """The release numbers of a version string (``"0.2.1.dev3+g12ab"`` -> ``(0, 2, 1)``); None when it has none."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version) if isinstance(version, str) else None
    if match is None:
        return None
    numbers = tuple(int(n) for n in match.group(1).split("."))
    while len(numbers) > 1 and numbers[-1] == 0:  # 1.0 == 1.0.0
        numbers = numbers[:-1]
    return numbers


def written_by_newer(meta: dict[str, Any]) -> bool:
    """Whether the omx version that wrote `meta` is newer than the installed one (False when either is unknown)."""
    from omx import __version__

    saved, installed = version_tuple(meta.get("omx_version")), version_tuple(__version__)
    return saved is not None and installed is not None and saved > installed


def warn_if_newer(path: Path, meta: dict[str, Any]) -> None:
    """Warn that a model written by a newer omx (of a format this one reads) was loaded."""
    from omx import __version__

    if written_by_newer(meta):
        warn(
            f"{path / PARAMS_FILE} was written by omx {meta['omx_version']}, newer than this omx ({__version__}). It "
            "loaded, but a newer omx may have saved something this one reads differently; upgrade omx "
            "(`pip install -U omx`) to be sure."
        )
