"""Any timm model as an encoder: ``"timm:<architecture>"`` or ``"hf-hub:<org>/<name>"``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from omx.encoders._foundation import RANDOM, WEIGHT_FILES, hub_download, random_network
from omx.encoders._torch import IMAGENET_MEAN, IMAGENET_STD, TorchEncoder


class TimmEncoder(TorchEncoder):
    """A timm model, pooled as timm pools it (``num_classes=0``), with the preprocessing of its pretrained config.

    Parameters
    ----------
    encoder
        ``"timm:<architecture>"`` (e.g. ``"timm:resnet50"``, ``"timm:vit_small_patch16_224"``) or
        ``"hf-hub:<org>/<name>"`` (a timm model on the Hugging Face hub, with its ``config.json``).
    weights
        A local weight file, or (``hf-hub:``) the folder of the downloaded repository (``config.json`` and the
        weights); None downloads the published weights (needs network); ``"random"`` keeps random weights
        (tests and speed measurements only).
    mpp
        Resolution the model expects, in microns per pixel, if it has one; `omx.tl` then cuts patches of
        ``patch_px * mpp`` microns. None: patches span the spot (times the context), as for other encoders.
    patch_px
        Input side; by default that of the model's pretrained config (224 for most).
    token
        Hugging Face token for gated models.
    seed
        Seed of random weights.
    batch_size, device, amp
        As in `TorchEncoder`.
    **model_kwargs
        Passed to `timm.create_model` (e.g. ``img_size=``, ``global_pool=``).
    """

    def __init__(
        self,
        encoder: str,
        *,
        weights: str | os.PathLike | None = None,
        mpp: float | None = None,
        patch_px: int | None = None,
        token: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        device: str | torch.device = "auto",
        amp: bool = True,
        **model_kwargs: Any,
    ):
        import timm

        source, _, arch = encoder.partition(":")
        source = source.lower().replace("_", "-")
        if source not in ("timm", "hf-hub") or not arch:
            raise ValueError(f"Expected 'timm:<architecture>' or 'hf-hub:<org>/<name>', got {encoder!r}.")
        self.encoder_spec = f"{source}:{arch}"
        self.model_kwargs = dict(model_kwargs)
        self.seed = int(seed)
        kwargs = {"num_classes": 0, **model_kwargs}
        if source == "timm" and arch not in timm.list_models():
            raise ValueError(f"timm has no architecture {arch!r}; see `timm.list_models('*vit*')`.")
        if weights == RANDOM:
            if source == "hf-hub":
                raise ValueError("Random weights need a timm architecture: use 'timm:<architecture>'.")
            module = random_network(encoder, self.seed, lambda: timm.create_model(arch, pretrained=False, **kwargs))
            self.weights = RANDOM
        elif source == "hf-hub":
            folder = Path(weights).expanduser() if weights is not None else None
            if folder is None:
                folder = Path(hub_download(arch, "config.json", token=token, what=encoder)).parent
                for name in WEIGHT_FILES:
                    try:
                        hub_download(arch, name, token=token, what=encoder)
                        break
                    except (FileNotFoundError, ConnectionError):
                        continue
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"{folder} has no config.json: for 'hf-hub:' pass `weights=` the folder of the downloaded "
                    f"repository (`huggingface-cli download {arch} --local-dir <folder>`)."
                )
            module = timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
            self.weights = str(folder)
        else:
            overlay = None
            if weights is not None:
                path = Path(weights).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"Weight file {path} does not exist.")
                overlay = {"file": str(path)}
            try:  # timm's own loader: it maps and drops the classifier of the published weights
                module = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            except RuntimeError as err:
                if weights is None:
                    raise
                raise ValueError(f"The weights in {weights} do not fit timm's {arch!r}: {err}") from err
            except Exception as err:  # noqa: BLE001 - without a file, timm downloads; every failure means "no weights"
                if weights is not None:
                    raise
                raise ConnectionError(
                    f"timm could not download the weights of {arch!r} ({type(err).__name__}: {err}). Download them "
                    "on a machine with internet access (`timm.create_model(arch, pretrained=True)` caches them under "
                    "~/.cache/huggingface), copy the weight file here and pass `weights=<file>`."
                ) from err
            self.weights = None if weights is None else str(Path(weights).expanduser())
        cfg = getattr(module, "pretrained_cfg", {}) or {}
        img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)  # a ViT built for another size
        native_px = img_size[-1] if img_size else cfg.get("input_size", (3, 224, 224))[-1]
        super().__init__(
            module,
            patch_px=int(patch_px or native_px),
            batch_size=batch_size,
            device=device,
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
            amp=amp,
            name=arch.split("/")[-1].lower().replace("-", "_"),
        )
        self.mpp = None if mpp is None else float(mpp)

    def get_params(self) -> dict[str, Any]:
        """Return the JSON-able parameters that rebuild this encoder (the weights by their path)."""
        return {
            "class": type(self).__name__,
            "encoder": self.encoder_spec,
            "weights": self.weights,
            "mpp": self.mpp,
            "patch_px": self.patch_px,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "amp": self.amp,
            **self.model_kwargs,
        }
