"""Named network and VAE configurations.

``sd35-medium`` is the official SMFSR transformer (method.md 2.1, 2.3, 5): its state dict has the
official keys and shapes, and it reproduces the behaviours the official weights were trained with.
``dit4sr-sd35-medium`` is the DiT4SR teacher the trainer distils from. The ``tiny`` presets are
for tests; our own models use the corrected LR keys and a 1000x time scale (a [0, 1] time fed to
SD3's sinusoidal embedding uses only its lowest frequencies).
"""

from __future__ import annotations

from typing import Any

OFFICIAL_BEHAVIOUR = dict(lr_key_quirk=True, control_scale=1.2, official_dead_modules=True)
OUR_BEHAVIOUR = dict(lr_key_quirk=False, control_scale=1.0, official_dead_modules=False)

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)

TINY = dict(
    sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
    pooled_projection_dim=16, out_channels=4, pos_embed_max_size=64,
    dual_attention_layers=(0,), qk_norm="rms_norm",
)

SMALL = dict(  # pairs with the "small" VAE (8 latent channels, x4)
    sample_size=64, patch_size=2, in_channels=8, num_layers=6, attention_head_dim=64,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=256,
    pooled_projection_dim=64, out_channels=8, pos_embed_max_size=128,
    dual_attention_layers=(0, 1, 2), qk_norm="rms_norm",
)

# The default model: the small network on the lossless x4 space-to-depth codec (48 channels), patch 4
# (a token is 16x16 px, as SD3.5's x8 VAE + patch 2), the velocity measured from the LR latent
# (lr_residual: an untrained net is bicubic; see SMFSRTransformer) and a convolutional detail head
# on the latent grid for what a 16x16 px token's linear output cannot place (models/detail_head.py).
SMALL_X4 = {**SMALL, "patch_size": 4, "in_channels": 48, "out_channels": 48, "lr_residual": True,
            "detail_head_channels": 96, "detail_head_layers": 6}
TINY_X4 = {**TINY, "in_channels": 48, "out_channels": 48, "lr_residual": True,  # its test double
           "detail_head_channels": 8, "detail_head_layers": 2}

TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "sd35-medium": {**SD35_MEDIUM, **OFFICIAL_BEHAVIOUR, "interval_embedding": True, "time_scale": 1.0},
    "dit4sr-sd35-medium": {**SD35_MEDIUM, **OFFICIAL_BEHAVIOUR, "interval_embedding": False, "time_scale": 1000.0},
    "tiny": {**TINY, **OUR_BEHAVIOUR, "interval_embedding": True, "time_scale": 1000.0},
    "tiny-teacher": {**TINY, **OUR_BEHAVIOUR, "interval_embedding": False, "time_scale": 1000.0},
    "tiny-official": {**TINY, **OFFICIAL_BEHAVIOUR, "interval_embedding": True, "time_scale": 1.0},
    "tiny-official-teacher": {**TINY, **OFFICIAL_BEHAVIOUR, "interval_embedding": False, "time_scale": 1000.0},
    "small": {**SMALL, **OUR_BEHAVIOUR, "interval_embedding": True, "time_scale": 1000.0},
    "small-teacher": {**SMALL, **OUR_BEHAVIOUR, "interval_embedding": False, "time_scale": 1000.0},
    "tiny-x4": {**TINY_X4, **OUR_BEHAVIOUR, "interval_embedding": True, "time_scale": 1000.0},
    "tiny-x4-teacher": {**TINY_X4, **OUR_BEHAVIOUR, "interval_embedding": False, "time_scale": 1000.0},
    "small-x4": {**SMALL_X4, **OUR_BEHAVIOUR, "interval_embedding": True, "time_scale": 1000.0},
    "small-x4-teacher": {**SMALL_X4, **OUR_BEHAVIOUR, "interval_embedding": False, "time_scale": 1000.0},
}

# The teacher preset a student preset is distilled from.
TEACHER_OF = {"sd35-medium": "dit4sr-sd35-medium", "tiny": "tiny-teacher", "tiny-official": "tiny-official-teacher",
              "small": "small-teacher",
              "small-x4": "small-x4-teacher", "tiny-x4": "tiny-x4-teacher"}

# SD3.5's VAE (method.md 2.1): 16 latent channels, x8, scale 1.5305, shift 0.0609.
SD35_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
    block_out_channels=(8, 8, 16, 16), sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
)
# A small x4 codec with 8 latent channels (6:1 compression) for models trained from scratch: a
# x8/4-channel SD-style VAE caps photo PSNR well below 30 dB, this one does not.
SMALL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=8, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(32, 64, 128), sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
)
# The lossless x4 codec of the default model (smfsr/models/space_to_depth.py). Pixels in [-1, 1]
# of photos have a std near 0.5; the scale 2 brings latents to about unit variance, like noise.
SPACE_TO_DEPTH_X4 = dict(codec="space_to_depth", factor=4, scaling_factor=2.0, shift_factor=0.0, latent_channels=48)
VAE_PRESETS: dict[str, dict[str, Any]] = {"sd35": SD35_VAE, "tiny": TINY_VAE, "small": SMALL_VAE,
                                          "space-to-depth-x4": SPACE_TO_DEPTH_X4}


def transformer_config(preset: str, **overrides: Any) -> dict[str, Any]:
    if preset not in TRANSFORMER_PRESETS:
        raise KeyError(f"unknown transformer preset {preset!r}; known: {', '.join(TRANSFORMER_PRESETS)}")
    return {**TRANSFORMER_PRESETS[preset], **overrides}


def vae_config(preset: str, **overrides: Any) -> dict[str, Any]:
    if preset not in VAE_PRESETS:
        raise KeyError(f"unknown VAE preset {preset!r}; known: {', '.join(VAE_PRESETS)}")
    return {**VAE_PRESETS[preset], **overrides}
