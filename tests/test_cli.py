"""The command line: logging, the checks before any work, and writes that a failure leaves no trace of."""

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import spatialdata as sd
import spatialdata._io.io_table as io_table

import omx
import omx.cli


def _root_state():
    root = logging.getLogger()
    return list(root.handlers), root.level


def test_help_leaves_logging_alone(capsys):
    before = _root_state(), logging.getLogger("omx").level
    with pytest.raises(SystemExit) as exit_info:
        omx.cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "--verbosity" in capsys.readouterr().out
    assert (_root_state(), logging.getLogger("omx").level) == before


@pytest.mark.parametrize(("flag", "level"), [("debug", logging.DEBUG), ("1", logging.WARNING), (None, logging.WARNING)])
def test_verbosity_applies_to_omx_only_while_the_command_runs(monkeypatch, flag, level):
    seen = {}

    def run(args):
        seen["omx"] = logging.getLogger("omx").level
        seen["root"] = _root_state()
        logging.getLogger("omx").info("running")
        return 0

    monkeypatch.setattr(omx.cli, "_run", run)
    before, omx_before = _root_state(), logging.getLogger("omx").level
    argv = ([] if flag is None else ["-v", flag]) + ["predict", "x.zarr", "--model", "m"]
    assert omx.cli.main(argv) == 0
    assert seen == {"omx": level, "root": before}  # the root logger is never configured
    assert _root_state() == before and logging.getLogger("omx").level == omx_before == omx.settings.verbosity.level


def test_bad_verbosity_is_refused(capsys):
    with pytest.raises(SystemExit):
        omx.cli.main(["-v", "loud", "demo"])
    assert "invalid choice: 'loud'" in capsys.readouterr().err


def test_a_real_command_leaves_the_root_logger_alone(saved, tmp_path, capsys):
    """`omx predict` on an object that already holds the table: it reads the object and refuses, logging intact."""
    sdata = omx.datasets.toy_sdata(n_spots=20, n_genes=5, n_sections=1, seed=0)
    path = tmp_path / "toy.zarr"
    sdata.write(path)
    before = _root_state()
    code = omx.cli.main(["-v", "info", "predict", str(path), "--model", str(saved / "model"), "--key-added", "table"])
    assert code == 2 and "already has a table 'table'" in capsys.readouterr().err
    assert _root_state() == before


# ------------------------------------------------------------------------------------------- outputs and recovery
def _main(*argv) -> int:
    return omx.cli.main([str(a) for a in argv])


def _snapshot(path: Path) -> dict[str, str]:
    """Every file and folder under ``path`` with the md5 of its bytes: equal snapshots, equal stores."""
    return {
        str(p.relative_to(path)): hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ridge saved to disk and a one-section store without predictions to predict into."""
    root = tmp_path_factory.mktemp("cli")
    train = omx.datasets.toy_sdata(n_spots=30, n_genes=5, n_sections=2, seed=0)
    omx.tl.fit_predict(train, train=["S1"], predict=["S2"], model="ridge", seed=0).save(root / "model")
    omx.datasets.toy_sdata(n_spots=30, n_genes=5, n_sections=1, seed=1).write(root / "store.zarr")
    return root


@pytest.fixture
def store(saved, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(saved / "store.zarr", path)
    return path


@pytest.mark.parametrize("case", ["missing", "file", "empty folder", "folder of other files"])
def test_predict_names_a_path_that_is_no_store(saved, tmp_path, capsys, case):
    path = tmp_path / "x.zarr"
    if case == "file":
        path.write_text("not a store")
    elif case != "missing":
        path.mkdir()
        if case == "folder of other files":
            (path / "notes.txt").write_text("")
    assert _main("predict", path, "--model", saved / "model") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "SpatialData .zarr store" in err and "Traceback" not in err


def test_predict_names_a_folder_that_is_no_model(store, tmp_path, capsys):
    assert _main("predict", store, "--model", tmp_path / "nothing") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nothing") in err and "model.save" in err


def _fail(*args, **kwargs):
    raise AssertionError("called before the outputs were checked")


@pytest.mark.parametrize("name", omx.cli.DEMO_FILES)
def test_demo_refuses_an_existing_output_before_any_work(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr(omx.datasets, "her2st_sample", _fail)
    monkeypatch.setattr(omx.tl, "fit_predict", _fail)
    existing = tmp_path / name
    if existing.suffix == ".png":
        existing.write_bytes(b"the user's plot")
    else:
        existing.mkdir()
        (existing / "zarr.json").write_text("{}")
    before = _snapshot(tmp_path)
    assert _main("demo", "--out", tmp_path) == 2
    assert name in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_demo_refuses_an_out_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(omx.datasets, "her2st_sample", _fail)
    (tmp_path / "out").write_text("")
    assert _main("demo", "--out", tmp_path / "out") == 2
    assert "is a file" in capsys.readouterr().err


def test_a_failed_demo_removes_what_it_wrote(tmp_path, monkeypatch):
    def half(png, *args, **kwargs):
        png.write_bytes(b"plot")
        raise RuntimeError("failed after the first plot")

    monkeypatch.setattr(omx.cli, "_demo", half)
    with pytest.raises(RuntimeError, match="first plot"):
        _main("demo", "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("")
    with pytest.raises(RuntimeError):
        _main("demo", "--out", tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine.txt"]


def _tables(path: Path) -> dict[str, str | None]:
    return {k: t.uns.get("omx_table") for k, t in sd.read_zarr(path).tables.items()}


def test_predict_twice_with_other_keys_and_a_table_key(saved, store):
    assert _main("predict", store, "--model", saved / "model") == 0
    assert _main("predict", store, "--model", saved / "model", "--key-added", "p2", "--table-key", "table") == 0
    assert _tables(store) == {"table": None, "omx_pred": "predictions", "p2": "predictions"}
    p2 = sd.read_zarr(store).tables["p2"]
    assert p2.uns["omx"]["p2"]["params"]["table_key"] == "table"


def test_predict_replaces_its_own_table_only_with_overwrite(saved, store, capsys):
    assert _main("predict", store, "--model", saved / "model") == 0
    inode = (store / "tables" / "omx_pred").stat().st_ino  # another once the folder is replaced
    before = _snapshot(store)
    assert _main("predict", store, "--model", saved / "model") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(store) == before
    assert _main("predict", store, "--model", saved / "model", "--overwrite") == 0
    assert "replaced the table 'omx_pred'" in capsys.readouterr().out
    assert (store / "tables" / "omx_pred").stat().st_ino != inode
    assert _tables(store) == {"table": None, "omx_pred": "predictions"}
    assert not list((store / "tables").glob(".*"))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(("key", "message"), [("table", "never replaced"), ("S1_spots", "(shapes)")])
def test_predict_never_replaces_an_element_omx_did_not_write(saved, store, capsys, key, message, overwrite):
    before = _snapshot(store)
    argv = ["predict", store, "--model", saved / "model", "--key-added", key] + ["--overwrite"] * overwrite
    assert _main(*argv) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(store) == before


def _crash_in_writer(monkeypatch, exc):
    """The table's arrays reach the disk, then the write stops (as a kill or a full disk would)."""
    real = io_table.write_adata

    def write(group, name, table):
        real(group, name, table)
        raise exc("stopped mid-write")

    monkeypatch.setattr(io_table, "write_adata", write)


def _crash_in_rename(monkeypatch, exc):
    """The table is written and registered under its temporary name; moving it into place fails."""
    real = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".omx-tmp-"):
            raise exc("stopped at the rename")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize(
    ("crash", "exc", "existing"),
    [
        (_crash_in_writer, RuntimeError, False),
        (_crash_in_writer, KeyboardInterrupt, True),
        (_crash_in_rename, OSError, True),
    ],
)
def test_a_failed_write_leaves_the_store_as_it_was(saved, store, monkeypatch, crash, exc, existing):
    argv = ["predict", store, "--model", saved / "model"] + ["--overwrite"] * existing
    if existing:
        assert _main(*argv) == 0
    before = _snapshot(store)
    with monkeypatch.context() as patch:
        crash(patch, exc)
        with pytest.raises(exc, match="stopped"):
            _main(*argv)
    assert _snapshot(store) == before
    assert _main(*argv) == 0
    assert _tables(store) == {"table": None, "omx_pred": "predictions"}


@pytest.mark.parametrize("registered", [False, True])
def test_an_orphan_of_a_killed_write_is_named_and_cleared_by_overwrite(saved, store, tmp_path, capsys, registered):
    """A killed writer leaves `tables/omx_pred` half written: unlisted in the metadata, or listed if re-consolidated."""
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    assert _main("predict", other, "--model", saved / "model") == 0
    orphan = store / "tables" / "omx_pred"
    shutil.copytree(other / "tables" / "omx_pred", orphan, ignore=shutil.ignore_patterns("obs", "var", "uns"))
    if registered:
        sd.read_zarr(store, selection=("shapes",)).write_consolidated_metadata()
    leftover = store / "tables" / ".omx-tmp-omx_pred-0123abcd"  # a hidden temporary table of a killed run
    shutil.copytree(other / "tables" / "omx_pred", leftover)
    capsys.readouterr()
    assert _main("predict", store, "--model", saved / "model") == 2
    err = capsys.readouterr().err
    assert f"{orphan} is not a readable table" in err and "--overwrite" in err and "Traceback" not in err
    assert _main("predict", store, "--model", saved / "model", "--overwrite") == 0
    assert _tables(store) == {"table": None, "omx_pred": "predictions"}
    assert not leftover.exists()


@pytest.mark.parametrize("key", ["bad/name", ".hidden"])
def test_predict_refuses_a_key_that_is_no_element_name(saved, store, capsys, key):
    assert _main("predict", store, "--model", saved / "model", "--key-added", key) == 2
    assert f"--key-added {key!r} is not a valid element name" in capsys.readouterr().err
