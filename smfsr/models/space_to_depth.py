"""A lossless, parameter-free "VAE": latent = pixel_unshuffle(image, f), 3 f^2 channels at 1/f size.

Why a model would use it (the default model does): a learned small VAE is a lossy codec and caps
what any latent model built on it can reach (the recipe's x4 VAE reconstructs held-out photos at
28 dB after 3000 CPU steps, while bicubic x4 alone scores 33 dB on them). Space-to-depth keeps the
token grid of an x4 VAE (so the network costs the same) and reconstructs exactly; the price is a
wider latent (48 channels at x4) that carries pixels, not semantics.

It exposes what :class:`smfsr.codec.LatentCodec` uses from an ``AutoencoderKL``: ``encoder``
(returning posterior moments: the mean, and a log-variance of -30, i.e. a point mass),
``decoder`` and ``config``, so every door treats it like a bundled VAE.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn
from torch.nn import functional as F

from ..checkpoint.peek import SPACE_TO_DEPTH as CODEC_NAME, is_space_to_depth  # noqa: F401  (re-exported)


class _Unshuffle(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.pixel_unshuffle(x, self.factor)
        return torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # moments (mean, log-variance)


class SpaceToDepthVAE(nn.Module):
    lossless = True

    def __init__(self, codec: str = CODEC_NAME, factor: int = 4, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0):
        super().__init__()
        if codec != CODEC_NAME:
            raise ValueError(f"codec must be {CODEC_NAME!r}, got {codec!r}")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.config = FrozenDict(codec=codec, factor=factor, scaling_factor=scaling_factor,
                                 shift_factor=shift_factor, latent_channels=3 * factor * factor)
        self.encoder = _Unshuffle(factor)
        self.decoder = nn.PixelShuffle(factor)  # no tensors: it runs wherever its input is

    @property
    def factor(self) -> int:
        return int(self.config["factor"])

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])
