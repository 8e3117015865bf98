"""Streaming, chunked and distributed work: the same results as in one piece, in one process."""

from __future__ import annotations

import numpy as np
import pytest

import omx
from omx.models import CNNRegressor
from omx.models._training import Checkpoint
from omx.pp import _stream


@pytest.fixture(scope="module")
def toy():
    return omx.datasets.toy_sdata(n_spots=150, n_genes=8, n_sections=2, seed=1)


@pytest.fixture(scope="module")
def toy_patches(toy):
    spots = omx.pp.resolve_spots(toy, shapes_key="S1_spots")
    patches = omx.pp.extract_patches(spots, size_um=110, size_px=32)
    rows = spots.table_rows
    Y = omx._utils.log_normalize(toy.tables["table"].X[rows])
    return patches, Y


def test_patches_do_not_depend_on_the_other_spots(toy):
    """A spot's patch is the same whether it is cut with the whole section, a subset, or in chunks."""
    spots = omx.pp.resolve_spots(toy, shapes_key="S1_spots")
    for size_um, size_px in ((55, 96), (110, 40), (55, 55)):  # upsampled, downsampled, native
        whole = omx.pp.extract_patches(spots, size_um=size_um, size_px=size_px)
        some = np.arange(0, spots.n_spots, 7)
        np.testing.assert_array_equal(
            omx.pp.extract_patches(spots.subset(some), size_um=size_um, size_px=size_px), whole[some]
        )
        for chunk_spots in (5, 64):
            seen = np.zeros(spots.n_spots, bool)
            for positions, patches in _stream.iter_chunks(
                spots, sizes_um=[size_um], size_px=size_px, chunk_spots=chunk_spots
            ):
                np.testing.assert_array_equal(patches, whole[positions])
                seen[positions] = True
            assert seen.all()


def test_encode_in_chunks_equals_whole(toy):
    spots = omx.pp.resolve_spots(toy, shapes_key="S1_spots")
    encoder = omx.encoders.HandcraftedEncoder(patch_px=32)
    whole = np.concatenate(
        [encoder.transform(omx.pp.extract_patches(spots, size_um=55 * c, size_px=32)) for c in (1, 2)], axis=1
    )
    chunked = omx.pp.encode(spots, encoder, size_um=55, context=(1, 2), chunk_spots=9)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_encode_on_a_local_dask_cluster_equals_local(toy):
    distributed = pytest.importorskip("distributed")
    spots = omx.pp.resolve_spots(toy, shapes_key="S1_spots")
    encoder = omx.encoders.HandcraftedEncoder(patch_px=32)
    local = omx.pp.encode(spots, encoder, size_um=55, context=(1, 2), chunk_spots=40)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        distributed.Client(cluster),
    ):
        assert _stream.active_client() is not None
        remote = omx.pp.encode(spots, encoder, size_um=55, context=(1, 2), chunk_spots=40)
    np.testing.assert_array_equal(remote, local)


@pytest.mark.parametrize("model", ["ridge", "cnn"])
def test_streamed_prediction_equals_whole_section(toy, model, monkeypatch):
    kwargs = {"epochs": 2, "patch_px": 32} if model == "cnn" else {}
    fitted = omx.tl.fit_predict(
        toy,
        train="S1",
        predict="S2",
        model=omx.models.get_model(model, show_progress_bar=False, **kwargs),
        key_added=f"stream_{model}",
        show_progress_bar=False,
    )
    whole = toy.tables["table"].layers[f"stream_{model}"][(toy.tables["table"].obs["section"] == "S2").to_numpy()]
    monkeypatch.setattr(_stream, "MIN_CHUNK_SPOTS", 16)
    monkeypatch.setattr(_stream, "MAX_CHUNK_SPOTS", 16)  # 150 spots in 10 chunks
    streamed = omx.tl.predict_expression(toy, fitted, shapes_key="S2_spots", inplace=False, show_progress_bar=False)
    genes = toy.tables["table"].var_names.get_indexer(streamed.var_names)
    np.testing.assert_allclose(streamed.X, whole[:, genes], rtol=1e-4, atol=1e-4)


def test_ridge_group_stats_give_whole_group_predictions():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(2.0, 3.0, (200, 6)), rng.normal(size=(200, 2))
    groups = np.repeat(["a", "b"], 100)
    model = omx.models.Ridge(n_components=None, show_progress_bar=False).fit(X, Y, groups=groups)
    Xc = rng.normal(1.0, 2.0, (90, 6))
    whole = model.predict(Xc, groups=np.full(90, "c"))
    stats = {"c": (Xc.mean(0), Xc.std(0), len(Xc))}
    parts = [
        model.predict(Xc[s : s + 7], omx.models.Context(groups=np.full(len(Xc[s : s + 7]), "c"), group_stats=stats))
        for s in range(0, 90, 7)
    ]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.predict(Xc[:7], groups=np.full(7, "c")), whole[:7], atol=1e-3)  # without: differs


def _cnn(**kwargs):
    params = {"patch_px": 32, "epochs": 5, "patience": 2, "batch_size": 16, "val_fraction": 0.25, "seed": 3}
    return CNNRegressor(show_progress_bar=False, **{**params, **kwargs})


def test_checkpoint_resume_equals_uninterrupted(toy_patches, tmp_path, monkeypatch):
    patches, Y = toy_patches
    full = _cnn().fit(patches, Y)

    save = Checkpoint.save

    def save_then_stop(self, state, *args):
        save(self, state, *args)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # the run dies right after its second epoch

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)
    interrupted = _cnn()
    interrupted.checkpoint_dir = tmp_path
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(patches, Y)
    monkeypatch.undo()

    resumed = _cnn()
    resumed.checkpoint_dir = tmp_path
    resumed.fit(patches, Y)
    assert resumed.history_ == full.history_
    assert resumed.best_epoch_ == full.best_epoch_
    np.testing.assert_array_equal(resumed.predict(patches), full.predict(patches))

    other = _cnn()
    other.checkpoint_dir = tmp_path
    with pytest.raises(ValueError, match="another model or other data"):
        other.fit(patches, Y + 1.0)


def test_ddp_on_two_processes(toy_patches):
    patches, Y = toy_patches
    model = omx.models.fit_distributed(_cnn(epochs=3, patience=None), patches, Y, n_procs=2, backend="gloo")
    assert model.is_fitted_ and len(model.history_["train_loss"]) == 3
    single = _cnn(epochs=3, patience=None).fit(patches, Y)
    # the same global batches, gradients averaged over the two processes: close to one process (batch norm
    # statistics are per process, so not identical)
    r = np.corrcoef(model.predict(patches).ravel(), single.predict(patches).ravel())[0, 1]
    assert r > 0.8
    with pytest.raises(NotImplementedError, match="DistributedDataParallel"):
        omx.models.fit_distributed(omx.models.SpatialGraph(), np.zeros((4, 2)), np.zeros((4, 1)))
