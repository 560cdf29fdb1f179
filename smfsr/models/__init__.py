"""Networks: the SMFSR/DiT4SR velocity transformer, presets, and the VAE codec."""

from .presets import TRANSFORMER_PRESETS, VAE_PRESETS, transformer_config, vae_config
from .transformer import SMFSRTransformer

__all__ = ["SMFSRTransformer", "TRANSFORMER_PRESETS", "VAE_PRESETS", "transformer_config", "vae_config"]
