"""Foundation backbones as image towers: frozen (a feature model), the last blocks trained, LoRA adapters."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from omx import OmxWarning  # noqa: E402
from omx.encoders import get_encoder  # noqa: E402
from omx.models import CNNRegressor, Contrastive, load  # noqa: E402
from omx.models._backbone import backbone_tower  # noqa: E402
from omx.models._finetune_net import BackboneTower, CheckpointedBlocks, LoRALinear, frozen_keys  # noqa: E402

FAST = {"epochs": 2, "batch_size": 8, "hidden": 16, "device": "cpu", "show_progress_bar": False}


def _random(name, **kwargs):
    with pytest.warns(OmxWarning, match="random weights"):
        return get_encoder(name, weights="random", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def vit():
    """A tiny timm ViT (3 blocks of width 192, 32 px patches) with random weights and a native 0.5 um/px."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OmxWarning)
        return get_encoder(
            "timm:vit_tiny_patch16_224", weights="random", device="cpu", img_size=32, patch_px=32, depth=3, mpp=0.5
        )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    Y = np.stack([patches[..., 0].mean((1, 2)), patches[..., 2].std((1, 2))], 1).astype(np.float32)
    return patches, Y, np.repeat(["a", "b", "c"], 8)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def last_blocks(vit, data):
    patches, Y, groups = data
    before = _weights(vit.module)
    model = CNNRegressor(backbone=vit, finetune="last_blocks", n_blocks=1, lr=1e-3, **FAST)
    return model.fit(patches, Y, groups=groups), before


@pytest.fixture(scope="module")
def lora(vit, data):
    patches, Y, groups = data
    before = _weights(vit.module)
    model = CNNRegressor(backbone=vit, finetune="lora", lora_rank=4, lr=1e-2, **FAST).fit(patches, Y, groups=groups)
    return model, before


def _changed(model, before, prefix="0.network."):
    """Names (as in the encoder's network) of the tower's tensors that differ from the encoder's own."""
    state = model.module_.state_dict()
    tower = {k[len(prefix) :].replace(".base.", "."): v for k, v in state.items() if k.startswith(prefix)}
    return sorted(k for k, v in before.items() if not torch.equal(tower[k], v))


# ---------------------------------------------------------------- frozen: a feature model on the backbone
def test_frozen_backbone_is_a_feature_model(vit, data):
    patches, Y, groups = data
    model = CNNRegressor(backbone=vit, **FAST)
    assert model.input == "features" and model.encoder is vit and model.backbone is vit and model.mpp is None
    assert model.uses == {"groups", "group_stats"} and CNNRegressor.input == "patches"  # the class default stays
    features = vit.transform(patches)
    pred = model.fit(features, Y, groups=groups).predict(features, groups=groups)
    assert pred.shape == Y.shape and np.isfinite(pred).all()
    assert not any(isinstance(m, BackboneTower) for m in model.module_.modules())  # the head alone: no image pass
    with pytest.raises(ValueError, match="encode them first"):
        model.predict(patches)
    with pytest.raises(ValueError, match="trains no image network"):
        model.as_encoder()
    contrastive = Contrastive(backbone=vit, neighbors=0, show_progress_bar=False)
    assert contrastive.input == "features" and contrastive.encoder is vit and contrastive.head == "ridge+features"
    assert contrastive.init_params_["encoder"] == "handcrafted"
    assert contrastive.init_params_["backbone"] == vit.get_params()


# ---------------------------------------------------------------- last blocks
def test_last_blocks_trains_only_the_last_blocks(last_blocks, vit, data):
    model, before = last_blocks
    assert model.input == "patches" and model.patch_px == 32 and model.mpp == 0.5
    np.testing.assert_allclose(model.input_mean_, vit.mean)
    np.testing.assert_allclose(model.input_std_, vit.std)
    changed = _changed(model, before)
    assert changed and all(k.startswith(("blocks.2.", "norm.")) for k in changed)  # blocks 0 and 1 untouched
    trunk = vit.module
    expected = sum(p.numel() for m in (trunk.blocks[2], trunk.norm, model.module_[1]) for p in m.parameters())
    assert sum(p.numel() for p in model.module_.parameters() if p.requires_grad) == expected
    assert all(torch.equal(v, before[k]) for k, v in vit.module.state_dict().items())  # the encoder never changes
    assert all(p.requires_grad for p in vit.module.parameters())
    tower = model.module_[0]
    shared = tower.network.blocks[0].attn.qkv.weight  # frozen tensors share the encoder's memory
    assert shared.data_ptr() == vit.module.blocks[0].attn.qkv.weight.data_ptr() and not shared.requires_grad
    assert tower.network.blocks[2].attn.qkv.weight.data_ptr() != vit.module.blocks[2].attn.qkv.weight.data_ptr()
    model.module_.train()
    assert not tower.network.training and not tower.network.blocks[1].training and tower.network.blocks[2].training
    model.module_.eval()


# ---------------------------------------------------------------- LoRA
def test_lora_starts_as_the_backbone():
    uni = _random("uni", reduced=True)  # UNI's layout (a PooledViT around a ViT-L), 2 blocks
    tower = backbone_tower(uni, "lora", n_blocks=2, lora_rank=4, gradient_checkpointing=False)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tower(x), uni.module(x), rtol=0, atol=0)
    adapters = [m for m in tower.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2 * 2 and all(m.rank == 4 and not m.lora_b.any() for m in adapters)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in trainable)


def test_lora_trains_only_adapters_and_head(lora, vit):
    model, before = lora
    assert not _changed(model, before)  # every weight of the backbone as it was
    trainable = {n for n, p in model.module_.named_parameters() if p.requires_grad}
    assert all(n.startswith("1.") or n.endswith(("lora_a", "lora_b")) for n in trainable)
    adapters = [m for m in model.module_.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2 * 3 and all(m.lora_b.abs().sum() > 0 for m in adapters)  # trained from zero
    d, r = 192, 4
    per_block = r * d + 3 * d * r + r * d + d * r  # qkv (d -> 3d) and proj (d -> d)
    head = sum(p.numel() for p in model.module_[1].parameters())
    assert sum(p.numel() for p in model.module_.parameters() if p.requires_grad) == 3 * per_block + head


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("which", ["last_blocks", "lora"])
def test_save_load_round_trip(which, request, vit, data, tmp_path):
    model, _ = request.getfixturevalue(which)
    patches, _, _ = data
    pred = model.predict(patches)
    model.save(tmp_path / "m")
    saved = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)["module"]
    assert set(saved) == set(model.module_.state_dict()) - frozen_keys(model.module_)  # only what trained
    n_saved = sum(v.numel() for v in saved.values())
    assert n_saved == sum(p.numel() for p in model.module_.parameters() if p.requires_grad)
    assert model.init_params_["backbone"] == vit.get_params()
    with pytest.warns(OmxWarning):  # the backbone is rebuilt from its parameters (here: seeded random weights)
        loaded = load(tmp_path / "m")
    assert loaded.backbone is not vit and loaded.mpp == 0.5
    np.testing.assert_array_equal(loaded.predict(patches), pred)
    if which == "last_blocks":  # a network of another shape does not take these weights
        with pytest.raises(RuntimeError, match="n_blocks"):
            load(tmp_path / "m", backbone=vit, n_blocks=2)


def test_contrastive_with_a_lora_backbone(vit, data, tmp_path):
    patches, Y, groups = data
    model = Contrastive(backbone=vit, finetune="lora", lora_rank=2, k=3, neighbors=0, embed_dim=8, **FAST)
    assert model.input == "patches" and model.patch_px == 32 and model.mpp == 0.5 and model.head == "ridge"
    assert model.encoder is None
    model.fit(patches, Y, groups=groups)
    assert isinstance(model.module_["image"][0], BackboneTower)
    pred = model.predict(patches, groups=groups)
    model.save(tmp_path / "c")
    loaded = load(tmp_path / "c", backbone=vit)
    np.testing.assert_array_equal(loaded.predict(patches, groups=groups), pred)


def test_checkpoint_resume_with_a_backbone(vit, data, tmp_path, monkeypatch):
    from omx.models._training import Checkpoint

    patches, Y, groups = data
    params = {**FAST, "epochs": 3, "patience": None, "backbone": vit, "finetune": "lora", "lora_rank": 2}
    full = CNNRegressor(**params).fit(patches, Y, groups=groups)
    save = Checkpoint.save

    def save_then_stop(self, state, *args):
        save(self, state, *args)
        raise KeyboardInterrupt  # the run dies right after its first epoch

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)
    interrupted = CNNRegressor(**params)
    interrupted.checkpoint_dir = tmp_path
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(patches, Y, groups=groups)
    monkeypatch.undo()
    written = torch.load(tmp_path / "checkpoint_1.pt", weights_only=True)["module"]
    assert written and not any(k.endswith(("qkv.base.weight", "patch_embed.proj.weight")) for k in written)
    resumed = CNNRegressor(**params)
    resumed.checkpoint_dir = tmp_path
    resumed.fit(patches, Y, groups=groups)
    assert resumed.history_ == full.history_
    np.testing.assert_array_equal(resumed.predict(patches), full.predict(patches))


def test_gradient_checkpointing_gives_the_same_gradients(vit):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        tower = backbone_tower(vit, "lora", n_blocks=2, lora_rank=2, gradient_checkpointing=checkpointing)
        for m in tower.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_b, generator=torch.Generator().manual_seed(2))
        tower.train()
        tower(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.requires_grad})
        assert isinstance(tower.network.blocks, CheckpointedBlocks) == checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


# ---------------------------------------------------------------- errors
def test_errors(vit):
    with pytest.raises(ValueError, match="no `backbone` was given"):
        CNNRegressor(finetune="lora")
    with pytest.raises(ValueError, match="finetune must be one of"):
        CNNRegressor(backbone=vit, finetune="all")
    with pytest.raises(ValueError, match="lora_rank must be a positive integer"):
        CNNRegressor(backbone=vit, finetune="lora", lora_rank=0)
    with pytest.raises(ValueError, match="n_blocks must be a positive integer"):
        CNNRegressor(backbone=vit, finetune="last_blocks", n_blocks=0)
    with pytest.raises(ValueError, match="n_blocks=4 is more than the 3 blocks"):
        CNNRegressor(backbone=vit, finetune="last_blocks", n_blocks=4)
    with pytest.raises(ValueError, match="has none"):
        CNNRegressor(backbone="handcrafted", finetune="lora")
    cnn = get_encoder(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)), patch_px=32)
    with pytest.raises(ValueError, match="needs a vision transformer with `.blocks`"):
        CNNRegressor(backbone=cnn, finetune="last_blocks")
    odd = torch.nn.Module()
    odd.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="attn.qkv"):
        Contrastive(backbone=get_encoder(odd, patch_px=32), finetune="lora")
    with pytest.raises(ValueError, match="takes patches of its own size"):
        CNNRegressor(backbone=vit, finetune="lora", patch_px=64)
    with pytest.raises(ValueError, match="takes patches, not image='features'"):
        Contrastive(backbone=vit, finetune="lora", image="features")
    with pytest.raises(ValueError, match="gives features, not image='patches'"):
        Contrastive(backbone=vit, image="patches")
    with pytest.raises(ValueError, match="not both"):
        Contrastive(backbone=vit, encoder=vit)
    assert CNNRegressor(backbone=cnn).input == "features"  # any encoder can be a frozen backbone


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_lora_fine_tunes_in_bfloat16_on_cuda(tmp_path):
    uni = _random("uni", reduced=True)  # on the CPU: the model trains its own copy on the GPU
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (48, 224, 224, 3), dtype=np.uint8)
    Y = np.stack([patches[..., 0].mean((1, 2)), patches[..., 2].mean((1, 2))], 1).astype(np.float32)
    groups = np.repeat(["a", "b", "c"], 16)
    model = CNNRegressor(
        backbone=uni, finetune="lora", gradient_checkpointing=True, epochs=2, batch_size=16, lr=1e-3,
        device="cuda", show_progress_bar=False,
    )  # fmt: skip
    seen = []  # (grad enabled, output dtype) of every adapter call

    def record(module, inputs, out):
        if isinstance(module, LoRALinear):
            seen.append((torch.is_grad_enabled(), out.dtype))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        model.fit(patches, Y, groups=groups)
    finally:
        hook.remove()
    assert {dtype for grad, dtype in seen if grad} == {torch.bfloat16}  # the training passes, in bfloat16
    pred = model.predict(patches)
    assert pred.shape == Y.shape and np.isfinite(pred).all()
    assert {p.device.type for p in model.module_.parameters()} == {"cuda"}
    assert all(m.lora_b.abs().sum() > 0 for m in model.module_.modules() if isinstance(m, LoRALinear))
    assert {p.device.type for p in uni.module.parameters()} == {"cpu"}  # the encoder stays where it was
    assert uni.transform(patches[:2]).shape == (2, 1024)
    model.save(tmp_path / "m")
    loaded = load(tmp_path / "m", backbone=uni)
    np.testing.assert_allclose(loaded.predict(patches), pred, rtol=1e-5, atol=1e-5)
