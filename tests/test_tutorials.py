"""The tutorials run from top to bottom (in a copy: the committed notebooks keep their outputs)."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
NEEDS_HER2ST = {"her2st_models"}  # the others use the packaged sample


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, request):
    from nbclient import NotebookClient

    if path.stem in NEEDS_HER2ST:
        request.getfixturevalue("her2st_dir")  # skips, with the reason, when the data are absent
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
