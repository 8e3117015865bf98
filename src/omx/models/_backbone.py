"""Foundation encoders as the image tower of a model: the arguments, their checks, and the tower's description.

Shared by `CNNRegressor` and `Contrastive`. Nothing here imports torch until a backbone is given; the networks
are in `omx.models._finetune_net`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omx.encoders import Encoder

#: How a model uses its backbone: its features as they are, or its last blocks or LoRA adapters trained.
FINETUNE = ("frozen", "last_blocks", "lora")


def check_finetune(finetune: str, n_blocks: int, lora_rank: int, *, has_backbone: bool) -> None:
    """Raise a `ValueError` for `finetune`, `n_blocks` or `lora_rank` values no backbone could use."""
    if finetune not in FINETUNE:
        raise ValueError(f"finetune must be one of {list(FINETUNE)}, got {finetune!r}.")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive integer, got {n_blocks!r}.")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
    if finetune != "frozen" and not has_backbone:
        raise ValueError(
            f"finetune={finetune!r} trains part of a foundation backbone, but no `backbone` was given: pass one "
            "(e.g. backbone='uni' or an omx Encoder), or leave finetune='frozen'."
        )


def resolve_backbone(backbone: Any, finetune: str, *, n_blocks: int, owner: str) -> Encoder:
    """The backbone as an `~omx.encoders.Encoder`, checked for the `finetune` mode.

    A trained mode needs a torch encoder whose network is a vision transformer with ``.blocks`` (at least
    `n_blocks` of them with ``"last_blocks"``; attention ``qkv`` and ``proj`` linear layers with ``"lora"``).
    """
    from omx.encoders import get_encoder

    encoder = get_encoder(backbone)
    if finetune == "frozen":
        return encoder
    network = getattr(encoder, "module", None)
    name = getattr(encoder, "name", type(encoder).__name__)
    if network is None:
        raise ValueError(
            f"{owner}: finetune={finetune!r} trains a torch network, and the {name!r} encoder has none; use "
            "finetune='frozen', or a foundation encoder such as 'uni'."
        )
    from omx.models._finetune_net import lora_targets, vit_trunk

    trunk = vit_trunk(network)
    if trunk is None:
        raise ValueError(
            f"{owner}: finetune={finetune!r} needs a vision transformer with `.blocks` (e.g. 'uni' or "
            f"'timm:vit_base_patch16_224'); the {name!r} encoder's network is a {type(network).__name__}. Use "
            "finetune='frozen' for this encoder."
        )
    depth = len(trunk.blocks)
    if finetune == "last_blocks" and n_blocks > depth:
        raise ValueError(f"{owner}: n_blocks={n_blocks} is more than the {depth} blocks of the {name!r} backbone.")
    if finetune == "lora" and not all(len(lora_targets(block)) == 2 for block in trunk.blocks):
        raise ValueError(
            f"{owner}: finetune='lora' adapts the `attn.qkv` and `attn.proj` linear layers of every block, which "
            f"the {name!r} backbone's blocks do not all have; use finetune='last_blocks'."
        )
    return encoder


def trained_patches(backbone: Encoder, patch_px: int | None) -> tuple[int, float | None]:
    """``(patch_px, mpp)`` of the patches a trained backbone takes: its own size and native resolution.

    A `patch_px` other than the backbone's raises a `ValueError`.
    """
    if patch_px is not None and int(patch_px) != backbone.patch_px:
        raise ValueError(
            f"A trained backbone takes patches of its own size ({backbone.patch_px} px), not patch_px={patch_px}; "
            "leave patch_px=None."
        )
    return int(backbone.patch_px), None if backbone.mpp is None else float(backbone.mpp)


def backbone_tower(encoder: Encoder, finetune: str, *, n_blocks: int, lora_rank: int, gradient_checkpointing: bool):
    """A new `~omx.models._finetune_net.BackboneTower` on the network of `encoder` (imports torch)."""
    from omx.models._finetune_net import BackboneTower

    return BackboneTower(
        encoder.module,
        dim=encoder.dim,
        finetune=finetune,
        n_blocks=n_blocks,
        lora_rank=lora_rank,
        gradient_checkpointing=gradient_checkpointing,
    )
