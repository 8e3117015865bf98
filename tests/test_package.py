import subprocess
import sys

import numpy as np

import omx


def test_import_does_not_import_torch():
    code = (
        "import sys, omx; omx.tl, omx.pp, omx.pl, omx.datasets, omx.metrics, omx.io, omx.models, omx.encoders; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version_and_submodules():
    assert isinstance(omx.__version__, str)
    assert set(dir(omx)) >= {"datasets", "pp", "tl", "pl", "metrics", "models", "encoders", "io"}


def test_cli_demo_runs_offline(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "omx.cli", "demo", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Held-out section C4" in out.stdout and "Pearson r" in out.stdout
    assert (tmp_path / "observed_vs_predicted.png").stat().st_size > 10_000
    assert (tmp_path / "her2st_sample_pred.zarr").is_dir()
    assert (tmp_path / "model" / "params.json").is_file()

    zarr_path = tmp_path / "her2st_sample_pred.zarr"
    cmd = [sys.executable, "-m", "omx.cli", "predict", str(zarr_path), "--model", str(tmp_path / "model")]
    out = subprocess.run([*cmd, "--shapes-key", "C4_spots", "--key-added", "c4_pred"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    import spatialdata as sd

    back = sd.read_zarr(zarr_path)
    pred, table = back.tables["c4_pred"], back.tables["table"]
    c4 = (table.obs["section"] == "C4").to_numpy()
    cols = table.var_names.get_indexer(pred.var_names)
    np.testing.assert_allclose(pred.X, table.layers["omx_pred"][c4][:, cols], rtol=1e-5)  # same model, same spots
    again = subprocess.run([*cmd, "--shapes-key", "C4_spots", "--key-added", "c4_pred"], capture_output=True, text=True)
    assert again.returncode == 2 and "already has a table" in again.stderr


def test_no_module_imports_another_subpackages_private_names():
    """Subpackages share through public names; a private name is its own subpackage's business."""
    import ast
    from pathlib import Path

    src = Path(omx.__file__).parent
    offences = []
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).parts
        home = parts[0] if len(parts) > 1 else None  # the subpackage of this file (None: a top-level module)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("omx."):
                continue
            target = node.module.split(".")[1]
            if target == home or target.startswith("_"):  # its own subpackage, or a shared top-level module
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private:
                offences.append(f"{path.relative_to(src)}: from {node.module} import {', '.join(private)}")
    assert not offences, "\n".join(offences)
