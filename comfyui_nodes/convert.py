"""ComfyUI types <-> the core's: the only translation the nodes do.

IMAGE is (B, H, W, C) float in [0, 1]; the core uses (B, C, H, W). LATENT is a dict whose
"samples" are *raw* VAE latents; the core normalises them with the model's scale and shift.
An SMFSR LR latent also carries the posterior log-variance ("smfsr_logvar"), so the sampler can
draw the LR posterior sample from its seed exactly as ``SMFSRUpscaler`` does.
"""

from __future__ import annotations

import torch

from smfsr.errors import SMFSRError

LOGVAR_KEY = "smfsr_logvar"


def image_to_core(image: torch.Tensor) -> torch.Tensor:
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise SMFSRError(f"expected an IMAGE of shape (B, H, W, C), got {tuple(image.shape)}")
    x = image[..., :3] if image.shape[-1] >= 3 else image.expand(*image.shape[:-1], 3)
    return x.movedim(-1, 1).float().clamp(0, 1)


def image_from_core(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).float().cpu().clamp(0, 1)


def lr_latent(mean: torch.Tensor, logvar: torch.Tensor | None) -> dict:
    latent = {"samples": mean.float().cpu()}
    if logvar is not None:
        latent[LOGVAR_KEY] = logvar.float().cpu()
    return latent


def moments_of(latent: dict, defaults=None, config=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, logvar) from an SMFSR LR latent, checked against the model when it is given: the
    channels it expects, whole patches, and the posterior variance a model that samples the LR
    posterior needs (core nodes that rebuild a LATENT dict drop it)."""
    from smfsr.errors import SMFSRError

    if not isinstance(latent, dict) or "samples" not in latent:
        raise SMFSRError("lr_latent is not a LATENT; connect SMFSR LR Encode's lr_latent output")
    samples, logvar = latent["samples"], latent.get(LOGVAR_KEY)
    if config is not None:
        if samples.ndim != 4 or samples.shape[1] != config.in_channels:
            raise SMFSRError(f"lr_latent has shape {tuple(samples.shape)} but the SMFSR model expects "
                             f"{config.in_channels} latent channels; connect SMFSR LR Encode with this model")
        if samples.shape[-1] % config.patch_size or samples.shape[-2] % config.patch_size:
            raise SMFSRError(f"lr_latent is {samples.shape[-1]}x{samples.shape[-2]} latent cells, not a multiple of "
                             f"the model's patch size {config.patch_size}; make it with SMFSR LR Encode")
    if logvar is None and defaults is not None and defaults.lr_latent == "sample":
        raise SMFSRError("lr_latent has lost SMFSR's posterior variance (a node between SMFSR LR Encode and "
                         "SMFSR Sampler rebuilt the LATENT); connect SMFSR LR Encode's lr_latent directly to "
                         "SMFSR Sampler")
    return samples, logvar


def text_from_conditioning(conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 CONDITIONING ([[embeds (B, L, 4096), {"pooled_output": (B, 2048)}]]) -> (embeds, pooled)."""
    if not conditioning:
        raise SMFSRError("empty CONDITIONING")
    embeds, extra = conditioning[0][0], conditioning[0][1]
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise SMFSRError("the CONDITIONING has no pooled output: use an SD3 text encoder (CLIPTextEncode with an SD3 CLIP)")
    return embeds, pooled
