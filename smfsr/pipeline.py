"""``SMFSRUpscaler``: the whole upscale, the one implementation every door calls.

Steps (official inference, method.md 3):
  1. LR images smaller than process_size / factor on their short side are first enlarged (bicubic);
  2. bicubic x factor, then to a multiple of the latent grid (VAE factor x patch size);
  3. VAE-encode that "control" image -> the LR posterior (mean, log-variance);
  4. from the user's seed: noise e ~ N(0, I) for the whole latent (tiles take crops of it), then
     the LR posterior sample, normalised (``generate``);
  5. 1..N mean-flow steps (x = e - u(e, 0, 1) for one step), the net run on Gaussian-blended
     latent tiles; a flow teacher is integrated with Euler steps instead;
  6. VAE-decode (tiled above a size threshold), resize to exactly scale x the input size;
  7. colour fix toward the input image at that size (AdaIN / wavelet / none).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from . import meanflow
from .checkpoint import Bundle, load_model, to_device
from .codec import LatentCodec, LatentScale
from .color import COLOR_FIXES, color_fix
from .errors import SMFSRError
from .imageio import RGBAlpha, check_size, from_pil, to_pil
from .tiling.latent import tiled_apply
from .tiling.vae import VAETiling

log = logging.getLogger("smfsr")
ProgressFn = Callable[[int, int], None]
MIN_LATENT_TILE = 16  # the out-of-memory retry halves the latent tile down to this


@dataclass
class UpscaleOptions:
    """Per-call settings; ``None`` means the model's stored default."""

    scale: float | None = None
    seed: int = 0
    steps: int | None = None
    tile_size: int | None = None  # latent px; 0 disables latent tiling
    tile_overlap: int | None = None
    color_fix: str | None = None
    vae_tiling: VAETiling | None = None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_dtype(device)
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise SMFSRError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    if table[name] == torch.float16 and device.type == "cpu":
        raise SMFSRError("fp16 is not supported on the CPU; use fp32 or bf16")
    return table[name]


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize (antialiased when shrinking) of (B, C, H, W) images in [0, 1]."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    shrinking = height < image.shape[-2] or width < image.shape[-1]
    out = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=shrinking)
    return out.clamp(0, 1).to(image.dtype)


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], draws: int = 1) -> list[torch.Tensor]:
    """``draws`` N(0, I) tensors of ``shape``, from one CPU generator per image, drawn in order:
    same seed, same noise, whatever the device, the batch, or the image's place in it."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return [torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators]) for _ in range(draws)]


class SMFSRUpscaler:
    """Noise-started one-step super-resolution with an SMFSR bundle."""

    def __init__(self, bundle: Bundle, *, vae_tiling: VAETiling | None = None,
                 codec: LatentCodec | LatentScale | None = None):
        """``codec`` replaces the bundle's VAE (e.g. a host's VAE); one of the two is required. A
        ``LatentScale`` allows sampling only (``generate``), for latents a host's VAE encodes."""
        if bundle.vae is None and codec is None:
            raise SMFSRError(
                f"{bundle.source or 'this model'} has no VAE. Pass one (--vae path/to/stable-diffusion-3.5-medium/vae), "
                "or use a bundle that contains its VAE."
            )
        self.bundle = bundle
        self.transformer = bundle.transformer
        self.defaults = bundle.defaults
        self.codec = codec or LatentCodec(bundle.vae, self.defaults.vae_scaling_factor, self.defaults.vae_shift_factor,
                                          vae_tiling or VAETiling())
        if self.codec.vae is not None and self.codec.latent_channels != self.transformer.config.in_channels:
            raise SMFSRError(
                f"the VAE has {self.codec.latent_channels} latent channels but the network expects "
                f"{self.transformer.config.in_channels}; use the VAE the model was trained with "
                "(SD3.5's 16-channel VAE for the official SMFSR weights)"
            )
        self.prompt_embeds, self.prompt_pooled = bundle.prompt_embeds, bundle.prompt_pooled

    def with_vae(self, vae: torch.nn.Module, tiling: VAETiling | None = None) -> "SMFSRUpscaler":
        """The same model with another VAE (diffusers or ldm-named), normalised with this model's
        latent scale and shift."""
        codec = LatentCodec(vae, self.defaults.vae_scaling_factor, self.defaults.vae_shift_factor, tiling or VAETiling())
        return SMFSRUpscaler(self.bundle, codec=codec)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vae: str | os.PathLike | None = None,
        prompt: str | os.PathLike | None = None,
        vae_tiling: VAETiling | None = None,
    ) -> "SMFSRUpscaler":
        """Load a bundle or an official folder; ``vae`` / ``prompt`` supply parts the model lacks."""
        device = torch.device(device) if device is not None else default_device()
        dtype = parse_dtype(dtype, device)
        if path is None:
            from .models.default import default_model_path

            path = default_model_path()
        bundle = load_model(path)
        if vae is not None:
            from .checkpoint import import_vae

            bundle.vae = import_vae(vae)
            bundle.defaults.vae_scaling_factor = float(bundle.vae.config.scaling_factor)
            bundle.defaults.vae_shift_factor = float(bundle.vae.config.shift_factor or 0.0)
        if prompt is not None:
            from .checkpoint import read_prompt_file

            bundle.prompt_embeds, bundle.prompt_pooled = read_prompt_file(prompt)
        return cls(to_device(bundle, device, dtype), vae_tiling=vae_tiling)

    # ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def factor(self) -> int:
        return int(self.defaults.upscale)

    @property
    def grid(self) -> int:
        """Pixel multiple of the latent grid: VAE downscale x transformer patch size."""
        return self.codec.downscale * self.transformer.config.patch_size

    def text(self, batch: int, embeds: torch.Tensor | None, pooled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.prompt_embeds if embeds is None else embeds
        pooled = self.prompt_pooled if pooled is None else pooled
        if embeds is None or pooled is None:
            raise SMFSRError(
                "this model has no stored prompt embedding; pass prompt embeddings (--prompt FILE.safetensors "
                "with 'embeds' and 'pooled'), or convert the model with one (`smfsr convert --prompt-embeds`)"
            )
        expected = (self.transformer.config.joint_attention_dim, self.transformer.config.pooled_projection_dim)
        if (embeds.shape[-1], pooled.shape[-1]) != expected:
            raise SMFSRError(f"prompt embeddings have widths {(embeds.shape[-1], pooled.shape[-1])}, the model expects {expected}")
        embeds = embeds.to(self.device, self.dtype)
        pooled = pooled.to(self.device, self.dtype)
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    # ----------------------------------------------------------------------------------------
    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The HR size the network works at for an LR image of height x width (steps 1-2)."""
        min_lr = self.defaults.process_size / self.factor
        grow = max(1.0, min_lr / min(height, width))
        h, w = round(height * grow) * self.factor, round(width * grow) * self.factor
        return max(self.grid, h // self.grid * self.grid), max(self.grid, w // self.grid * self.grid)

    def prepare(self, lr: torch.Tensor) -> torch.Tensor:
        """The bicubic-upsampled LR image the network is conditioned on (B, 3, H, W) in [0, 1]."""
        return resize(lr, *self.working_size(*lr.shape[-2:]))

    def velocity_fn(self, lr_latent: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                    tile: int, overlap: int, progress: Callable[[], None] | None):
        """u(z, r, t) (or v(z, t) for a flow teacher) on latent tiles, for the samplers."""

        def tile_fn(t: torch.Tensor, r: torch.Tensor | None) -> Callable[..., torch.Tensor]:
            def net(z: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return self.transformer(z.to(self.dtype), lr, embeds, pooled, t.to(self.device), r)
            return net

        size = (tile, tile) if tile > 0 else lr_latent.shape[-2:]
        step = (lambda done, total: progress()) if progress else None

        def u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return tiled_apply(tile_fn(t, r.to(self.device)), [z, lr_latent], size, overlap, step)

        def v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return tiled_apply(tile_fn(t, None), [z, lr_latent], size, overlap, step)

        return u if self.transformer.is_average_velocity else v

    def sample(self, lr_latent: torch.Tensor, noise: torch.Tensor, *, steps: int, tile: int, overlap: int,
               embeds: torch.Tensor, pooled: torch.Tensor, progress: Callable[[], None] | None = None) -> torch.Tensor:
        """Latent from noise, conditioned on the LR latent: mean-flow steps, or Euler for a teacher."""
        tile = self.check_tile(tile, overlap)
        fn = self.velocity_fn(lr_latent, embeds, pooled, tile, overlap, progress)
        z0 = noise.to(self.device, torch.float32)
        if self.transformer.is_average_velocity:
            return meanflow.sample_average_velocity(fn, z0, steps)
        return meanflow.sample_euler(fn, z0, steps, shift=self.defaults.flow_shift)

    def check_tile(self, tile: int, overlap: int) -> int:
        """Validate a latent tile size and overlap before any work starts; returns the tile."""
        p = self.transformer.config.patch_size
        if tile and tile % p:
            raise SMFSRError(f"latent tile size {tile} must be a multiple of the patch size {p}")
        if tile and not 0 <= overlap < tile:
            raise SMFSRError(f"tile overlap {overlap} must be at least 0 and smaller than the tile size {tile}")
        return tile

    def tiles_per_step(self, height: int, width: int, tile: int, overlap: int) -> int:
        from .tiling.latent import tile_grid

        if not tile:
            return 1
        return len(tile_grid(height, width, (tile, tile), overlap))

    # ----------------------------------------------------------------------------------------
    def upscale_tensor(
        self,
        images: torch.Tensor,
        options: UpscaleOptions | None = None,
        *,
        seeds: Sequence[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_pooled: torch.Tensor | None = None,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, 3, round(H*scale), round(W*scale)) in [0, 1].

        ``seeds`` gives each image its own seed (default: ``options.seed`` for all)."""
        o = options or UpscaleOptions()
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise SMFSRError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not torch.isfinite(images).all() or images.min() < -1e-3 or images.max() > 1 + 1e-3:
            raise SMFSRError("image values must be finite and in [0, 1]")
        batch, _, height, width = images.shape
        check_size(width, height)
        scale = float(o.scale or self.factor)
        if not 0 < scale <= 16:
            raise SMFSRError(f"scale must be in (0, 16], got {scale}")
        steps = int(o.steps or self.defaults.steps)
        fix = o.color_fix or self.defaults.color_fix
        if fix not in COLOR_FIXES:
            raise SMFSRError(f"unknown colour fix {fix!r}; choose one of {', '.join(COLOR_FIXES)}")
        tile = self.defaults.latent_tile if o.tile_size is None else int(o.tile_size)
        overlap = self.defaults.latent_overlap if o.tile_overlap is None else int(o.tile_overlap)
        seeds = list(seeds) if seeds is not None else [o.seed] * batch
        if len(seeds) != batch:
            raise SMFSRError(f"{len(seeds)} seeds for {batch} images")
        embeds, pooled = self.text(batch, prompt_embeds, prompt_pooled)
        codec = replace(self.codec, tiling=o.vae_tiling) if o.vae_tiling is not None else self.codec  # this call only

        control = self.prepare(images.to(self.device, torch.float32))
        mean, logvar = codec.moments(control)
        latent = self.generate(mean, logvar, seeds=seeds, steps=steps, tile=tile, overlap=overlap,
                               embeds=embeds, pooled=pooled, progress=progress)
        sr = codec.decode(latent)
        out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
        # Colour is taken from the input itself, bicubic to the output size (the Color Fix node
        # does the same, so the modular ComfyUI chain gives these exact pixels).
        out = resize(sr, out_h, out_w)
        return color_fix(out, resize(images.to(out.device, torch.float32), out_h, out_w), fix).cpu()

    def generate(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor | None,
        *,
        seeds: Sequence[int],
        steps: int,
        tile: int,
        overlap: int,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """The noise-started sampling, from the LR posterior (raw VAE space) to a normalised latent.

        Each image's generator draws the start noise, then the LR posterior sample: the same seed
        gives the same result from every door. ``logvar=None`` uses the posterior mean."""
        batch, channels, lh, lw = mean.shape
        noise, lr_eps = seeded_noise((batch, channels, lh, lw), seeds, draws=2)
        z_lr = mean
        if logvar is not None and self.defaults.lr_latent == "sample":
            z_lr = mean + torch.exp(0.5 * logvar) * lr_eps.to(mean.device, mean.dtype)
        lr_latent = self.codec.normalize(z_lr.float()).to(self.device, self.dtype)

        while True:  # on out-of-memory, halve the latent tile and try again (down to MIN_LATENT_TILE)
            total = steps * self.tiles_per_step(lh, lw, tile, overlap)
            done = [0]

            def tick() -> None:
                done[0] += 1
                if progress:
                    progress(done[0], total)

            try:
                return self.sample(lr_latent, noise, steps=steps, tile=tile, overlap=overlap,
                                   embeds=embeds, pooled=pooled, progress=tick)
            except torch.OutOfMemoryError:
                current = tile or max(lh, lw)
                if current // 2 < MIN_LATENT_TILE:
                    raise SMFSRError(
                        f"out of memory even with {current}-px latent tiles; use a smaller image, --dtype bf16, "
                        "or free GPU memory"
                    ) from None
                tile = current // 2 // self.transformer.config.patch_size * self.transformer.config.patch_size
                overlap = min(overlap, tile // 2)
                log.warning("out of memory: retrying with latent tile %d", tile)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image] | torch.Tensor,
        options: UpscaleOptions | None = None,
        **kwargs,
    ):
        """Upscale PIL image(s) or a tensor; returns the same kind. See :meth:`upscale_tensor`."""
        if isinstance(images, torch.Tensor):
            return self.upscale_tensor(images, options, **kwargs)
        single = isinstance(images, Image.Image)
        results = [self.upscale_image(from_pil(img), options, **kwargs) for img in ([images] if single else images)]
        return results[0] if single else results

    def upscale_image(self, image: RGBAlpha, options: UpscaleOptions | None = None, **kwargs) -> Image.Image:
        """One decoded image (RGB + optional alpha) -> PIL result; alpha is upscaled bicubically."""
        rgb = self.upscale_tensor(image.rgb[None], options, **kwargs)[0]
        alpha = None
        if image.alpha is not None:
            alpha = resize(image.alpha[None], *rgb.shape[-2:])[0]
        return to_pil(rgb, alpha)


__all__ = ["SMFSRUpscaler", "UpscaleOptions", "VAETiling", "seeded_noise", "resize"]
