"""Torch encoders: a wrapper for any `torch.nn.Module` (foundation models from local weights) and a small CNN."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from omx._utils import get_device
from omx.encoders._base import Encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchEncoder(Encoder):
    """Encode patches with any frozen `torch.nn.Module` that maps ``(b, 3, H, W)`` images to ``(b, d)`` features.

    This is how a pathology foundation model (UNI, CONCH, H-optimus, Virchow, a ResNet, ...) plugs into omx:
    build the network in plain torch, load its weights from a local file, and wrap it. The module is put in
    eval mode and moved to `device`; it runs under `torch.inference_mode`, in batches; outputs with extra
    dimensions (e.g. ``(b, d, 1, 1)`` or token maps) are flattened to ``(b, -1)``.

    Parameters
    ----------
    module
        The network. Its input is float ``(b, 3, patch_px, patch_px)`` RGB in ``[0, 1]``, normalised with
        `mean` and `std` per channel.
    patch_px
        Side in pixels the module wants; patches of another size are resized (bilinear, anti-aliased) on the
        device.
    batch_size
        Patches per forward pass.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a `torch.device`.
    mean, std
        Per-channel normalisation of the ``[0, 1]`` input; ImageNet statistics by default, as most foundation
        models use.
    amp
        On CUDA, run the module under bfloat16 autocast (float16 where bfloat16 is unsupported). The CPU path
        always runs in float32.
    devices
        Devices to run copies of the module on, each taking a share of every call's patches (e.g.
        ``["cuda:0", "cuda:1"]``; `device` is one of them whether listed or not); ``"all"`` uses every CUDA
        device when `device` is CUDA. None runs on `device` alone.
    name
        Name of the encoder (for keys such as ``obsm["X_omx_<name>"]``); the lower-case class name of `module`
        by default.

    Examples
    --------
    Wrap a model whose weights are in a local file:

    >>> import torch
    >>> from omx.encoders import TorchEncoder
    >>> net = MyViT()  # doctest: +SKIP
    >>> net.load_state_dict(torch.load("uni_weights.pt", map_location="cpu", weights_only=True))  # doctest: +SKIP
    >>> encoder = TorchEncoder(net, patch_px=224, name="uni")  # doctest: +SKIP
    >>> features = encoder.transform(patches)  # doctest: +SKIP

    Any module works, e.g. a tiny one:

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
    >>> TorchEncoder(net, patch_px=32, device="cpu").dim
    8
    """

    accepts_any_size = True  # resized on the device, faster than in numpy

    def __init__(
        self,
        module: nn.Module,
        *,
        patch_px: int = 224,
        batch_size: int = 64,
        device: str | torch.device = "auto",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        amp: bool = True,
        devices: Sequence[str | torch.device] | str | None = "all",
        name: str | None = None,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("`mean` and `std` need one value per RGB channel (3 each).")
        self.device = get_device(device)
        self.module = module.to(self.device).eval()
        self.patch_px = int(patch_px)
        self.batch_size = max(1, int(batch_size))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.amp = bool(amp)
        self.name = name or type(module).__name__.lower()
        self._dim: int | None = None
        self.set_devices(devices)

    def set_devices(self, devices: Sequence[str | torch.device] | str | None) -> None:
        """Run copies of the module on `devices` (see the class parameters); the first is `device`'s."""
        if devices == "all":
            one = self.device.type != "cuda" or self.device.index is not None
            devices = None if one else [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        targets = [get_device(d) for d in devices or []]
        if _indexed(self.device) in [_indexed(d) for d in targets]:  # the module itself runs on `device`
            targets.pop([_indexed(d) for d in targets].index(_indexed(self.device)))
        self._replicas: list[tuple[nn.Module, torch.device]] = [(self.module, self.device)] + [
            (copy.deepcopy(self.module).to(d).eval(), d) for d in targets
        ]

    @property
    def devices(self) -> list[torch.device]:
        """The devices the module runs on."""
        return [d for _, d in self._replicas]

    @property
    def dim(self) -> int:
        """Length of the feature vector (found with one forward pass of a blank patch when first asked)."""
        if self._dim is None:
            self._dim = self._encode(np.zeros((1, self.patch_px, self.patch_px, 3), dtype=np.uint8)).shape[1]
        return self._dim

    def get_params(self) -> dict[str, Any]:
        """Return the JSON-able parameters; the module itself is not included and must be passed again."""
        return {
            "class": type(self).__name__,
            "module": type(self.module).__name__,
            "patch_px": self.patch_px,
            "batch_size": self.batch_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "amp": self.amp,
            "name": self.name,
        }

    def _transform(self, patches: np.ndarray) -> np.ndarray:
        out = self._encode(patches)
        self._dim = out.shape[1]
        return out

    def _encode(self, patches: np.ndarray) -> np.ndarray:
        if len(self._replicas) == 1:
            return self._encode_on(self.module, self.device, patches)
        # one share per device, whole batches each, run in threads (torch releases the GIL while it computes)
        bounds = np.linspace(0, len(patches), len(self._replicas) + 1).astype(int)
        with ThreadPoolExecutor(len(self._replicas)) as pool:
            parts = pool.map(
                lambda k: self._encode_on(*self._replicas[k], patches[bounds[k] : bounds[k + 1]]),
                range(len(self._replicas)),
            )
            return np.concatenate(list(parts), axis=0)

    def _encode_on(self, module: nn.Module, dev: torch.device, patches: np.ndarray) -> np.ndarray:
        """Encode on one device, waiting for it once per call.

        The patches go to pinned memory once, batches are converted on the device, and the features stay there
        until the last batch.
        """
        if len(patches) == 0:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        use_amp = self.amp and dev.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        host = torch.from_numpy(np.ascontiguousarray(patches))
        if dev.type == "cuda":
            host = host.pin_memory()
        out = []
        with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
            for i in range(0, len(patches), self.batch_size):
                x = to_tensor(host[i : i + self.batch_size], dev, size=self.patch_px)
                y = module((x - mean) / std)
                if isinstance(y, tuple | list):  # some models return (features, extras)
                    y = y[0]
                out.append(y.reshape(y.shape[0], -1).float())
        return torch.cat(out).cpu().numpy()


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index (``cuda`` is ``cuda:<current>``)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def to_tensor(patches: np.ndarray | torch.Tensor, device: torch.device, *, size: int | None = None) -> torch.Tensor:
    """Move ``uint8`` patches ``(b, H, W, 3)`` to `device` as float ``(b, 3, size, size)`` in ``[0, 1]``.

    The uint8 array travels to the device (through pinned memory on CUDA, without waiting) and is converted
    there. Patches of another side than `size` are resized bilinearly with anti-aliasing.
    """
    x = patches if isinstance(patches, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(patches))
    if device.type == "cuda":
        x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    else:
        x = x.to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if size is not None and x.shape[-1] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class _Block(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class SmallCNN(nn.Module):
    """A small residual CNN for histology patches, trained from scratch.

    Stem (5x5 conv, stride 2, then 2x2 max-pool: a quarter of the side), then three residual stages of
    `width`, 2 x `width` and 4 x `width` channels (the last two halve the side), global average pooling, and an
    optional linear projection. About 0.5 M parameters at ``width=32``; any input side of 16 px or more works.

    Parameters
    ----------
    out_dim
        Length of the output vector; None returns the pooled ``4 * width`` features without projection.
    width
        Channels of the first stage.
    in_channels
        Input channels (3 for RGB).
    """

    def __init__(self, out_dim: int | None = None, *, width: int = 32, in_channels: int = 3):
        super().__init__()
        self.out_dim = out_dim
        self.width = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.stages = nn.Sequential(
            _Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(4 * width, out_dim) if out_dim is not None else nn.Identity()
        self.dim = out_dim if out_dim is not None else 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(b, in_channels, H, W)`` images to ``(b, dim)`` features."""
        x = self.stages(self.stem(x))
        return self.proj(torch.flatten(self.pool(x), 1))
