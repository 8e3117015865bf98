import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]
#: Declared for code that other changes bring in; each entry goes once the source imports it (the test says so).
PENDING: dict[str, str] = {}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_distributions() -> dict[str, set[str]]:
    """Distribution -> source files of omx that import one of its modules (also inside functions)."""
    dists = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "omx").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "omx" or top in sys.stdlib_module_names or top == "__future__":
                    continue
                for dist in dists.get(top, [top]):
                    found.setdefault(_canonical(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def test_declared_dependencies_are_the_imported_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_canonical(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) for req in project["dependencies"]}
    imported = _imported_distributions()
    unused = declared - set(imported) - set(PENDING)
    assert not unused, f"declared in pyproject.toml but imported nowhere in src/omx: {sorted(unused)}"
    undeclared = {d: sorted(f)[:3] for d, f in imported.items() if d not in declared}
    assert not undeclared, f"imported by src/omx but not declared in pyproject.toml: {undeclared}"
    arrived = {d: sorted(imported[d])[:3] for d in PENDING if d in imported}
    assert not arrived, f"now imported, remove from PENDING in tests/test_package.py: {arrived}"


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
