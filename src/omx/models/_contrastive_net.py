"""The torch networks of `Contrastive`: image and expression towers, spot-context attention, regression head.

Functions import torch when called, so that importing omx does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def contrastive_module(
    d_in: int,
    n_targets: int,
    n_out: int,
    *,
    image: str,
    width: int,
    hidden: int,
    embed_dim: int,
    dropout: float,
    context: bool,
    temperature: float,
    learn_temperature: bool,
    tower: torch.nn.Module | None = None,
) -> torch.nn.ModuleDict:
    """The networks of a `Contrastive` model, in one ``ModuleDict``.

    Parameters
    ----------
    d_in
        Feature dimension (``image="features"``; unused for patches).
    n_targets
        Targets the expression tower reads.
    n_out
        Outputs of the regression head (targets or their principal components).
    image
        ``"features"`` (an MLP tower) or ``"patches"`` (`~omx.encoders.SmallCNN`, or `tower`, then an MLP).
    width
        Channels of the CNN's first stage.
    hidden
        Width of the towers' hidden layer (0: linear towers).
    embed_dim
        Dimension of the shared embedding.
    dropout
        Dropout in the towers.
    context
        Add the spot-context attention layer (``"context"``).
    temperature
        Initial InfoNCE temperature.
    learn_temperature
        Whether the log temperature is trained.
    tower
        The image network of ``image="patches"`` in place of the CNN (a fine-tuned backbone, with its ``dim``).

    Returns
    -------
    ``image``, ``expression``, ``head``, optionally ``context``, and the parameter ``log_temperature``.
    """
    import torch
    from torch import nn

    def mlp(d: int) -> nn.Module:
        if not hidden:  # linear tower
            return nn.Sequential(nn.Dropout(dropout), nn.Linear(d, embed_dim))
        return nn.Sequential(
            nn.Linear(d, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
        )

    if image == "patches":
        from omx.encoders._torch import SmallCNN

        network = tower if tower is not None else SmallCNN(None, width=width)
        image_tower = nn.Sequential(network, mlp(network.dim))
    else:
        image_tower = mlp(d_in)
    module = nn.ModuleDict({"image": image_tower, "expression": mlp(n_targets), "head": nn.Linear(embed_dim, n_out)})
    if context:
        module["context"] = context_layer(embed_dim)
    module.register_parameter(
        "log_temperature",
        nn.Parameter(torch.tensor(float(np.log(temperature))), requires_grad=learn_temperature),
    )
    return module


def context_layer(dim: int, heads: int = 4) -> torch.nn.Module:
    """One attention layer: a spot's embedding attends to itself and its neighbours (residual, layer norm)."""
    import torch
    from torch import nn

    class Context(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.norm = nn.LayerNorm(dim)

        def forward(self, h: torch.Tensor, hn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            tokens = torch.cat([h[:, None], hn], dim=1)
            pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
            out, _ = self.attn(h[:, None], tokens, tokens, key_padding_mask=pad, need_weights=False)
            return self.norm(h + out[:, 0])

    return Context()
