"""The command line configures omx's own logger only, and only while a command runs."""

import logging

import pytest

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


def test_a_real_command_leaves_the_root_logger_alone(tmp_path, capsys):
    """`omx predict` on an object that already holds the table: it reads the object and refuses, logging intact."""
    sdata = omx.datasets.toy_sdata(n_spots=20, n_genes=5, n_sections=1, seed=0)
    path = tmp_path / "toy.zarr"
    sdata.write(path)
    before = _root_state()
    code = omx.cli.main(["-v", "info", "predict", str(path), "--model", str(tmp_path), "--key-added", "table"])
    assert code == 2 and "already has a table 'table'" in capsys.readouterr().err
    assert _root_state() == before
