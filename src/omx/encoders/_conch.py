"""CONCH's image tower: a timm ViT-B/16 trunk and CoCa's attentional poolers, named as in its released weights."""

from __future__ import annotations

import torch
from torch import nn


class AttentionalPooler(nn.Module):
    """Learned queries attend to the trunk's tokens (CoCa): ``(b, n, context_dim)`` -> ``(b, n_queries, d_model)``."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool tokens ``(b, n, context_dim)``."""
        x = self.ln_k(x).permute(1, 0, 2)  # sequence first, as nn.MultiheadAttention wants by default
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class ConchVisual(nn.Module):
    """The CONCH image encoder as its authors use it for features (``encode_image(proj_contrast=False)``).

    The trunk's tokens (after its final norm) go through the contrastive attentional pooler (one query) and its
    layer norm: a 512-long embedding. The caption pooler and the contrastive projection are part of the released
    weights and are loaded, but not used for features.
    """

    def __init__(self, trunk: nn.Module, embed_dim: int = 512, n_head: int = 8, n_queries_caption: int = 256):
        super().__init__()
        width = trunk.embed_dim
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(embed_dim, width, n_head, n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(torch.zeros(embed_dim, embed_dim))
        self.attn_pool_caption = AttentionalPooler(width, width, n_head, n_queries=n_queries_caption)
        self.ln_caption = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(b, 3, 448, 448)`` normalised images to ``(b, 512)`` embeddings."""
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
