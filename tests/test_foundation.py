"""Named pathology foundation encoders: architectures, weights, preprocessing, pooling, errors; no network."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import omx
from omx import OmxWarning
from omx.encoders import FoundationEncoder, get_encoder
from omx.encoders._foundation import REGISTRY, get_spec, network, phikon_to_timm

NAMES = omx.encoders.registered()


def quiet(**kwargs):
    """A random-weight encoder, its warning checked and silenced."""
    with pytest.warns(OmxWarning, match="random weights"):
        return get_encoder(weights="random", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def patches():
    return np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)


def test_registry_covers_the_published_encoders():
    assert set(NAMES) >= {"uni", "uni2_h", "h_optimus_0", "h_optimus_1", "virchow2", "phikon_v2", "gigapath", "conch"}
    table = omx.encoders.describe()
    assert list(table.index) == NAMES
    assert table.loc["uni", "hub_id"] == "MahmoodLab/UNI"
    assert table.loc["virchow2", "dim"] == 2560 and table.loc["virchow2", "pooling"] == "cls+mean"
    assert table.loc["uni", "patch_um"] == pytest.approx(112.0)
    assert (table["licence"].str.len() > 5).all()
    for spelling in ("UNI2-h", "uni2_h", "H-optimus-0", "hoptimus0", "Phikon-v2", "prov-gigapath"):
        assert get_spec(spelling) is not None, spelling


@pytest.mark.parametrize("name", NAMES)
def test_published_architecture(name):
    """The published configuration, built without memory: parameter count and embedding size."""
    spec = get_spec(name)
    module = network(spec, device="meta")
    assert sum(p.numel() for p in module.parameters()) == spec.n_params
    out = module(torch.zeros(2, 3, spec.patch_px, spec.patch_px, device="meta"))
    assert tuple(out.shape) == (2, spec.dim)


@pytest.mark.parametrize("name", NAMES)
def test_reduced_network_encodes(name, patches):
    encoder = quiet(spec=name, reduced=True)
    spec = get_spec(name)
    assert isinstance(encoder, FoundationEncoder) and encoder.mpp == spec.mpp
    features = encoder.transform(patches[:2])
    assert features.shape == (2, spec.dim) and features.dtype == np.float32 and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])
    rebuilt = quiet(spec=encoder.get_params())  # seed-fixed random weights rebuild the same network
    np.testing.assert_allclose(rebuilt.transform(patches[:2]), features, rtol=1e-5, atol=1e-5)


def test_uni_full_size_round_trip_through_safetensors(tmp_path, patches):
    """UNI's real ViT-L/16 (303 M parameters) with random weights, saved and loaded back through `weights=`."""
    from safetensors.torch import save_file

    encoder = quiet(spec="uni", batch_size=2)
    assert sum(p.numel() for p in encoder.module.parameters()) == 303_350_784
    file = tmp_path / "uni.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.module.trunk.state_dict().items()}, str(file))
    loaded = get_encoder("uni", weights=file, device="cpu", batch_size=2)
    assert loaded.weights == str(file)
    np.testing.assert_array_equal(loaded.transform(patches[:2]), encoder.transform(patches[:2]))
    again = get_encoder(loaded.get_params(), device="cpu")  # a saved model rebuilds its encoder from the path
    np.testing.assert_array_equal(again.transform(patches[:1]), loaded.transform(patches[:1]))


def test_conch_checkpoint_layout_and_pickle_formats(tmp_path, patches):
    """CONCH's file holds the whole CoCa model: the image tower's ``visual.*`` keys load, the text tower is left."""
    encoder = quiet(spec="conch", batch_size=2)
    state = {f"visual.{k}": v for k, v in encoder.module.state_dict().items()}
    state["text.token_embedding.weight"] = torch.zeros(4, 8)
    state["logit_scale"] = torch.tensor(1.0)
    big = np.random.default_rng(1).integers(0, 256, (2, 448, 448, 3), dtype=np.uint8)
    expected = encoder.transform(big)
    for suffix, payload in ((".bin", state), (".pth", {"state_dict": {f"module.{k}": v for k, v in state.items()}})):
        file = tmp_path / f"conch{suffix}"
        torch.save(payload, file)
        loaded = get_encoder("conch", weights=file, device="cpu")
        np.testing.assert_array_equal(loaded.transform(big), expected)
    assert expected.shape == (2, 512)
    folder = tmp_path / "hub"  # a downloaded hub folder works too
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    assert get_encoder("conch", weights=folder, device="cpu").weights.endswith("pytorch_model.bin")


def test_phikon_transformers_layout_loads(tmp_path, patches):
    """Phikon-v2 is published as a transformers Dinov2Model: its names map onto timm's, q/k/v into qkv."""
    from safetensors.torch import save_file

    encoder = quiet(spec="phikon_v2", batch_size=2)
    timm_state = encoder.module.trunk.state_dict()
    hf = {
        "embeddings.cls_token": timm_state["cls_token"],
        "embeddings.position_embeddings": timm_state["pos_embed"],
        "embeddings.mask_token": torch.zeros(1, 1024),
        "embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "layernorm.weight": timm_state["norm.weight"],
        "layernorm.bias": timm_state["norm.bias"],
    }
    rename = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    for i in range(24):
        for kind in ("weight", "bias"):
            q, k, v = timm_state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            for name, part in zip(("query", "key", "value"), (q, k, v), strict=True):
                hf[f"encoder.layer.{i}.attention.attention.{name}.{kind}"] = part.contiguous()
        for new, old in rename.items():
            for kind in ("weight", "bias", ""):
                key = f"blocks.{i}.{new}" + (f".{kind}" if kind and not new.endswith("gamma") else "")
                if key in timm_state:
                    hf[f"encoder.layer.{i}.{old}" + key[len(f"blocks.{i}.{new}") :]] = timm_state[key]
    assert phikon_to_timm(hf).keys() == timm_state.keys()
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(file))
    loaded = get_encoder("phikon_v2", weights=tmp_path, device="cpu", batch_size=2)
    np.testing.assert_array_equal(loaded.transform(patches[:2]), encoder.transform(patches[:2]))


def test_wrong_weights_name_the_keys(tmp_path):
    from safetensors.torch import save_file

    conch = quiet(spec="conch")
    file = tmp_path / "conch.safetensors"
    save_file({k: v.contiguous() for k, v in conch.module.trunk.state_dict().items()}, str(file))
    with pytest.raises(ValueError, match=r"do not fit encoder 'uni'.*keys missing from the file.*of another shape"):
        get_encoder("uni", weights=file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_encoder("uni", weights=tmp_path / "nope.bin")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="Could not read"):
        get_encoder("uni", weights=tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of the weight files"):
        get_encoder("uni", weights=tmp_path / "empty")


def test_offline_error_says_how_to_get_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ConnectionError, match=r"huggingface-cli download MahmoodLab/UNI pytorch_model.bin.*weights="):
        get_encoder("uni")
    with pytest.raises(ValueError, match="Unknown encoder 'unii'"):
        get_encoder("unii")
    with pytest.raises(ValueError, match="only random weights fit"):
        get_encoder("uni", reduced=True)


def test_preprocessing_of_a_known_patch():
    """The network sees RGB in [0, 1] normalised with the encoder's own statistics (H-optimus: its own)."""
    encoder = quiet(spec="h_optimus_0", reduced=True)
    seen = []
    encoder.module.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    patch = np.empty((1, 224, 224, 3), dtype=np.uint8)
    patch[..., :] = (200, 100, 50)
    encoder.transform(patch)
    mean, std = np.array(REGISTRY["hoptimus0"].mean), np.array(REGISTRY["hoptimus0"].std)
    expected = (np.array([200, 100, 50]) / 255 - mean) / std
    x = seen[0].numpy()
    assert x.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(x[0, :, 100, 100], expected, rtol=1e-5)
    small = np.full((1, 112, 112, 3), 80, dtype=np.uint8)  # another size is resized to the native 224 px
    encoder.transform(small)
    assert seen[-1].shape == (1, 3, 224, 224)


def test_virchow2_pools_class_token_and_patch_mean():
    encoder = quiet(spec="virchow2", reduced=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = encoder.module.trunk.forward_features(x)
        pooled = encoder.module(x)
    assert encoder.module.trunk.num_prefix_tokens == 5  # class token and 4 registers
    torch.testing.assert_close(pooled, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1))


def test_timm_and_hub_folder_encoders(tmp_path, patches):
    from safetensors.torch import save_file

    encoder = quiet(spec="timm:vit_small_patch16_224", img_size=64, batch_size=2)
    assert encoder.dim == 384 and encoder.patch_px == 64 and encoder.mpp is None
    small = patches[:2, :64, :64]
    features = encoder.transform(small)
    rebuilt = quiet(spec=encoder.get_params())
    np.testing.assert_array_equal(rebuilt.transform(small), features)
    file = tmp_path / "vits.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.module.state_dict().items()}, str(file))
    loaded = get_encoder("timm:vit_small_patch16_224", weights=file, img_size=64, device="cpu", mpp=0.5)
    np.testing.assert_array_equal(loaded.transform(small), features)
    assert loaded.mpp == 0.5
    folder = tmp_path / "hub_model"  # a hub repository downloaded as a folder: config.json and weights
    folder.mkdir()
    config = {
        "architecture": "vit_small_patch16_224",
        "num_classes": 0,
        "model_args": {"img_size": 64},
        "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in encoder.module.state_dict().items()}, str(folder / "model.safetensors"))
    hub = get_encoder("hf-hub:someone/vits", weights=folder, device="cpu")
    assert hub.patch_px == 64 and hub.mean == (0.5, 0.5, 0.5)
    np.testing.assert_allclose(
        hub.module(torch.zeros(1, 3, 64, 64)).detach().numpy(),
        encoder.module(torch.zeros(1, 3, 64, 64)).detach().numpy(),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="timm has no architecture"):
        get_encoder("timm:not_a_model", weights="random")


def test_several_devices_give_the_same_features(patches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OmxWarning)
        one = get_encoder("timm:vit_small_patch16_224", weights="random", img_size=64, device="cpu", batch_size=2)
    small = np.random.default_rng(2).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    expected = one.transform(small)
    one.set_devices(["cpu", "cpu"])  # two copies of the module, each taking a share
    assert len(one.devices) == 2
    np.testing.assert_allclose(one.transform(small), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_foundation_encoder_bf16_on_cuda(patches):
    """On CUDA the encoder runs in bfloat16 autocast; its features stay close to the float32 CPU ones."""
    cpu = quiet(spec="uni", reduced=True)
    gpu = get_encoder(cpu.get_params(), device="cuda")
    a, b = cpu.transform(patches), gpu.transform(patches)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    corr = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]
    assert min(corr) > 0.99
