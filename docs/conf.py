"""Sphinx configuration of the omx documentation."""

import logging
import os
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))  # document the source tree even when omx is not installed

project = "omx"
author = "omx developers"
copyright = f"{date.today().year}, {author}"
try:
    release = version("omx")
except PackageNotFoundError:
    release = "0.0.0"
version = release

extensions = [
    "myst_nb",  # Markdown pages and notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "notebooks/README.md"]
templates_path = ["_templates"]

# Notebooks in tutorials/ are committed with their outputs: never run them while building the docs.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "signature"  # types live in the signatures; numpydoc docstrings carry no types
autoclass_content = "class"
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
numpydoc_class_members_toctree = False


# intersphinx needs the network; OMX_DOCS_OFFLINE=1 builds without it (e.g. on machines with no network).
intersphinx_mapping = {}
if not os.environ.get("OMX_DOCS_OFFLINE"):
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
    }

html_theme = "sphinx_book_theme"
html_title = "omx"
html_theme_options = {
    "repository_url": "https://github.com/omx-dev/omx",
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}
html_static_path = []


class _NoEmptyNotebookGlob(logging.Filter):
    """Drop the warning for the tutorials' ``notebooks/*`` glob while that folder holds no notebook yet.

    Sphinx emits it without a warning type, so ``suppress_warnings`` cannot silence it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("notebooks/*" in message and "didn't match any documents" in message)


def _skip_torch_members(app, what, name, obj, skip, options):
    """Leave out what omx classes inherit from ``torch.nn.Module`` (its docstrings are not numpydoc)."""
    if str(getattr(obj, "__module__", None) or "").startswith("omx"):
        return None
    try:
        import torch
    except ImportError:
        return None
    module = torch.nn.Module
    if name in dir(module) or name in getattr(module, "__annotations__", {}):
        return True
    return None


def setup(app):
    logging.getLogger("sphinx.sphinx.directives.other").addFilter(_NoEmptyNotebookGlob())
    app.connect("autodoc-skip-member", _skip_torch_members)
