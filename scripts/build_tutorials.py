"""Build the tutorial notebooks from their cell sources and execute them, so they are committed with outputs.

python scripts/build_tutorials.py            # writes and runs tutorials/*.ipynb
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

QUICKSTART = [
    (
        "md",
        """# Quickstart: predict expression from H&E

This tutorial fits an image-to-expression model on two sections of the packaged her2st sample (HER2-positive
breast tumour, Spatial Transcriptomics; Andersson et al., *Nat Commun* 12, 6012 (2021), CC BY 4.0), predicts a
third section from its H&E alone, and compares the prediction with what was measured. It runs offline in
well under a minute on a laptop CPU.""",
    ),
    ("code", "import omx\n\nsdata = omx.datasets.her2st_sample()\nsdata"),
    (
        "md",
        """One SpatialData object holds, per section, the H&E image (`C2_he`, a multiscale image in a coordinate
system in microns), the spots (`C2_spots`, circles of their true 50 um radius) and one table of raw counts that
annotates all spots.""",
    ),
    ("code", "table = sdata.tables['table']\ntable.obs[['section', 'patient']].value_counts()"),
    (
        "md",
        """## Fit on C2 and C3, predict C4

`fit_predict` cuts patches of a fixed physical size around each spot (and around larger context windows),
encodes them, fits the model on the training sections only, and writes the predictions for C4 into
`table.layers['omx_pred']` on the scale log1p(counts / total x 1e4). Rows of other sections stay NaN.""",
    ),
    (
        "code",
        "model = omx.tl.fit_predict(sdata, train=['C2', 'C3'], predict='C4', model='ridge', show_progress_bar=False)\n"
        "model",
    ),
    (
        "code",
        "summary = table.uns['omx']['omx_pred']['scores']['C4']['summary']\n"
        "import pandas as pd\n\npd.DataFrame(summary).T.round(3)",
    ),
    (
        "md",
        """The mean per-gene Pearson r is computed on the held-out section over all genes, the 50 most
expressed genes of that section, and the 50 most variable genes of the *training* sections (chosen without
looking at the held-out section).""",
    ),
    ("code", "omx.pl.gene_scores(table, key='omx_pred', section='C4');"),
    ("code", "omx.pl.expression(sdata, genes=['GNAS', 'SCD'], section='C4');"),
    (
        "md",
        """## Save the model, predict a section that has only H&E

Model weights never go into the SpatialData. Save the model and apply it to any other SpatialData with an H&E
image and spots; spots without a measured table get a new table `omx_pred`.""",
    ),
    (
        "code",
        "import tempfile\n\npath = tempfile.mkdtemp() + '/ridge'\nmodel.save(path)\n"
        "pred = omx.tl.predict_expression(sdata, path, shapes_key='C4_spots', inplace=False, show_progress_bar=False)\n"
        "pred",
    ),
    (
        "md",
        """## Evaluate without leakage

`cross_validate` holds out each section in turn; the genes' normalisation statistics and the model are fitted
inside each fold, on the training sections only.""",
    ),
    ("code", "cv = omx.tl.cross_validate(sdata, model='ridge', show_progress_bar=False)\ncv.round(3)"),
]


def build(name: str, cells: list[tuple[str, str]]) -> Path:
    """Write the notebook ``tutorials/{name}.ipynb`` from its cells, executed, and return its path."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    for kind, src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    for cell in nb.cells:  # tqdm's notice that ipywidgets is missing says nothing about omx
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and "TqdmWarning" in o.text)]
    path = ROOT / "tutorials" / f"{name}.ipynb"
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(build("quickstart", QUICKSTART))
