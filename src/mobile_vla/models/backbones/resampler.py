"""The perceiver resampler RoboVLMs builds with ``use_vision_resampler: true`` (Flamingo's:
learned latent queries cross-attend to the image tokens, ``depth`` times, each attention
followed by a feed-forward block; keys and values are the image tokens and the latents
together). It turns a frame's N image tokens into ``num_latents`` tokens of the same width.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        b, m, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, m, -1))


class PerceiverResampler(nn.Module):
    """(B, N, dim) image tokens -> (B, num_latents, dim)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_latents: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, dim_head, heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, 4 * dim, bias=False),
                        nn.GELU(),
                        nn.Linear(4 * dim, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for attention, feed_forward in self.layers:  # type: ignore[misc]
            latents = attention(media, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm(latents)
