"""Tiling: latent tiles for the velocity net, and the exact GroupNorm-synchronised tiled VAE."""

from .latent import gaussian_weights, tile_grid, tiled_apply
from ..options import VAETiling
from .vae import tiled_decode, tiled_encode_moments

__all__ = ["VAETiling", "gaussian_weights", "tile_grid", "tiled_apply", "tiled_decode", "tiled_encode_moments"]
