"""The torch side of fine-tuned foundation backbones: a LoRA linear layer, the image tower, and their saved state.

`BackboneTower` turns the network of a foundation encoder (a timm vision transformer, alone or inside
`~omx.encoders._foundation.PooledViT`) into a trainable image tower: frozen except its last blocks and final norm
(``"last_blocks"``) or low-rank adapters on the attention of every block (``"lora"``). `trained_state_dict` and
`load_trained_state` save and restore a module holding such towers without their frozen weights, which are
rebuilt from the encoder's own weight file.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen `torch.nn.Linear` plus a trainable low-rank update: ``base(x) + (alpha / rank) * B(A(x))``.

    ``A`` (``rank x in_features``) starts like the weight of a new `~torch.nn.Linear` (Kaiming uniform), ``B``
    (``out_features x rank``) at zero, so the layer starts as `base` exactly. The update is never merged into the
    base's weight, which stays frozen (and may be shared with the encoder the tower was built from).

    Parameters
    ----------
    base
        The linear layer to adapt.
    rank
        Rank of the update.
    alpha
        Scale of the update is ``alpha / rank``; None makes it 1.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear adapts an nn.Linear, got {type(base).__name__}.")
        if rank < 1:
            raise ValueError(f"The LoRA rank must be at least 1, got {rank}.")
        self.base = base
        self.rank = int(rank)
        self.scale = (float(rank) if alpha is None else float(alpha)) / self.rank
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(self.rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, self.rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus the scaled low-rank update."""
        update = nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)
        return self.base(x) + self.scale * update

    def extra_repr(self) -> str:  # noqa: D102
        return f"rank={self.rank}, scale={self.scale:g}"


class CheckpointedBlocks(nn.Sequential):
    """Transformer blocks whose activations are recomputed in the backward pass where gradients flow through them.

    Same children and state-dict names as the `~torch.nn.Sequential` it replaces. A block is checkpointed
    (non-reentrant, so it works whether or not its input needs a gradient) when it holds trainable parameters
    and gradients are being recorded; frozen blocks run as usual.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        from torch.utils.checkpoint import checkpoint

        for block in self:
            if torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def vit_trunk(network: nn.Module) -> nn.Module | None:
    """The vision transformer of an encoder's network (`PooledViT.trunk`, or the network itself), or None.

    A vision transformer here is a module with a non-empty ``blocks`` (`~torch.nn.Sequential` or
    `~torch.nn.ModuleList`) of transformer blocks, as timm's ``VisionTransformer`` has.
    """
    for candidate in (getattr(network, "trunk", None), network):
        blocks = getattr(candidate, "blocks", None)
        if isinstance(candidate, nn.Module) and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
            return candidate
    return None


def lora_targets(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(attention module, name)`` of the linear layers LoRA adapts in one block: ``attn.qkv`` and ``attn.proj``."""
    attn = getattr(block, "attn", None)
    return [(attn, name) for name in ("qkv", "proj") if isinstance(getattr(attn, name, None), nn.Linear)]


def _trained_modules(trunk: nn.Module, n_blocks: int) -> list[nn.Module]:
    """What ``"last_blocks"`` trains: the last `n_blocks` blocks and the final norms that hold parameters."""
    norms = [getattr(trunk, name, None) for name in ("norm", "fc_norm")]
    norms = [m for m in norms if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    return [*list(trunk.blocks)[-n_blocks:], *norms]


class BackboneTower(nn.Module):
    """A foundation encoder's network as an image tower, frozen except its last blocks or LoRA adapters.

    The tower holds its own copy of the network: the tensors it trains are copied, the frozen ones share memory
    with the encoder's (as new, frozen parameter objects: moving or training the tower never changes the
    encoder). Frozen parts stay in eval mode (no dropout or drop-path) while the tower trains.

    Parameters
    ----------
    network
        The encoder's network (``encoder.module``), mapping normalised images ``(b, 3, H, W)`` to ``(b, dim)``.
    dim
        Length of its output.
    finetune
        ``"last_blocks"``: train the last `n_blocks` transformer blocks and the final norm; ``"lora"``: train
        low-rank adapters (`LoRALinear`) on the attention's ``qkv`` and ``proj`` linear layers of every block.
    n_blocks
        Blocks trained with ``"last_blocks"``.
    lora_rank
        Rank of the adapters with ``"lora"``.
    gradient_checkpointing
        Recompute the activations of the blocks that train in the backward pass instead of storing them
        (less memory, about a third more compute).
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        dim: int,
        finetune: str,
        n_blocks: int = 2,
        lora_rank: int = 8,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if finetune not in ("last_blocks", "lora"):
            raise ValueError(f"A BackboneTower trains 'last_blocks' or 'lora', got {finetune!r}.")
        trunk = vit_trunk(network)
        if trunk is None:
            raise ValueError(f"A {type(network).__name__} has no transformer `.blocks` to fine-tune.")
        copied = (
            {id(t) for m in _trained_modules(trunk, n_blocks) for t in m.parameters()}
            if finetune == "last_blocks"
            else set()
        )
        memo: dict[int, torch.Tensor] = {}
        for tensor in (*network.parameters(), *network.buffers()):
            if id(tensor) not in copied:  # shared memory, own (frozen) object
                shared = tensor.detach()
                if isinstance(tensor, nn.Parameter):
                    shared = nn.Parameter(shared, requires_grad=False)
                memo[id(tensor)] = shared
        self.network = copy.deepcopy(network, memo)
        self.network.requires_grad_(False)
        self.dim = int(dim)
        self.finetune = finetune
        trunk = vit_trunk(self.network)
        self._trained: list[nn.Module] = []  # a plain list: these modules are registered under `network` already
        if finetune == "last_blocks":
            self._trained = _trained_modules(trunk, n_blocks)
            for module in self._trained:
                module.requires_grad_(True)
        else:
            for block in trunk.blocks:
                for parent, name in lora_targets(block):
                    setattr(parent, name, LoRALinear(getattr(parent, name), lora_rank))
        if gradient_checkpointing:
            if not isinstance(trunk.blocks, nn.Sequential):
                raise ValueError("gradient_checkpointing needs the transformer blocks in an nn.Sequential.")
            trunk.blocks = CheckpointedBlocks(*trunk.blocks)
        self.train(False)

    def train(self, mode: bool = True) -> BackboneTower:
        """Set training mode on the parts that train; the frozen parts stay in eval mode."""
        super().train(mode)
        self.network.eval()
        for module in self._trained if mode else ():
            module.train()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images ``(b, 3, H, W)`` to ``(b, dim)`` embeddings, as the encoder's network does."""
        y = self.network(x)
        if isinstance(y, tuple | list):
            y = y[0]
        return y.reshape(y.shape[0], -1)


def mlp_head(d_in: int, n_out: int, *, hidden: int, dropout: float) -> nn.Module:
    """Regression head: ``Linear(d_in, hidden)``, GELU, dropout, ``Linear(hidden, n_out)``; linear if `hidden` is 0."""
    if not hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, n_out))
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


# ---------------------------------------------------------------------------------------------------- state
def frozen_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the frozen backbone tensors in the `BackboneTower` parts of `module`."""
    keys: set[str] = set()
    for prefix, part in module.named_modules():
        if isinstance(part, BackboneTower):
            at = f"{prefix}." if prefix else ""
            trained = {f"{at}{name}" for name, p in part.named_parameters() if p.requires_grad}
            keys.update(key for key in (f"{at}{k}" for k in part.state_dict()) if key not in trained)
    return keys


def trained_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `module` without frozen backbone tensors (the whole state dict when it has no tower)."""
    frozen = frozen_keys(module)
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def load_trained_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `trained_state_dict` into `module`; every tensor but the frozen backbone's must be there."""
    frozen = frozen_keys(module)
    if not frozen:
        module.load_state_dict(state)
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    if (missing := sorted(set(missing) - frozen)) or unexpected:
        raise RuntimeError(
            f"The saved weights do not fit this network: {len(missing)} trained tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}). Was it saved with other `finetune`, "
            "`n_blocks` or `lora_rank`?"
        )
