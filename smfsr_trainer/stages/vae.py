"""Stage ``vae``: a small AutoencoderKL for models trained from scratch (the default model).

    L = | D(z) - x |_1 + kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x)
The exported VAE's latent scale and shift are measured on training crops, as SD3 defines them:
shift = mean(z), scale = 1 / std(z), so the core's normalised latents have unit variance.
"""

from __future__ import annotations

import torch


def vae_loss(vae, image: torch.Tensor, g: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``image`` in [0, 1]; returns the loss and its parts."""
    x = image * 2 - 1
    moments = vae.encoder(x)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g).to(mean)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    recon = vae.decoder(z)
    l1 = (recon - x).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return l1 + kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) of posterior means over ``images``."""
    moments = vae.encoder(images * 2 - 1)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    mean = moments.chunk(2, dim=1)[0]
    return 1.0 / mean.std().item(), mean.mean().item()
