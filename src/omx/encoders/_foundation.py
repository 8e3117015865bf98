"""Pathology foundation encoders by name: architectures (timm), preprocessing, pooling and weights.

Each registered encoder is an `EncoderSpec`: how to build its network with random weights (a timm architecture
and its keyword arguments), where its weights live on the Hugging Face hub, how its authors preprocess and pool,
and the resolution it was trained at. `FoundationEncoder` builds the network, loads the weights from a local
file (or from the hub when the machine can reach it) and encodes patches like any `TorchEncoder`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omx._settings import warn
from omx.encoders._torch import IMAGENET_MEAN, IMAGENET_STD, TorchEncoder

#: Normalisation of the H-optimus models (their authors' statistics of H&E patches).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: Normalisation of OpenAI's CLIP, which CONCH uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: What ``weights=`` takes to build an encoder with random weights (for tests and speed measurements only).
RANDOM = "random"
#: Weight files looked for, in this order, when ``weights=`` is a directory (e.g. a hub snapshot).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth", "model.pt")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything omx knows about one named pathology encoder.

    Attributes
    ----------
    name
        The canonical name (also the ``<name>`` of ``obsm["X_omx_<name>"]``).
    description
        Who made it and what it is, in one line.
    arch
        The timm architecture of the network (or of its trunk, for CONCH).
    kwargs
        Keyword arguments of `timm.create_model` that give the published configuration.
    hub_id, hub_file
        The Hugging Face repository and the weight file in it.
    licence
        Licence and access terms (most of these models are gated: accept the terms on the hub page first).
    patch_px
        Input side in pixels.
    mpp
        Native resolution in microns per pixel (the magnification the model was trained at).
    dim
        Length of the embedding.
    pooling
        ``"cls"`` (class token), ``"cls+mean"`` (class token and the mean of the patch tokens, concatenated) or
        ``"conch"`` (CONCH's attentional pooler).
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB input.
    n_params
        Parameters of the published network (checked by the tests).
    reduced
        Keyword arguments that shrink the architecture for quick tests (same layout, fewer blocks).
    aliases
        Other spellings accepted by `omx.encoders.get_encoder`.
    convert
        Name of the function that maps the published state dict onto the timm layout (see `CONVERTERS`).
    """

    name: str
    description: str
    arch: str
    kwargs: Mapping[str, Any]
    hub_id: str
    hub_file: str
    licence: str
    patch_px: int
    mpp: float
    dim: int
    pooling: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    n_params: int | None = None
    reduced: Mapping[str, Any] = field(default_factory=lambda: {"depth": 2})
    aliases: tuple[str, ...] = ()
    convert: str | None = None

    @property
    def patch_um(self) -> float:
        """Side of the patch in microns at the native resolution."""
        return self.patch_px * self.mpp


def _swiglu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


#: Keyword arguments that name torch classes, filled in when the network is built (so the table imports no timm).
_LIVE_KWARGS: dict[str, Callable[[], dict[str, Any]]] = {"swiglu": _swiglu}

_GATED = "gated on the Hugging Face hub: log in and accept the terms on {url} before downloading"

REGISTRY: dict[str, EncoderSpec] = {}


def register(spec: EncoderSpec) -> EncoderSpec:
    """Add `spec` to the encoders `omx.encoders.get_encoder` knows by name (and by its aliases)."""
    for key in (spec.name, *spec.aliases):
        REGISTRY[_normalise(key)] = spec
    return spec


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def registered() -> list[str]:
    """Canonical names of the registered encoders."""
    return sorted({spec.name for spec in REGISTRY.values()})


def get_spec(name: str) -> EncoderSpec | None:
    """The spec registered under `name` (any spelling: case, ``-`` and ``_`` do not matter), or None."""
    return REGISTRY.get(_normalise(name))


def network(spec: EncoderSpec, *, reduced: bool = False, device: str | torch.device | None = None) -> nn.Module:
    """Build the network of `spec` with random weights: the published configuration, or a reduced one.

    Parameters
    ----------
    spec
        The encoder.
    reduced
        Apply ``spec.reduced`` (fewer blocks), for quick tests.
    device
        Where to build it; ``"meta"`` builds the shapes without allocating memory.
    """
    import timm

    kwargs = dict(spec.kwargs)
    for key in [k for k in kwargs if k in _LIVE_KWARGS and kwargs[k]]:
        kwargs.pop(key)
        kwargs.update(_LIVE_KWARGS[key]())
    if reduced:
        kwargs.update(spec.reduced)
    with torch.device(device) if device is not None else _nullcontext():
        trunk = timm.create_model(spec.arch, pretrained=False, **kwargs)
        if spec.pooling == "conch":
            from omx.encoders._conch import ConchVisual

            return ConchVisual(trunk)
        return PooledViT(trunk, spec.pooling)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class PooledViT(nn.Module):
    """A timm vision transformer followed by its authors' pooling of the output tokens.

    ``"cls"`` is the class token; ``"cls+mean"`` concatenates it with the mean of the patch tokens (register
    tokens left out); ``"mean"`` is that mean alone. The weights belong to `trunk`, under timm's names.
    """

    def __init__(self, trunk: nn.Module, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "cls+mean", "mean"):
            raise ValueError(f"pooling must be 'cls', 'cls+mean' or 'mean', got {pooling!r}.")
        self.trunk = trunk
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(b, 3, H, W)`` normalised images to ``(b, dim)`` embeddings."""
        tokens = self.trunk.forward_features(x)
        n_prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
        if self.pooling == "cls":
            return tokens[:, 0]
        mean = tokens[:, n_prefix:].mean(dim=1)
        return mean if self.pooling == "mean" else torch.cat([tokens[:, 0], mean], dim=1)


class FoundationEncoder(TorchEncoder):
    """A registered pathology foundation model (UNI, H-optimus, Virchow2, ...), ready to encode patches.

    Built by `omx.encoders.get_encoder` from a name; the network, its preprocessing (input size, normalisation),
    its pooling and its native resolution come from the encoder's `EncoderSpec`. `omx.tl` cuts patches of
    ``patch_px * mpp`` microns for it, so each patch is seen at the resolution the model was trained at whatever
    the slide's own resolution.

    Parameters
    ----------
    encoder
        A registered name (see `omx.encoders.registered`).
    weights
        A local weight file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``) or a folder holding one (e.g. a hub
        snapshot); None downloads the published file from the hub (cached; needs network, and a token for a
        gated model); ``"random"`` keeps random weights, which is only useful to test code and measure speed.
    token
        Hugging Face token for gated models (else ``HF_TOKEN`` or the login of ``huggingface-cli login``).
    reduced
        Build a reduced architecture (fewer blocks), for tests; only with ``weights="random"``.
    seed
        Seed of the random weights (``weights="random"``), so that rebuilding gives the same network.
    batch_size, device, amp
        As in `TorchEncoder`.
    """

    def __init__(
        self,
        encoder: str,
        *,
        weights: str | os.PathLike | None = None,
        token: str | None = None,
        reduced: bool = False,
        seed: int = 0,
        batch_size: int = 64,
        device: str | torch.device = "auto",
        amp: bool = True,
    ):
        spec = get_spec(encoder)
        if spec is None:
            raise ValueError(f"Unknown encoder {encoder!r}; registered: {registered()}.")
        if reduced and weights != RANDOM:
            raise ValueError("`reduced=True` builds a smaller network, which only random weights fit.")
        self.spec = spec
        self.reduced = bool(reduced)
        self.seed = int(seed)
        if weights == RANDOM:
            module = random_network(spec.name, self.seed, lambda: network(spec, reduced=reduced))
            self.weights = RANDOM
        else:
            module = network(spec, device="meta")
            path = find_weights(spec, weights, token=token)
            load_weights(module, read_state_dict(path), spec=spec, source=str(path))
            self.weights = str(path)
        super().__init__(
            module,
            patch_px=spec.patch_px,
            batch_size=batch_size,
            device=device,
            mean=spec.mean,
            std=spec.std,
            amp=amp,
            name=spec.name,
        )
        self.mpp = spec.mpp
        self._dim = None if reduced else spec.dim

    def get_params(self) -> dict[str, Any]:
        """Return the JSON-able parameters that rebuild this encoder (the weights by their path)."""
        return {
            "class": type(self).__name__,
            "encoder": self.spec.name,
            "weights": self.weights,
            "reduced": self.reduced,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "amp": self.amp,
        }


# ---------------------------------------------------------------------------------------------------- weights
def random_network(name: str, seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under a fixed seed (the same network each time), with a warning that its features mean nothing."""
    warn(
        f"Encoder {name!r} has random weights: its features carry no meaning. Use them to test code or measure "
        "speed only."
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def find_weights(spec: EncoderSpec, weights: str | os.PathLike | None, *, token: str | None = None) -> Path:
    """The local weight file of `spec`: `weights` itself, a file inside the folder `weights`, or the hub's."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            for name in (spec.hub_file, *WEIGHT_FILES):
                if (path / name).is_file():
                    return path / name
            raise FileNotFoundError(
                f"The folder {path} holds none of the weight files {[spec.hub_file, *WEIGHT_FILES]}; pass the file "
                "itself as `weights=`."
            )
        if not path.is_file():
            raise FileNotFoundError(f"Weight file {path} does not exist.")
        return path
    return Path(hub_download(spec.hub_id, spec.hub_file, token=token, what=f"encoder {spec.name!r}"))


def hub_download(repo_id: str, filename: str, *, token: str | None = None, what: str = "the weights") -> str:
    """Download (or find in the local hub cache) one file of a Hugging Face repository, with errors that say what to do.

    Without network the error explains how to fetch the file on another machine and pass it as ``weights=``.
    """
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as err:  # pragma: no cover - a dependency
        raise ImportError("Downloading weights needs huggingface_hub: `pip install huggingface_hub`.") from err
    url = f"https://huggingface.co/{repo_id}"
    how = (
        f"On a machine with internet access: `huggingface-cli login` (and accept the terms on {url} if the model "
        f"is gated), then `huggingface-cli download {repo_id} {filename} --local-dir weights/{repo_id}`; copy that "
        f"file here and pass `weights='weights/{repo_id}/{filename}'`."
    )
    try:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not hub_reachable():
            raise ConnectionError(
                f"The Hugging Face hub cannot be reached from this machine, and {filename} of "
                f"{repo_id} is not in its cache. {how}"
            )
        return hf_hub_download(repo_id, filename, token=token)
    except ConnectionError:
        raise
    except GatedRepoError as err:
        raise PermissionError(
            f"{repo_id} is gated: the hub refused {filename} to this account. Accept the terms on {url}, then pass "
            f"a token (`token=` or HF_TOKEN), or download it elsewhere. {how}"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"The hub has no repository {repo_id!r} (or it is private). {how}") from err
    except Exception as err:  # noqa: BLE001 - connection errors come in many classes; all mean "no download"
        raise ConnectionError(
            f"Could not download {filename} of {repo_id} for {what} ({type(err).__name__}: {err}). {how}"
        ) from err


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within `timeout` seconds (so offline fails fast)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, or from a torch pickle (``.bin``, ``.pth``, ``.pt``) safely."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not a state dict
        raise ValueError(
            f"Could not read {path} as weights ({type(err).__name__}: {err}). Pass a .safetensors file or a torch "
            "state dict saved with `torch.save(model.state_dict(), path)`."
        ) from err
    for key in ("state_dict", "model", "teacher"):  # checkpoints that wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return obj


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove the first of `prefixes` that every key starts with (repeatedly: ``module.model.`` goes too)."""
    while True:
        for prefix in prefixes:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                break
        else:
            return state


#: Prefixes that training wrappers add to every key (DDP, Lightning, timm's hub models).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "encoder.")


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], *, spec: EncoderSpec | None, source: str) -> None:
    """Load `state` into the encoder network `module` exactly, or raise an error naming the keys that do not fit.

    The state is first mapped onto timm's names (the spec's converter) and stripped of wrapper prefixes. Every
    key must exist on both sides with the same shape: a file of another model never loads half-way.
    """
    target = module.trunk if isinstance(module, PooledViT) else module  # CONCH's tower loads whole
    state = strip_prefix(state, WRAPPER_PREFIXES)
    if spec is not None and spec.convert is not None:
        state = strip_prefix(CONVERTERS[spec.convert](state), WRAPPER_PREFIXES)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        name = f"encoder {spec.name!r} ({spec.arch})" if spec is not None else f"this {type(target).__name__}"
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing from the file, e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} keys in the file that the model lacks, e.g. {unexpected[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape, e.g. {shapes[:3]}")
        raise ValueError(
            f"The weights in {source} do not fit {name}: {'; '.join(parts)}. Check that the file is the one "
            f"published for this model{f' ({spec.hub_id}/{spec.hub_file})' if spec is not None else ''}."
        )
    dtypes = {k: v.dtype for k, v in expected.items()}
    target.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()}, strict=True, assign=True)
    if left := [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]:
        raise RuntimeError(f"Tensors {left[:5]} of the encoder were not loaded; this is a bug in omx.")


def phikon_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face transformers ``Dinov2Model`` state dict (Phikon-v2) onto timm's VisionTransformer names.

    Query, key and value projections are concatenated into timm's ``qkv``; layer scales become ``ls1/ls2.gamma``.
    A state dict already in timm's layout passes through unchanged.
    """
    state = strip_prefix(state, ("dinov2.", "model."))
    if not any(k.startswith("embeddings.") for k in state):
        return state
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
            continue
        if key == "embeddings.mask_token":  # used in pre-training only
            continue
        if key.startswith("encoder.layer."):
            idx, rest = key[len("encoder.layer.") :].split(".", 1)
            if rest.startswith("attention.attention."):
                proj, kind = rest[len("attention.attention.") :].split(".")
                qkv.setdefault((idx, kind), {})[proj] = value
                continue
            for old, new in block.items():
                if rest.startswith(old):
                    out[f"blocks.{idx}.{new}{rest[len(old) :]}"] = value
                    break
            else:
                out[key] = value  # left as is: the loader names it as unexpected
            continue
        out[key] = value
    for (idx, kind), parts in qkv.items():
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def conch_visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the image tower (``visual.*``) of a CONCH checkpoint, under the names of `ConchVisual`."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return state


#: State-dict converters by name (`EncoderSpec.convert`).
CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "phikon": phikon_to_timm,
    "conch": conch_visual,
}


# ---------------------------------------------------------------------------------------------------- registry
register(
    EncoderSpec(
        name="uni",
        description="UNI (Mahmood Lab, 2024): ViT-L/16 trained with DINOv2 on 100 M patches of 100k slides",
        arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        hub_id="MahmoodLab/UNI",
        hub_file="pytorch_model.bin",
        licence="CC-BY-NC-ND 4.0, academic research only; "
        + _GATED.format(url="https://huggingface.co/MahmoodLab/UNI"),
        patch_px=224,
        mpp=0.5,
        dim=1024,
        pooling="cls",
        n_params=303_350_784,
        aliases=("uni_v1", "uni1"),
    )
)
register(
    EncoderSpec(
        name="uni2_h",
        description="UNI2-h (Mahmood Lab, 2025): ViT-H/14 with 8 register tokens, 200 M patches of 350k slides",
        arch="vit_giant_patch14_224",
        kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "swiglu": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        hub_id="MahmoodLab/UNI2-h",
        hub_file="pytorch_model.bin",
        licence="CC-BY-NC-ND 4.0, academic research only; "
        + _GATED.format(url="https://huggingface.co/MahmoodLab/UNI2-h"),
        patch_px=224,
        mpp=0.5,
        dim=1536,
        pooling="cls",
        n_params=681_394_176,
        aliases=("uni2h", "uni2"),
    )
)
for _name, _hub, _year in (
    ("h_optimus_0", "bioptimus/H-optimus-0", 2024),
    ("h_optimus_1", "bioptimus/H-optimus-1", 2025),
):
    register(
        EncoderSpec(
            name=_name,
            description=f"{_hub.split('/')[1]} (Bioptimus, {_year}): ViT-g/14 with 4 register tokens",
            arch="vit_giant_patch14_reg4_dinov2",
            kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
            hub_id=_hub,
            hub_file="pytorch_model.bin",
            licence=(
                "Apache 2.0"
                if _name == "h_optimus_0"
                else "CC-BY-NC-ND 4.0, non-commercial; " + _GATED.format(url=f"https://huggingface.co/{_hub}")
            ),
            patch_px=224,
            mpp=0.5,
            dim=1536,
            pooling="cls",
            n_params=1_134_774_272,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            aliases=(_hub.split("/")[1], _name.replace("_", "")),
        )
    )
register(
    EncoderSpec(
        name="virchow2",
        description="Virchow2 (Paige, 2024): ViT-H/14 with 4 register tokens, 3.1 M slides at several magnifications",
        arch="vit_huge_patch14_224",
        kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "swiglu": True,
            "reg_tokens": 4,
        },
        hub_id="paige-ai/Virchow2",
        hub_file="pytorch_model.bin",
        licence="CC-BY-NC-ND 4.0, non-commercial; " + _GATED.format(url="https://huggingface.co/paige-ai/Virchow2"),
        patch_px=224,
        mpp=0.5,
        dim=2560,
        pooling="cls+mean",
        n_params=631_239_424,
    )
)
register(
    EncoderSpec(
        name="phikon_v2",
        description="Phikon-v2 (Owkin, 2024): ViT-L/16 trained with DINOv2 on 460 M patches (PANCAN-XL)",
        arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        hub_id="owkin/phikon-v2",
        hub_file="model.safetensors",
        licence="Owkin non-commercial licence",
        patch_px=224,
        mpp=0.5,
        dim=1024,
        pooling="cls",
        n_params=303_350_784,
        convert="phikon",
        aliases=("phikon2",),
    )
)
register(
    EncoderSpec(
        name="gigapath",
        description="Prov-GigaPath tile encoder (Providence and Microsoft, 2024): ViT-g/14 on 1.3 B tiles",
        arch="vit_giant_patch14_dinov2",
        kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        hub_id="prov-gigapath/prov-gigapath",
        hub_file="pytorch_model.bin",
        licence="Apache 2.0 with research-use terms; "
        + _GATED.format(url="https://huggingface.co/prov-gigapath/prov-gigapath"),
        patch_px=224,
        mpp=0.5,
        dim=1536,
        pooling="cls",
        n_params=1_134_953_984,
        aliases=("prov_gigapath", "gigapath_tile"),
    )
)
register(
    EncoderSpec(
        name="conch",
        description="CONCH (Mahmood Lab, 2024): CoCa image tower, ViT-B/16 at 448 px, trained on 1.17 M captions",
        arch="vit_base_patch16_224",
        kwargs={"img_size": 448, "patch_size": 16, "num_classes": 0, "dynamic_img_size": True},
        hub_id="MahmoodLab/CONCH",
        hub_file="pytorch_model.bin",
        licence="CC-BY-NC-ND 4.0, academic research only; "
        + _GATED.format(url="https://huggingface.co/MahmoodLab/CONCH"),
        patch_px=448,
        mpp=0.5,
        dim=512,
        pooling="conch",
        n_params=90_392_832,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        convert="conch",
        aliases=("conch_v1",),
    )
)
