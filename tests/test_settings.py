"""omx.settings (verbosity of the omx logger), OmxWarning, and the shared docstring fragments."""

import importlib
import inspect
import logging
import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import omx
from omx._docs import FRAGMENTS, doc_params
from omx._settings import Verbosity, warn

LOGGER = logging.getLogger("omx")


@pytest.fixture(autouse=True)
def _restore_verbosity():
    before = omx.settings.verbosity
    yield
    omx.settings.verbosity = before


# -------------------------------------------------------------------------------------------------- verbosity
def test_verbosity_names_and_integers():
    assert omx.settings.verbosity == Verbosity.info == 2  # the default
    for value, expected in [("error", 0), ("warning", 1), ("INFO", 2), ("debug", 3), (0, 0), (3, 3), ("1", 1)]:
        omx.settings.verbosity = value
        assert omx.settings.verbosity == expected
        assert LOGGER.level == Verbosity(expected).level
    for bad in ("loud", 4, -1, True, None):
        with pytest.raises(ValueError, match="verbosity must be one of"):
            omx.settings.verbosity = bad
    assert "verbosity='warning'" in repr(omx.settings)


def test_verbosity_decides_what_reaches_the_handler(capsys):
    omx.settings.verbosity = "warning"
    LOGGER.info("quiet info")
    LOGGER.warning("loud warning")
    omx.settings.verbosity = "info"
    LOGGER.info("now info")
    LOGGER.debug("hidden debug")
    with omx.settings.override(verbosity="debug"):
        LOGGER.debug("shown debug")
    LOGGER.debug("hidden again")
    err = capsys.readouterr().err.splitlines()
    assert err == ["WARNING: loud warning", "now info", "DEBUG: shown debug"]
    assert omx.settings.verbosity == "info"


def test_one_handler_on_omx_and_none_on_root():
    code = (
        "import logging, omx; omx.settings.verbosity = 'debug'; omx.settings.verbosity = 'info'; "
        "root = logging.getLogger(); print(len(logging.getLogger('omx').handlers), root.handlers, root.level)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "[]", str(logging.WARNING)]


def test_records_propagate_to_caplog(caplog):
    LOGGER.info("seen by caplog")
    assert ("omx", logging.INFO, "seen by caplog") in caplog.record_tuples


def test_no_double_output_when_the_root_logger_prints(capsys):
    root_handler = logging.StreamHandler(sys.stderr)  # what logging.basicConfig() adds
    logging.getLogger().addHandler(root_handler)
    try:
        LOGGER.info("only once")
    finally:
        logging.getLogger().removeHandler(root_handler)
    LOGGER.info("ours again")
    err = capsys.readouterr().err
    assert err.count("only once") == 1 and err.count("ours again") == 1


def test_override_rejects_unknown_settings_and_checks_values(tmp_path):
    with pytest.raises(AttributeError, match="no setting"):
        with omx.settings.override(colour="red"):
            pass
    with pytest.raises(TypeError, match="autoshow"):
        omx.settings.autoshow = "yes"
    with omx.settings.override(figdir=str(tmp_path)):
        assert omx.settings.figdir == tmp_path
    assert str(omx.settings.figdir) == "figures"


# --------------------------------------------------------------------------------------------------- warnings
def test_warn_points_at_the_caller_outside_omx():
    assert issubclass(omx.OmxWarning, UserWarning)
    with pytest.warns(omx.OmxWarning, match="look here") as record:
        warn("look here")
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", omx.OmxWarning)  # users can turn them into errors by category
        with pytest.raises(omx.OmxWarning):
            warn("now an error")


def test_deconvolve_warns_when_nuclei_counts_are_partial():
    sdata = omx.datasets.toy_sdata(n_spots=60, n_genes=60, seed=0)
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    types = ["a", "b"]
    S = rng.gamma(2.0, 1.0, size=(2, table.n_vars)).astype(np.float32)
    reference = AnnData(X=S, obs=pd.DataFrame(index=types), var=pd.DataFrame(index=table.var_names))
    n_nuclei = rng.integers(1, 10, table.n_obs).astype(float)
    n_nuclei[:5] = np.nan  # nuclei counted for some images only
    table.obs["omx_n_nuclei"] = n_nuclei
    with pytest.warns(omx.OmxWarning, match=r"obs\['omx_n_nuclei'\] is missing for some spots") as record:
        omx.tl.deconvolve(sdata, reference, max_rounds=5, show_progress_bar=False)
    assert record[0].filename == __file__


# ------------------------------------------------------------------------------------------ docstring fragments
def test_doc_params_fills_whole_line_placeholders():
    @doc_params(extra="extra\n    An extra parameter,\n    on two lines.")
    def f(sdata, extra, seed):
        """Do it.

        Parameters
        ----------
        {sdata}
        {extra}
        {seed}
        braces
            Kept as they are: {"gene": [...]}, ``"{image_key}_nuclei"``.
        """

    doc = inspect.cleandoc(f.__doc__)
    assert "    An extra parameter,\n    on two lines.\nseed\n    Random seed" in doc
    assert doc.count("sdata\n    The SpatialData object.") == 1
    assert '{"gene": [...]}' in doc and '"{image_key}_nuclei"' in doc
    assert "{sdata}" in f.__orig_doc__
    with pytest.raises(KeyError, match="No shared docstring fragment 'nope'"):

        @doc_params()
        def g():
            """Do it.

            {nope}
            """


def test_fragments_start_with_their_parameter():
    for name, text in FRAGMENTS.items():
        first, *rest = text.splitlines()
        assert name.startswith(first.lstrip("*")), name
        assert rest and all(line.startswith("    ") for line in rest if line), name


def _public_functions():
    for module in ("pl", "pp", "tl", "datasets", "io"):
        mod = importlib.import_module(f"omx.{module}")
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"omx.{module}.{name}", obj


def test_no_placeholder_left_in_public_docstrings():
    seen = 0
    for name, obj in _public_functions():
        doc = obj.__doc__ or ""
        prose = re.sub(r"``.*?``", "", doc, flags=re.DOTALL)  # literals may hold braces: "{image_key}_nuclei"
        left = re.findall(r"\{[A-Za-z_]\w*\}", prose)
        assert not left, f"{name} has unformatted placeholders {left}"
        seen += 1
    assert seen >= 20


def test_plot_docstrings_share_show_and_save():
    for name in omx.pl.__all__:
        doc = getattr(omx.pl, name).__doc__
        assert FRAGMENTS["show"].replace("\n", "\n    ") in doc, name
        assert FRAGMENTS["save"].replace("\n", "\n    ") in doc, name
