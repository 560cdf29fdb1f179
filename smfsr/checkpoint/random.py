"""Bundles with randomly initialised networks, for benchmarks and tests (speed does not depend on
the weights). Not models: their output is noise-like."""

from __future__ import annotations

from typing import Any

import torch

from ..models.presets import VAE_PRESETS, transformer_config, vae_config
from .build import build_transformer, build_vae
from .bundle import Bundle
from .defaults import PipelineDefaults


def random_bundle(transformer_preset: str = "tiny", vae_preset: str | None = None, *, seed: int = 0,
                  prompt_tokens: int = 3, **defaults: Any) -> Bundle:
    """The VAE preset defaults to the one with the network's latent channels."""
    torch.manual_seed(seed)
    transformer = build_transformer(transformer_config(transformer_preset)).eval()
    if vae_preset is None:
        channels = transformer.config.in_channels
        vae_preset = next(name for name, cfg in VAE_PRESETS.items() if cfg["latent_channels"] == channels)
    vae_cfg = vae_config(vae_preset)
    vae = build_vae(vae_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    settings = dict(vae_scaling_factor=vae_cfg["scaling_factor"], vae_shift_factor=vae_cfg["shift_factor"])
    settings.update(defaults)
    return Bundle(
        transformer=transformer, vae=vae,
        prompt_embeds=torch.randn(1, prompt_tokens, c.joint_attention_dim, generator=g),
        prompt_pooled=torch.randn(1, c.pooled_projection_dim, generator=g),
        defaults=PipelineDefaults(**settings), license="none (random weights)", provenance="random_bundle",
    )
