"""A local detail head: a few 3x3 convolutions at latent resolution, added to the velocity.

Ours, for the small default model only (``detail_head_channels`` > 0; the official weights have no
such head). With the lossless space-to-depth codec a token of the patch-4 transformer is a 16x16 px
block, and its linear output layer writes all 768 values of that block at once: fine enough for
content, too coarse for the sub-pixel position of an edge, which is where x4 detail lives. The
head sees the noisy latent, the LR latent and the transformer's velocity on the latent grid (one
cell = one 4x4 px block, so its 3x3 kernels reach neighbouring pixels across token borders) and adds
a correction. Time enters by a FiLM of the first layer from the transformer's time embedding,
because the teacher's velocity at t = 0.9 and at t = 0.1 need different corrections. The last
layer and the FiLM start at zero, so a new head leaves the network's output unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class DetailHead(nn.Module):
    def __init__(self, latent_channels: int, width: int, layers: int, temb_dim: int):
        super().__init__()
        if layers < 2:
            raise ValueError(f"detail_head_layers must be at least 2, got {layers}")
        self.conv_in = nn.Conv2d(3 * latent_channels, width, 3, padding=1)
        self.film = nn.Linear(temb_dim, 2 * width)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(layers - 2))
        self.conv_out = nn.Conv2d(width, latent_channels, 3, padding=1)
        self.act = nn.SiLU()
        for layer in (self.film, self.conv_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, velocity: torch.Tensor, noisy: torch.Tensor, lr_latent: torch.Tensor,
                temb: torch.Tensor) -> torch.Tensor:
        """The correction to ``velocity``; every input is (B, C, H, W) on the latent grid but temb (B, D)."""
        h = self.conv_in(torch.cat([velocity, noisy, lr_latent], dim=1))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.act(h * (1 + scale) + shift)
        for conv in self.convs:
            h = self.act(conv(h))
        return self.conv_out(h)
