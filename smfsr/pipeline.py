"""``SMFSRUpscaler``: the whole upscale as four public stages, the one implementation every door calls.

    settings = upscaler.settings(options)            # the model's defaults fill what the call leaves open
    lr       = upscaler.encode(images, settings)     # 1. the LR posterior (raw VAE space)
    latent   = upscaler.sample(lr, settings, seeds)  # 2. noise-started mean-flow steps (raw VAE space)
    decoded  = upscaler.decode(latent, settings)     # 3. the image at the working size
    output   = upscaler.finish(decoded, images, settings)  # 4. resize to scale x input, colour fix

``upscale_tensor`` is exactly those calls; each modular ComfyUI node makes one of them.

Official inference (method.md 3), stage by stage:
  1. LR images smaller than process_size / factor on their short side are first enlarged (bicubic);
     then bicubic x factor to a multiple of the latent grid (VAE factor x patch size), and the VAE
     encodes that "control" image to the LR posterior (mean, log-variance);
  2. from the user's seed: noise e ~ N(0, I) for the whole latent (tiles take crops of it), then the
     LR posterior sample; 1..N mean-flow steps (x = e - u(e, 0, 1) for one step) with the net on
     Gaussian-blended latent tiles; a flow teacher is integrated with Euler steps instead;
  3. VAE decode (tiled per the settings);
  4. resize to exactly scale x the input size and colour-fix toward the input at that size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from . import meanflow
from .checkpoint import Bundle, load_model
from .checkpoint.default_model import default_model_path, resolve_model
from .codec import LatentCodec, LatentScale
from .color import color_fix
from .devices import OutOfMemoryError
from .errors import SMFSRError
from .estimate import Estimator, announcement
from .memory import check_fits
from .imageio import RGBAlpha, check_size, from_pil, to_pil
from .options import Settings, UpscaleOptions, VAETiling
from .runtime import FirstCallTimer, Runtime, prepare
from .tiling.latent import tile_grid, tiled_apply

log = logging.getLogger("smfsr")
ProgressFn = Callable[[int, int], None]
MIN_LATENT_TILE = 16  # the out-of-memory retry halves the latent tile down to this


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


def lr_posterior_latent(mean: torch.Tensor, logvar: torch.Tensor | None, eps: torch.Tensor, rule: str) -> torch.Tensor:
    """The LR condition in raw VAE space (method.md 3, step 2): official inference *samples* the LR
    posterior, mean + std * eps, with eps the image's second seeded draw (``rule="sample"``, what
    bundles record); ``"mean"`` takes the mode. A plain encoding (no variance) is used as it is."""
    if logvar is None or rule != "sample":
        return mean
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)


def lr_condition(codec: LatentCodec, lr: torch.Tensor, size: tuple[int, int], seeds: Sequence[int],
                 rule: str) -> torch.Tensor:
    """The normalised LR latent the network is conditioned on, for LR images (B, 3, h, w) and the
    working size ``size``: stage 1 (bicubic to the working size, the posterior) and the start of
    stage 2 (the posterior latent from each image's seed). The trainer calls this, so a model sees
    in training exactly the condition the pipeline's stages give it at inference."""
    mean, logvar = codec.moments(resize(lr.float(), *size))
    eps = seeded_noise(mean.shape, seeds, draws=2)[1]
    return codec.normalize(lr_posterior_latent(mean, logvar, eps, rule).float())


def output_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_latent(vae: torch.nn.Module, latent: torch.Tensor, tiling: VAETiling | None) -> torch.Tensor:
    """Stage 3 for any VAE (diffusers or ldm-named): raw latents -> images in [0, 1]."""
    return check_finite(LatentCodec.raw(vae).decode_raw(latent, tiling), "decoded image", vae_dtype(vae))


def vae_dtype(vae: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in vae.parameters() if p.is_floating_point()), torch.float32)


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    """``x``, or a clear error when it holds NaN or inf: the overflow of a half-precision run (fp16
    on a GPU without bf16, where it is the default) would otherwise be saved as a black or garbage
    image."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        fix = ("set ${dtype} to bf16 (where the GPU has it) or fp32" if dtype == torch.float16
               else "set ${dtype} to fp32" if dtype != torch.float32
               else "the model file may be damaged: check it with `smfsr info`, or download or export it again")
        raise SMFSRError(f"the {what} holds {bad} NaN or inf values of {x.numel()} (computed in "
                         f"{str(dtype).removeprefix('torch.')}, whose range it overflowed): {fix}")
    return x


def finish(decoded: torch.Tensor, reference: torch.Tensor, scale: float, method: str) -> torch.Tensor:
    """Stage 4: ``decoded`` resized to exactly ``scale`` x the reference (the LR input) and colour-fixed
    toward the reference at that size (AdaIN / wavelet / none). Images (B, 3, H, W) in [0, 1]."""
    out_h, out_w = output_size(*reference.shape[-2:], scale)
    out = resize(decoded.float(), out_h, out_w)
    return color_fix(out, resize(reference.to(out.device, torch.float32), out_h, out_w), method).cpu()


@dataclass
class LRLatent:
    """Stage 1's result: the LR posterior in raw VAE space, and the image it encodes."""

    mean: torch.Tensor  # (B, C, h, w)
    logvar: torch.Tensor | None = None  # None: a plain VAE encoding, its mean used as is
    control: torch.Tensor | None = None  # the bicubic-upsampled LR image at the working size, (B, 3, H, W)


class SMFSRUpscaler:
    """Noise-started one-step super-resolution with an SMFSR bundle."""

    def __init__(self, bundle: Bundle, *, vae: torch.nn.Module | None = None, sampling_only: bool = False):
        """``vae`` replaces the bundle's VAE (a host's, diffusers- or ldm-named); ``sampling_only``
        makes an upscaler without one, for stage 2 on latents a host's VAE encoded."""
        vae = vae if vae is not None else bundle.vae
        d = bundle.defaults
        if vae is None and not sampling_only:
            raise SMFSRError(
                f"{bundle.source or 'this model'} has no VAE. Pass one (--vae path/to/stable-diffusion-3.5-medium/vae; "
                "`smfsr download sd35-medium-vae` brings SD3.5's), or use a bundle that contains its VAE "
                "(`smfsr download smfsr_q --bundle`)."
            )
        self.bundle, self.transformer, self.defaults = bundle, bundle.transformer, d
        self.latent_scale = LatentScale(d.vae_scaling_factor, d.vae_shift_factor)
        self.codec = LatentCodec(d.vae_scaling_factor, d.vae_shift_factor, vae) if vae is not None else None
        if self.codec is not None and self.codec.latent_channels != self.transformer.config.in_channels:
            raise SMFSRError(
                f"the VAE has {self.codec.latent_channels} latent channels but the network expects "
                f"{self.transformer.config.in_channels}; use the VAE the model was trained with "
                "(SD3.5's 16-channel VAE for the official SMFSR weights)"
            )
        self.prompt_embeds, self.prompt_pooled = bundle.prompt_embeds, bundle.prompt_pooled
        self.compiled = False  # torch.compile on: the first call of each tile shape compiles
        self.first_call = FirstCallTimer(False)
        self.estimator = Estimator(self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, runtime: Runtime | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        vae: str | os.PathLike | None = None, prompt: str | os.PathLike | None = None,
                        weights: str = "auto", block_swap: int | str = 0, compile: bool = False,
                        place: bool = True) -> "SMFSRUpscaler":
        """The one loader every door calls. ``path``: a bundle, an official folder or a shipped
        model's name (default: the default model); ``vae`` / ``prompt`` supply parts the model
        lacks. How it runs is a ``Runtime`` (device, dtype, fp8 weights, block swap, compile), given
        whole or as the keywords; it is checked before anything loads. ``place=False`` leaves the
        weights on the CPU for a host whose memory manager moves them (ComfyUI)."""
        runtime = (runtime or Runtime(device, dtype, weights, block_swap, compile)).resolved()
        upscaler = cls(load_prepared(path, runtime, vae=vae, prompt=prompt, place=place))
        upscaler.compiled = runtime.compile
        upscaler.first_call = FirstCallTimer(runtime.compile)
        return upscaler

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
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    def settings(self, options: UpscaleOptions | Settings | None = None) -> Settings:
        """What runs for these options: the model's defaults fill what they leave open."""
        if isinstance(options, Settings):
            return options
        settings = (options or UpscaleOptions()).resolve(self.defaults, self.patch_size)
        if settings.steps == 1 and not self.transformer.is_average_velocity:
            # an official DiT4SR folder picked instead of SMFSR's: its defaults say one step
            raise SMFSRError(f"{self.bundle.source or 'this model'} is a flow teacher (DiT4SR's multi-step network), not "
                             "the one-step SMFSR network: one Euler step of it is no result. Choose the SMFSR weights "
                             "(smfsr_q or smfsr_f: `smfsr download smfsr_q`), or run the teacher with ${steps} set "
                             "to 20 or more")
        return settings

    def text(self, batch: int, embeds: torch.Tensor | None = None,
             pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt embedding for a batch: the one given, else the model's stored one."""
        embeds = self.prompt_embeds if embeds is None else embeds
        pooled = self.prompt_pooled if pooled is None else pooled
        if embeds is None or pooled is None:
            raise SMFSRError(
                "this model has no stored prompt embedding; pass prompt embeddings (--prompt FILE.safetensors "
                "with 'embeds' and 'pooled', from `smfsr encode-prompt`; `smfsr download sd35-medium-encoders` "
                "brings the encoders), or convert the model with one (`smfsr convert --prompt-embeds`, or "
                "`smfsr download smfsr_q --bundle`)"
            )
        expected = (self.transformer.config.joint_attention_dim, self.transformer.config.pooled_projection_dim)
        if (embeds.shape[-1], pooled.shape[-1]) != expected:
            raise SMFSRError(f"prompt embeddings have widths {(embeds.shape[-1], pooled.shape[-1])}, the model expects {expected}")
        embeds = embeds.to(self.device, self.dtype)
        pooled = pooled.to(self.device, self.dtype)
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    # ---------------------------------------------------------------------------------------- stage 1
    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The HR size the network works at for an LR image of height x width."""
        grid = self._codec().downscale * self.patch_size
        min_lr = self.defaults.process_size / self.factor
        grow = max(1.0, min_lr / min(height, width))
        h, w = round(height * grow) * self.factor, round(width * grow) * self.factor
        return max(grid, h // grid * grid), max(grid, w // grid * grid)

    def announcement(self, height: int, width: int, settings: Settings | UpscaleOptions | None = None) -> str | None:
        """For a job worth announcing (estimated long, or a large output): its output size, tile
        count and estimated time, from a warm-up measured once on this device; else None."""
        return announcement(self, height, width, self.settings(settings))

    def encode(self, images: torch.Tensor, settings: Settings | UpscaleOptions | None = None) -> LRLatent:
        """(B, 3, H, W) LR images in [0, 1] -> the LR posterior of their bicubic upsampling."""
        settings = self.settings(settings)
        images = check_images(images)
        control = resize(images.to(self.device, torch.float32), *self.working_size(*images.shape[-2:]))
        mean, logvar = self._codec().moments(control, settings.vae_tiling)
        return LRLatent(mean, logvar, control)

    # ---------------------------------------------------------------------------------------- stage 2
    def sample(self, lr: LRLatent, settings: Settings | UpscaleOptions | None = None, *,
               seeds: Sequence[int] | None = None, prompt_embeds: torch.Tensor | None = None,
               prompt_pooled: torch.Tensor | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
        """The noise-started sampling: LR posterior -> HR latent, both in raw VAE space.

        Each image's generator draws the start noise, then the LR posterior sample: the same seed
        gives the same result from every door. ``seeds`` default to the settings' seed for all."""
        settings = self.settings(settings)
        batch, channels, lh, lw = lr.mean.shape
        seeds = list(seeds) if seeds is not None else [settings.seed] * batch
        if len(seeds) != batch:
            raise SMFSRError(f"{len(seeds)} seeds for {batch} images")
        embeds, pooled = self.text(batch, prompt_embeds, prompt_pooled)
        noise, lr_eps = seeded_noise((batch, channels, lh, lw), seeds, draws=2)
        z_lr = lr_posterior_latent(lr.mean, lr.logvar, lr_eps, self.defaults.lr_latent)
        lr_latent = self.latent_scale.normalize(z_lr.float()).to(self.device, self.dtype)

        while True:  # on out-of-memory, halve the latent tile and try again (down to MIN_LATENT_TILE)
            try:
                z = self._steps(lr_latent, noise, settings, embeds, pooled, progress)
                return check_finite(self.latent_scale.denormalize(z.float()), "sampled latent", self.dtype)
            except OutOfMemoryError:
                current = settings.tile or max(lh, lw)
                if current // 2 < MIN_LATENT_TILE:
                    raise SMFSRError(f"out of memory even with {current}-cell latent tiles; use a smaller image, "
                                     "or set ${dtype} to bf16, ${weights} to fp8_e4m3fn or ${block_swap} to "
                                     "auto, or free GPU memory") from None
                settings = settings.with_tile(current // 2 // self.patch_size * self.patch_size)
                log.warning("out of memory: retrying with latent tile %d", settings.tile)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _steps(self, lr_latent: torch.Tensor, noise: torch.Tensor, settings: Settings, embeds: torch.Tensor,
               pooled: torch.Tensor, progress: ProgressFn | None) -> torch.Tensor:
        """Mean-flow steps (or Euler steps for a flow teacher), the net run on latent tiles."""
        size = (settings.tile, settings.tile) if settings.tile else tuple(lr_latent.shape[-2:])
        total = settings.steps * len(tile_grid(*lr_latent.shape[-2:], size, settings.overlap))
        done = [0]

        def tick(_done: int, _total: int) -> None:
            done[0] += 1
            if progress:
                progress(done[0], total)

        def net(t: torch.Tensor, r: torch.Tensor | None) -> Callable[..., torch.Tensor]:
            def run(z: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return self.transformer(z.to(self.dtype), lr, embeds, pooled, t.to(self.device),
                                            None if r is None else r.to(self.device))
            return run

        z0 = noise.to(self.device, torch.float32)
        if self.transformer.is_average_velocity:
            def u(z, r, t):
                return tiled_apply(net(t, r), [z, lr_latent], size, settings.overlap, tick)

            return meanflow.sample_average_velocity(u, z0, settings.steps)

        def v(z, t):
            return tiled_apply(net(t, None), [z, lr_latent], size, settings.overlap, tick)

        return meanflow.sample_euler(v, z0, settings.steps, shift=self.defaults.flow_shift)

    # ---------------------------------------------------------------------------------------- stages 3, 4
    def decode(self, latent: torch.Tensor, settings: Settings | UpscaleOptions | None = None) -> torch.Tensor:
        """Raw HR latent -> the image at the working size, (B, 3, H, W) in [0, 1]."""
        codec = self._codec()
        return check_finite(codec.decode_raw(latent, self.settings(settings).vae_tiling), "decoded image",
                            vae_dtype(codec.vae))

    def finish(self, decoded: torch.Tensor, images: torch.Tensor,
               settings: Settings | UpscaleOptions | None = None) -> torch.Tensor:
        """The decoded image at exactly scale x the input size, colour-fixed toward the input."""
        settings = self.settings(settings)
        return finish(decoded, images, settings.scale, settings.color_fix)

    def _codec(self) -> LatentCodec:
        if self.codec is None:
            raise SMFSRError("this SMFSR model was loaded for sampling only; it needs a VAE to encode or decode")
        return self.codec

    # ---------------------------------------------------------------------------------------- all four
    def upscale_tensor(self, images: torch.Tensor, options: UpscaleOptions | Settings | None = None, *,
                       seeds: Sequence[int] | None = None, prompt_embeds: torch.Tensor | None = None,
                       prompt_pooled: torch.Tensor | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, 3, round(H*scale), round(W*scale)) in [0, 1].

        ``seeds`` gives each image its own seed (default: the options' seed for all)."""
        settings = self.settings(options)
        images = check_images(images)
        with self.first_call:
            lr = self.encode(images, settings)
            latent = self.sample(lr, settings, seeds=seeds, prompt_embeds=prompt_embeds, prompt_pooled=prompt_pooled,
                                 progress=progress)
            return self.finish(self.decode(latent, settings), images, settings)

    def __call__(self, images: Image.Image | Sequence[Image.Image] | torch.Tensor,
                 options: UpscaleOptions | Settings | None = None, **kwargs):
        """Upscale PIL image(s) or a tensor; returns the same kind. See :meth:`upscale_tensor`."""
        if isinstance(images, torch.Tensor):
            return self.upscale_tensor(images, options, **kwargs)
        single = isinstance(images, Image.Image)
        results = [self.upscale_image(from_pil(img), options, **kwargs) for img in ([images] if single else images)]
        return results[0] if single else results

    def upscale_image(self, image: RGBAlpha, options: UpscaleOptions | Settings | None = None, **kwargs) -> Image.Image:
        """One decoded image (RGB + optional alpha) -> PIL result; alpha is upscaled bicubically and a
        grayscale input gives a grayscale result."""
        rgb = self.upscale_tensor(image.rgb[None], options, **kwargs)[0]
        alpha = None
        if image.alpha is not None:
            alpha = resize(image.alpha[None], *rgb.shape[-2:])[0]
        return to_pil(rgb, alpha, gray=image.gray)


def load_prepared(path: str | os.PathLike | None, runtime: Runtime, *, vae: str | os.PathLike | None = None,
                  prompt: str | os.PathLike | None = None, place: bool = True) -> Bundle:
    """A model loaded and made ready to run (``from_pretrained`` without the upscaler): the memory
    check first, then the weights, the parts given (``vae``, ``prompt``), ``runtime.prepare``. A model
    without a VAE is fine here; a host that brings its own VAE (ComfyUI's) loads through this."""
    runtime = runtime.resolved()
    path = resolve_model(path) if path is not None else default_model_path()
    log.info(check_fits(path, runtime, gpu=place).describe())  # from the header and free memory, before the load
    # straight into the compute dtype (fp8 is quantized from the stored precision, so read as stored)
    bundle = load_model(path, dtype=None if runtime.weights == "fp8" else runtime.dtype)
    if vae is not None:
        from .checkpoint import import_vae

        bundle.vae = import_vae(vae)
        bundle.defaults.use_vae(bundle.vae, same_latent_space=True)
    if prompt is not None:
        from .checkpoint import read_prompt_file

        bundle.prompt_embeds, bundle.prompt_pooled = read_prompt_file(prompt)
    return prepare(bundle, runtime, place=place)


def check_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) (or (3, H, W)) finite values in [0, 1], of a size SMFSR takes."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise SMFSRError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    check_size(images.shape[-1], images.shape[-2])
    if not torch.isfinite(images).all() or images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise SMFSRError("image values must be finite and in [0, 1]")
    return images


__all__ = ["SMFSRUpscaler", "UpscaleOptions", "Settings", "VAETiling", "LRLatent", "decode_latent", "finish",
           "seeded_noise", "resize"]
