"""Encode once: `omx.pp.encode` keeps features where `omx.tl` finds them, and nothing is encoded twice."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import omx
from omx import OmxWarning
from omx.encoders import HandcraftedEncoder, get_encoder
from omx.models import Ridge


class Counting(HandcraftedEncoder):
    """A handcrafted encoder that counts the patches it encodes."""

    n = 0

    def _transform(self, patches):
        Counting.n += len(patches)
        return super()._transform(patches)

    def get_params(self):
        return {**super().get_params(), "class": "HandcraftedEncoder"}  # the same features as the plain one


@pytest.fixture
def toy():
    return omx.datasets.toy_sdata(n_spots=60, n_genes=6, n_sections=3, seed=2)


def encode_all(sdata, encoder, **kwargs):
    for name in ("S1", "S2", "S3"):
        omx.pp.encode(sdata, encoder, shapes_key=f"{name}_spots", image_key=f"{name}_he", **kwargs)


def ridge(encoder):
    return Ridge(encoder=encoder, show_progress_bar=False)


def test_encode_writes_obsm_and_tl_reuses_it(toy):
    plain = omx.datasets.toy_sdata(n_spots=60, n_genes=6, n_sections=3, seed=2)
    omx.tl.fit_predict(plain, train=["S1", "S2"], predict="S3", model=ridge(HandcraftedEncoder()))
    encoder = Counting()
    Counting.n = 0
    encode_all(toy, encoder, show_progress_bar=False)
    table = toy.tables["table"]
    key = "X_omx_handcrafted"
    features = table.obsm[key]
    assert features.shape == (table.n_obs, 3 * encoder.dim) and np.isfinite(features).all()
    entry = table.uns["omx"][key]
    assert entry["function"] == "encode" and entry["context"] == [1.0, 2.0, 3.0] and entry["size_um"] == 55.0
    assert entry["regions"] == {"S1_spots": "S1_he", "S2_spots": "S2_he", "S3_spots": "S3_he"}
    assert Counting.n == 3 * table.n_obs  # three patch sizes per spot, once
    Counting.n = 0
    omx.tl.fit_predict(toy, train=["S1", "S2"], predict="S3", model=ridge(encoder))
    omx.tl.cross_validate(toy, model=ridge(encoder), groups="section", key_added=None)
    assert Counting.n == 0  # nothing encoded again
    np.testing.assert_array_equal(table.layers["omx_pred"], plain.tables["table"].layers["omx_pred"])


def test_encode_matches_what_tl_computes(toy):
    spots = omx.pp.resolve_spots(toy, shapes_key="S2_spots", image_key="S2_he")
    direct = omx.pp.encode(spots, HandcraftedEncoder(), show_progress_bar=False)
    back = omx.pp.encode(toy, HandcraftedEncoder(), shapes_key="S2_spots", image_key="S2_he", inplace=False)
    np.testing.assert_array_equal(direct, back)
    assert "X_omx_handcrafted" not in toy.tables["table"].obsm  # inplace=False writes nothing
    no_threads = omx.pp.encode(spots, HandcraftedEncoder(), num_workers=0, chunk_spots=7, show_progress_bar=False)
    threads = omx.pp.encode(spots, HandcraftedEncoder(), num_workers=3, chunk_spots=7, show_progress_bar=False)
    np.testing.assert_array_equal(no_threads, direct)
    np.testing.assert_array_equal(threads, direct)


def test_other_geometry_is_not_reused_and_keys_are_protected(toy):
    encoder = Counting()
    encode_all(toy, encoder, context=(1.0,), show_progress_bar=False)
    Counting.n = 0
    omx.tl.fit_predict(toy, train=["S1", "S2"], predict="S3", model=ridge(encoder))  # default context (1, 2, 3)
    assert Counting.n > 0
    Counting.n = 0  # a refused call fails before it encodes anything
    with pytest.raises(KeyError, match="already holds these features of 'S1_spots'"):
        omx.pp.encode(toy, encoder, shapes_key="S1_spots", image_key="S1_he", context=(1.0,))
    with pytest.raises(KeyError, match=r"obsm\['X_omx_handcrafted'\]"):  # another geometry under the same key
        omx.pp.encode(toy, encoder, shapes_key="S1_spots", image_key="S1_he", size_um=80)
    assert Counting.n == 0
    table = toy.tables["table"]
    table.obsm["mine"] = np.zeros((table.n_obs, 2))
    with pytest.raises(KeyError, match=r"obsm\['mine'\]"):
        omx.pp.encode(toy, encoder, shapes_key="S1_spots", image_key="S1_he", key_added="mine")
    np.testing.assert_array_equal(table.obsm["mine"], 0)


def test_feature_store_for_spots_without_a_table(toy, tmp_path):
    """H&E-only spots have no table: their features go to a zarr store, found again by later calls."""
    toy.shapes["new_spots"] = toy.shapes["S3_spots"].copy()  # the same tissue, with no table
    with pytest.raises(ValueError, match="feature store"):
        omx.pp.encode(toy, HandcraftedEncoder(), shapes_key="new_spots", image_key="S3_he")
    store = tmp_path / "features.zarr"
    encoder = Counting()
    Counting.n = 0
    omx.pp.encode(toy, encoder, shapes_key="new_spots", image_key="S3_he", store=store, show_progress_bar=False)
    first = Counting.n
    assert first > 0 and len(list(store.iterdir())) == 1
    with omx.settings.override(feature_store=store):
        Counting.n = 0
        omx.tl.fit_predict(toy, train=["S1", "S2"], predict="new_spots", model=ridge(encoder), key_added="p")
        # the training sections were encoded (and stored), the H&E-only spots were not
        assert Counting.n == 3 * 2 * 60
        Counting.n = 0
        omx.tl.fit_predict(toy, train=["S1", "S2"], predict="new_spots", model=ridge(encoder), key_added="q")
        assert Counting.n == 0
    np.testing.assert_array_equal(toy.tables["p"].X, toy.tables["q"].X)


def test_predicting_unencoded_spots_fills_the_feature_store(toy, tmp_path):
    """H&E-only spots that `omx.tl` encodes to predict them go to the store, in the spots' order, once."""
    toy.shapes["new_spots"] = toy.shapes["S3_spots"].copy()
    encoder = Counting()
    store = tmp_path / "features.zarr"
    model = omx.tl.fit_predict(toy, train=["S1", "S2"], predict="S3", model=ridge(encoder))
    Counting.n = 0
    with omx.settings.override(feature_store=store):
        omx.tl.predict_expression(toy, model, shapes_key="new_spots", key_added="p", show_progress_bar=False)
        assert Counting.n == 3 * 60 and len(list(store.iterdir())) == 1
        Counting.n = 0
        omx.tl.predict_expression(toy, model, shapes_key="new_spots", key_added="q", show_progress_bar=False)
        assert Counting.n == 0  # read back from the store
    np.testing.assert_allclose(toy.tables["p"].X, toy.tables["q"].X, rtol=1e-5, atol=1e-6)
    stored = omx.pp.encode(toy, encoder, shapes_key="new_spots", image_key="S3_he", inplace=False)
    found = omx.pp.encode(toy, encoder, shapes_key="new_spots", image_key="S3_he", store=store, inplace=False)
    np.testing.assert_array_equal(found, stored)  # the rows follow the spots, whatever order the chunks came in
    # without a store, nothing is kept and the spots are encoded again
    Counting.n = 0
    omx.tl.predict_expression(toy, model, shapes_key="new_spots", key_added="r", show_progress_bar=False)
    assert Counting.n == 3 * 60
    np.testing.assert_allclose(toy.tables["r"].X, toy.tables["p"].X, rtol=1e-5, atol=1e-6)


def test_foundation_encoder_sees_its_native_resolution(toy):
    """A foundation encoder's patches are 224 px over 112 um (0.5 um/px) whatever the slide's resolution."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OmxWarning)
        encoder = get_encoder("uni", weights="random", reduced=True, device="cpu", batch_size=16)
    model = ridge(encoder)
    omx.tl.fit_predict(toy, train=["S1", "S2"], predict="S3", model=model)
    assert model.meta_["size_um"] == pytest.approx(112.0) and model.meta_["context"] == [1.0]
    assert model.n_features_in_ == 1024
    assert np.isfinite(toy.tables["table"].layers["omx_pred"][toy.tables["table"].obs["section"] == "S3"]).all()


def test_model_with_a_foundation_encoder_saves_and_loads(toy, tmp_path):
    """A saved model keeps its encoder by name and weights file, and rebuilds it on load."""
    from safetensors.torch import save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OmxWarning)
        stand_in = get_encoder("timm:vit_tiny_patch16_224", weights="random", img_size=64, device="cpu")
    file = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in stand_in.module.state_dict().items()}, str(file))
    encoder = get_encoder("timm:vit_tiny_patch16_224", weights=file, img_size=64, device="cpu", mpp=1.0)
    model = omx.tl.fit_predict(toy, train=["S1", "S2"], predict="S3", model=ridge(encoder))
    assert model.meta_["size_um"] == 64.0
    model.save(tmp_path / "model")
    loaded = omx.models.load(tmp_path / "model")
    assert loaded.encoder.get_params() == encoder.get_params()
    new = omx.tl.predict_expression(toy, tmp_path / "model", shapes_key="S3_spots", image_key="S3_he", inplace=False)
    table = toy.tables["table"]
    rows = (table.obs["section"] == "S3").to_numpy()
    np.testing.assert_allclose(new.X, table.layers["omx_pred"][rows], rtol=1e-5, atol=1e-6)
