"""``PipelineDefaults``: how a model is meant to be run, stored in its bundle. Imports nothing heavy,
so a door can check a user's options against a model's defaults before torch loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# SD3.5's VAE latent statistics (its config's scaling_factor / shift_factor): the official weights'
SD35_VAE_SCALE, SD35_VAE_SHIFT = 1.5305, 0.0609
FLUX_VAE_SCALE, FLUX_VAE_SHIFT = 0.3611, 0.1159
# Latent spaces by their VAE's constants, to name a VAE that is not the model's. SD3.5's and
# FLUX.1's VAEs have the same architecture and 16 channels: only the constants (and the weights)
# tell them apart.
LATENT_SPACES = {(SD35_VAE_SCALE, SD35_VAE_SHIFT): "SD3/SD3.5", (FLUX_VAE_SCALE, FLUX_VAE_SHIFT): "FLUX.1",
                 (0.18215, 0.0): "SD1.x/SD2.x", (0.13025, 0.0): "SDXL"}


def latent_space(scale: float, shift: float) -> str | None:
    """Whose VAE these constants are (LATENT_SPACES), or None."""
    return next((name for (s, h), name in LATENT_SPACES.items() if abs(s - scale) < 1e-4 and abs(h - shift) < 1e-4),
                None)


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

    def use_vae(self, vae, *, same_latent_space: bool = False) -> "PipelineDefaults":
        """Take the latent scale/shift from a VAE's config (a diffusers AutoencoderKL, or the
        space-to-depth codec): the one place a VAE's statistics enter the defaults. Returns self.

        ``same_latent_space``: the VAE is given to a trained network (whose latent space these
        defaults hold: SD3.5's for the official weights), so one from another model is refused by
        name instead of being scaled as if it were the network's."""
        scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
        if same_latent_space and (abs(scale - self.vae_scaling_factor) > 1e-4
                                  or abs(shift - self.vae_shift_factor) > 1e-4):
            from ..errors import CheckpointError

            found, expected = latent_space(scale, shift), latent_space(self.vae_scaling_factor, self.vae_shift_factor)
            raise CheckpointError(
                (f"this is {found}'s VAE" if found else f"this VAE (scaling {scale:g}, shift {shift:g})")
                + " is not the one the model was trained with ("
                + (f"{expected}'s" if expected else f"scaling {self.vae_scaling_factor:g}, shift "
                   f"{self.vae_shift_factor:g}") + "): its latents would be misread, even with the same number of "
                "channels; use the model's VAE (for the official SMFSR weights, SD3.5's: `smfsr download sd35-medium-vae`)")
        self.vae_scaling_factor, self.vae_shift_factor = scale, shift
        return self
