"""Every key omx writes, main and secondary, is checked before anything is written (issue 16, item 3).

Each case puts a user's value at ONE key a writer would write, checks that the call raises, names the key and
leaves the value (and everything else) as it was, and that `overwrite=True` replaces it.
"""

import numpy as np
import pytest

import omx
from omx._schema import Key

USER = "the user's"


def _deconv_sdata(synthetic_sdata):
    from deconv_data import spot_sdata

    return spot_sdata(synthetic_sdata)


def _user_value(table, slot, name):
    if slot == "obs":
        table.obs[name] = USER
    elif slot == "obsm":
        table.obsm[name] = np.full((table.n_obs, 2), 7.0)
    elif slot == "varm":
        table.varm[name] = np.full((table.n_vars, 2), 7.0)
    elif slot == "layers":
        table.layers[name] = np.full(table.shape, 7.0, dtype=np.float32)


def _is_user_value(table, slot, name):
    if slot == "obs":
        return (table.obs[name].astype(str) == USER).all()
    value = np.asarray(getattr(table, slot)[name], dtype=float)
    return value.shape[1] == (2 if slot != "layers" else table.n_vars) and np.all(value == 7.0)


@pytest.mark.parametrize(
    ("slot", "name"),
    [
        ("obsm", Key.PROPORTIONS),
        ("obsm", Key.quantiles(Key.PROPORTIONS)[0]),
        ("obsm", Key.quantiles(Key.PROPORTIONS)[1]),
        ("obs", Key.cell_type(Key.PROPORTIONS)),
        ("obs", Key.n_cells(Key.PROPORTIONS)),
        ("varm", Key.signatures(Key.PROPORTIONS)),
    ],
)
def test_deconvolve_checks_every_key(synthetic_sdata, slot, name):
    sdata, ref, _, types = _deconv_sdata(synthetic_sdata)
    t = sdata.tables["table"]
    _user_value(t, slot, name)
    before = {s: set(getattr(t, s).keys()) for s in ("obsm", "varm")} | {"obs": set(t.obs.columns)}
    with pytest.raises(KeyError, match=rf"{slot}\['{name}'\]"):
        omx.tl.deconvolve(sdata, ref, labels_key="cell_type", max_rounds=10, show_progress_bar=False)
    assert _is_user_value(t, slot, name)
    assert {s: set(getattr(t, s).keys()) for s in ("obsm", "varm")} | {"obs": set(t.obs.columns)} == before
    assert Key.PROPORTIONS not in t.uns.get("omx", {})
    omx.tl.deconvolve(sdata, ref, labels_key="cell_type", max_rounds=10, overwrite=True, show_progress_bar=False)
    assert not _is_user_value(t, slot, name)
    assert Key.PROPORTIONS in t.uns["omx"]


def test_fit_predict_checks_its_layer():
    sdata = omx.datasets.toy_sdata(seed=0)
    t = sdata.tables["table"]
    _user_value(t, "layers", Key.PRED)
    with pytest.raises(KeyError, match=rf"layers\['{Key.PRED}'\]"):
        omx.tl.fit_predict(sdata, train=["S1"], predict=["S2"], show_progress_bar=False)
    assert _is_user_value(t, "layers", Key.PRED)
    assert Key.PRED not in t.uns.get("omx", {})
    omx.tl.fit_predict(sdata, train=["S1"], predict=["S2"], overwrite=True, show_progress_bar=False)
    assert not _is_user_value(t, "layers", Key.PRED)


def test_fit_predict_checks_the_variance_layer():
    sdata = omx.datasets.toy_sdata(seed=0)
    t = sdata.tables["table"]
    var = Key.variance(Key.PRED)
    _user_value(t, "layers", var)
    model = omx.models.SpatialGraph(likelihood="nb", epochs=2, hidden=8)
    assert model.provides_variance
    with pytest.raises(KeyError, match=rf"layers\['{var}'\]"):
        omx.tl.fit_predict(sdata, train=["S1"], predict=["S2"], model=model, show_progress_bar=False)
    assert _is_user_value(t, "layers", var)
    assert Key.PRED not in t.layers


def test_encode_checks_its_obsm():
    sdata = omx.datasets.toy_sdata(seed=0)
    t = sdata.tables["table"]
    name = Key.embedding("handcrafted")
    _user_value(t, "obsm", name)
    with pytest.raises(KeyError, match=rf"obsm\['{name}'\]"):
        omx.pp.encode(sdata, "handcrafted", shapes_key="S1_spots", show_progress_bar=False)
    assert _is_user_value(t, "obsm", name)


def test_segment_nuclei_checks_n_nuclei_first(synthetic_sdata):
    sdata, _ = synthetic_sdata(seed=0)
    t = sdata.tables["table"]
    _user_value(t, "obs", Key.N_NUCLEI)
    with pytest.raises(KeyError, match=Key.N_NUCLEI):
        omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    assert _is_user_value(t, "obs", Key.N_NUCLEI)
    assert not list(sdata.labels) and Key.CELLS not in sdata.tables


def test_segment_nuclei_checks_its_elements(synthetic_sdata):
    sdata, _ = synthetic_sdata(seed=0)
    omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    labels = list(sdata.labels)
    n_cells = sdata.tables[Key.CELLS].n_obs
    with pytest.raises(KeyError, match="overwrite"):
        omx.pp.segment_nuclei(sdata, show_progress_bar=False)
    assert list(sdata.labels) == labels and sdata.tables[Key.CELLS].n_obs == n_cells
