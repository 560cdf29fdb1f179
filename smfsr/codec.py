"""Images <-> the core's normalised latents, through a VAE (design.md "Latents").

    core latent  z = (z_vae - shift) * scale        (SD3.5: shift 0.0609, scale 1.5305)

"Raw" latents are the VAE's own (what ComfyUI's LATENT holds); the samplers work on normalised
ones. Tiling is chosen per call (a ``VAETiling``; ``None`` never tiles), so a codec has no state
a caller could change under another.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .options import VAETiling
from .tiling.vae import decoder_factor, latent_channels, tiled_decode, tiled_encode_moments


@dataclass
class LatentScale:
    """The normalisation alone: z = (z_vae - shift) * scale."""

    scaling_factor: float
    shift_factor: float

    def normalize(self, z_vae: torch.Tensor) -> torch.Tensor:
        return (z_vae - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor


@dataclass
class LatentCodec(LatentScale):
    """``vae``: a diffusers ``AutoencoderKL``, an ldm-named VAE module (ComfyUI's
    ``first_stage_model``: anything with ``encoder``/``decoder`` + optional quant convs), or the
    parameter-free space-to-depth codec."""

    vae: torch.nn.Module

    @classmethod
    def raw(cls, vae: torch.nn.Module) -> "LatentCodec":
        """A codec whose latents are the VAE's own (scale 1, shift 0)."""
        return cls(1.0, 0.0, vae)

    @property
    def lossless(self) -> bool:
        return bool(getattr(self.vae, "lossless", False))  # the space-to-depth codec

    @property
    def downscale(self) -> int:
        if self.lossless:
            return self.vae.factor
        return decoder_factor(self.vae)

    @property
    def latent_channels(self) -> int:
        if self.lossless:
            return self.vae.latent_channels
        return latent_channels(self.vae)

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the VAE's device and dtype (a VAE without tensors runs wherever ``x`` is)."""
        reference = next(itertools.chain(self.vae.parameters(), self.vae.buffers()), None)
        return x if reference is None else x.to(reference.device, reference.dtype)

    def _tiled(self, tiling: VAETiling | None, image_pixels: int) -> bool:
        # A pointwise codec needs no tiles: its memory is the image's own.
        return tiling is not None and not self.lossless and tiling.tiles(image_pixels)

    def moments(self, image: torch.Tensor, tiling: VAETiling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance (raw VAE space) of images (B, 3, H, W) in [0, 1]."""
        x = self._to_vae(image * 2 - 1)
        if self._tiled(tiling, x.shape[-2] * x.shape[-1]):
            moments = tiled_encode_moments(self.vae, x, tiling)
        else:
            with torch.no_grad():
                moments = self.vae.encoder(x)
                if getattr(self.vae, "quant_conv", None) is not None:
                    moments = self.vae.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, image: torch.Tensor, *, noise: torch.Tensor | None = None,
               tiling: VAETiling | None = None) -> torch.Tensor:
        """Normalised latent of images in [0, 1]: the posterior sample mean + std * noise when
        ``noise`` (N(0, I), latent-shaped) is given, else the posterior mean."""
        mean, logvar = self.moments(image, tiling)
        z = mean
        if noise is not None:
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return self.normalize(z)

    def decode_raw(self, z_vae: torch.Tensor, tiling: VAETiling | None = None, *, grad: bool = False) -> torch.Tensor:
        """Images in [0, 1] from raw VAE latents; ``grad=True`` keeps the graph (training the
        generator through a frozen decoder; never tiled)."""
        z = self._to_vae(z_vae)
        if not grad and self._tiled(tiling, z.shape[-2] * z.shape[-1] * self.downscale**2):
            x = tiled_decode(self.vae, z, tiling)
        else:
            with torch.set_grad_enabled(grad):
                if getattr(self.vae, "post_quant_conv", None) is not None:
                    z = self.vae.post_quant_conv(z)
                x = self.vae.decoder(z)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def decode(self, latent: torch.Tensor, tiling: VAETiling | None = None, *, grad: bool = False) -> torch.Tensor:
        """Images in [0, 1] from normalised latents (see :meth:`decode_raw`)."""
        return self.decode_raw(self.denormalize(latent), tiling, grad=grad)
