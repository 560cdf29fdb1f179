"""``PipelineDefaults``: how a model is meant to be run, stored in its bundle. Imports nothing heavy,
so a door can check a user's options against a model's defaults before torch loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# SD3.5's VAE latent statistics (its config's scaling_factor / shift_factor): the official weights'
SD35_VAE_SCALE, SD35_VAE_SHIFT = 1.5305, 0.0609


@dataclass
class PipelineDefaults:
    """How a model is meant to be run; stored with it and overridable at every door."""

    upscale: int = 4
    steps: int = 1
    process_size: int = 512  # official: LR images are first resized so min side >= process_size / upscale
    vae_scaling_factor: float = SD35_VAE_SCALE
    vae_shift_factor: float = SD35_VAE_SHIFT
    latent_tile: int = 64  # official: 64 latent px (512 px), overlap 24
    latent_overlap: int = 24
    color_fix: str = "adain"
    lr_latent: str = "sample"  # official: the LR posterior is sampled, not its mode
    flow_shift: float = 3.0  # Euler time shift when the model is a flow teacher (SD3.5: 3.0)
    prompt: str = ""
    max_steps: int = 0  # 0: any number of steps works; 1: a one-step-only model (doors refuse more)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PipelineDefaults":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def use_vae(self, vae) -> "PipelineDefaults":
        """Take the latent scale/shift from a VAE's config (a diffusers AutoencoderKL, or the
        space-to-depth codec): the one place a VAE's statistics enter the defaults. Returns self."""
        self.vae_scaling_factor = float(vae.config.scaling_factor)
        self.vae_shift_factor = float(vae.config.shift_factor or 0.0)
        return self
