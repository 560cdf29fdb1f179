"""Stage ``vae``: a small AutoencoderKL for models trained from scratch.

    L = | D(z) - x |_1 + kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x)
The exported VAE's latent scale and shift are measured on training crops, as SD3 defines them:
shift = mean(z), scale = 1 / std(z), so the core's normalised latents have unit variance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smfsr.checkpoint import build_vae, import_vae
from smfsr.models.presets import vae_config

from ..networks import Networks
from .base import Stage


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
    return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) of posterior means over ``images``."""
    moments = vae.encoder(images * 2 - 1)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    mean = moments.chunk(2, dim=1)[0]
    return 1.0 / mean.std().item(), mean.mean().item()


class VAEStage(Stage):
    name = "vae"
    exported_name = "vae (trained)"

    def degradation(self, config) -> str:
        return "bicubic"  # only HR crops are used: skip the costly degradation

    def build(self, config) -> Networks:
        torch.manual_seed(config.seed)
        vae = import_vae(config.init) if config.init else build_vae(vae_config(config.vae_preset or "small"))
        if getattr(vae, "lossless", False):
            raise SystemExit(f"vae_preset {config.vae_preset!r} is a fixed lossless codec: there is no VAE to train. "
                             "Skip stage vae and set vae_preset in the flow stage instead.")
        return Networks(vae.train())

    def batch(self, config, nets, batch, g, device):
        return batch["hr"].to(device), g

    def losses(self, config, nets, models):
        return {"model": lambda b: vae_loss(models["model"], b[0], b[1], config.kl_weight)}

    def _averaged_vae(self, nets, weights):
        vae = build_vae(dict(nets.trained.config))
        vae.load_state_dict(weights)
        return vae.eval()

    def export(self, config, nets, weights) -> Path:
        """The EMA VAE as a diffusers folder, its latent scale/shift measured on training crops."""
        from ..data import SRPairs

        vae = self._averaged_vae(nets, weights)
        data = SRPairs(config.train_dir, crop=config.crop, scale=config.scale, degradation="bicubic", seed=config.seed + 1)
        images = torch.stack([data[i]["hr"] for i in range(min(len(data), 32))])
        scale, shift = latent_statistics(vae, images)
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        path = Path(config.output_dir) / "vae_model"
        vae.save_pretrained(path, safe_serialization=True)
        return path

    @torch.no_grad()
    def validate(self, config, nets, weights, device):
        from kornia.metrics import psnr, ssim

        from smfsr.codec import LatentCodec

        from ..data import SRPairs

        data = SRPairs(config.val_dir, crop=config.val_crop, scale=config.scale, degradation="bicubic",
                       seed=config.seed, train=False)
        hr = torch.stack([data[i]["hr"] for i in range(min(config.val_count, len(data)))])
        codec = LatentCodec.raw(self._averaged_vae(nets, weights))
        recon = codec.decode(codec.encode(hr))
        return {"val/psnr": psnr(recon, hr, 1.0).mean().item(), "val/ssim": ssim(recon, hr, 11).mean().item()}, \
            torch.cat([recon, hr], -1)
