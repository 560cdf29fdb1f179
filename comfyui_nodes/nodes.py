"""SMFSR nodes for ComfyUI (V3 schema). Each node translates ComfyUI types and calls the core.

Chain: Model Loader -> LR Encode -> Sampler -> Tiled VAE Decode -> Color Fix, or the all-in-one
Upscale node. LATENTs stay in ComfyUI's raw VAE space; the sampler normalises with the model's
scale/shift on the way in and undoes it on the way out, so core nodes can read its output.
"""

from __future__ import annotations

import os

import comfy.utils
from comfy_api.latest import io

from smfsr.color import COLOR_FIXES, color_fix
from smfsr.errors import SMFSRError
from smfsr.pipeline import UpscaleOptions, resize
from smfsr.tiling.vae import VAETiling

from . import model as models
from .convert import image_from_core, image_to_core, lr_latent, moments_of, text_from_conditioning

CATEGORY = "SMFSR"
TARGET_KEY = "smfsr_target_size"  # (H, W) the decode node resizes to: scale x the input image
SMFSRModelType = io.Custom("SMFSR_MODEL")
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def progress_bar():
    """A ``progress(done, total)`` callback on a ComfyUI ProgressBar: every update is also an
    interrupt point (ComfyUI's progress hook raises if the user pressed Cancel)."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return update


def vae_tiling(tile: int, mode: str) -> VAETiling:
    """tile: core size in latent px (encoder: x8 px); 0 = chosen from free memory."""
    return VAETiling(mode=mode, decoder_tile=tile or None, encoder_tile=tile * 8 or None)


# Inputs several nodes share, declared once so their defaults and tooltips agree.
def model_input() -> io.Input:
    return SMFSRModelType.Input("smfsr_model", tooltip="From SMFSR Model Loader.")


def scale_input(what: str = "Output size / input size.") -> io.Input:
    return io.Float.Input("scale", default=4.0, min=0.25, max=16.0, step=0.25, tooltip=what)


def seed_input() -> io.Input:
    return io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                        tooltip="Start noise and LR posterior sample; same seed, same image, whatever the tiles.")


def sampling_inputs() -> list[io.Input]:
    return [
        io.Int.Input("steps", default=1, min=1, max=50, tooltip="Mean-flow steps (official: 1)."),
        io.Int.Input("tile_size", default=64, min=0, max=512, step=2,
                     tooltip="Latent tile for the network (latent px, 64 = 512 px); 0 = whole latent."),
        io.Int.Input("tile_overlap", default=24, min=0, max=256, step=2,
                     tooltip="Overlap between latent tiles, blended with Gaussian weights."),
    ]


def vae_tile_input() -> io.Input:
    return io.Int.Input("vae_tile", default=0, min=0, max=1024, step=8,
                        tooltip="VAE tile (latent px; the encoder uses x8 px). 0 = from free memory "
                                "(images under 1 MP are not tiled).")


def user_error(e: Exception) -> Exception:
    return RuntimeError(str(e)) if isinstance(e, SMFSRError) else e


class SMFSRModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRModelLoader",
            display_name="SMFSR Model Loader",
            category=CATEGORY,
            description="Loads an SMFSR bundle (.safetensors) or an official SMFSR folder from models/smfsr.",
            inputs=[
                io.Combo.Input("model_name", options=models.model_names(),
                               tooltip="A bundle from models/smfsr (make one with `smfsr convert`), or an official folder."),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto",
                               tooltip="Weight precision: auto = bf16/fp16 on GPU, fp32 on CPU."),
            ],
            outputs=[SMFSRModelType.Output(display_name="smfsr_model")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str, dtype: str):
        try:  # reload when the file changes on disk
            return f"{model_name}:{dtype}:{os.path.getmtime(models.model_path(model_name))}"
        except Exception:
            return f"{model_name}:{dtype}"

    @classmethod
    def execute(cls, model_name: str, dtype: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(models.load(model_name, dtype))
        except SMFSRError as e:
            raise user_error(e) from None


class SMFSRLREncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRLREncode",
            display_name="SMFSR LR Encode",
            category=CATEGORY,
            description="Bicubic-upsamples the low-resolution image to the model's working size and VAE-encodes it. "
                        "The LATENT holds raw VAE latents (ComfyUI's convention) plus the posterior variance.",
            inputs=[
                io.Image.Input("image", tooltip="The low-resolution image(s)."),
                model_input(),
                io.Vae.Input("vae", optional=True,
                             tooltip="The VAE from your SD3.5 checkpoint loader; leave empty to use the model's own VAE."),
                scale_input("Output size / input size, applied by SMFSR Tiled VAE Decode."),
                vae_tile_input(),
            ],
            outputs=[io.Latent.Output(display_name="lr_latent"), io.Image.Output(display_name="lr_upscaled")],
        )

    @classmethod
    def execute(cls, image, smfsr_model, scale: float, vae_tile: int, vae=None) -> io.NodeOutput:
        try:
            up = smfsr_model.upscaler_for(vae, vae_tiling(vae_tile, "exact"))
            x = image_to_core(image).to(up.device)
            control = up.prepare(x)
            mean, logvar = up.codec.moments(control)
        except (SMFSRError, ValueError) as e:
            raise user_error(e) from None
        latent = lr_latent(mean, logvar)
        latent[TARGET_KEY] = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
        return io.NodeOutput(latent, image_from_core(control))


class SMFSRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRSampler",
            display_name="SMFSR Sampler",
            category=CATEGORY,
            description="Noise-started mean-flow sampling (1 step by default) conditioned on the LR latent. "
                        "Input and output LATENTs are raw VAE space.",
            inputs=[
                model_input(),
                io.Latent.Input("lr_latent", tooltip="From SMFSR LR Encode (or a VAE Encode of the upsampled LR image)."),
                seed_input(),
                *sampling_inputs(),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="SD3 text conditioning; empty = the model's stored prompt embedding."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, smfsr_model, lr_latent, seed: int, steps: int, tile_size: int, tile_overlap: int,
                conditioning=None) -> io.NodeOutput:
        try:
            up = smfsr_model.sampler()
            mean, logvar = moments_of(lr_latent)
            embeds = pooled = None
            if conditioning is not None:
                embeds, pooled = text_from_conditioning(conditioning)
            embeds, pooled = up.text(mean.shape[0], embeds, pooled)
            up.check_tile(tile_size, tile_overlap)
            latent = up.generate(mean.to(up.device), None if logvar is None else logvar.to(up.device),
                                 seeds=[seed] * mean.shape[0], steps=steps, tile=tile_size, overlap=tile_overlap,
                                 embeds=embeds, pooled=pooled, progress=progress_bar())
        except (SMFSRError, ValueError) as e:
            raise user_error(e) from None
        out = {"samples": up.codec.denormalize(latent).float().cpu()}
        if TARGET_KEY in lr_latent:
            out[TARGET_KEY] = lr_latent[TARGET_KEY]
        return io.NodeOutput(out)


class SMFSRTiledVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRTiledVAEDecode",
            display_name="SMFSR Tiled VAE Decode",
            category=CATEGORY,
            description="Decodes a raw LATENT with SMFSR's exact tiled VAE: GroupNorm statistics pooled over all tiles, "
                        "so the result equals an untiled decode (no seams, no colour shifts) with memory set by the tile.",
            inputs=[
                io.Latent.Input("samples", tooltip="A LATENT from SMFSR Sampler (raw VAE space)."),
                io.Vae.Input("vae", optional=True, tooltip="A core VAE (e.g. from your SD3.5 checkpoint loader)."),
                SMFSRModelType.Input("smfsr_model", optional=True,
                                     tooltip="Or an SMFSR model with its own VAE (used when vae is empty)."),
                io.Int.Input("tile_size", default=0, min=0, max=1024, step=8,
                             tooltip="Tile core in latent px (x8 px of output); 0 = from free memory."),
                io.Combo.Input("mode", options=["exact", "fast"], default="exact",
                               tooltip="exact: identical to untiled. fast: approximate statistics, per-tile attention."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, tile_size: int, mode: str, vae=None, smfsr_model=None) -> io.NodeOutput:
        import comfy.model_management as mm

        from smfsr.codec import LatentCodec

        try:
            if vae is not None:
                mm.load_models_gpu([vae.patcher])
                module = vae.first_stage_model
            elif smfsr_model is not None and smfsr_model.bundle.vae is not None:
                mm.load_models_gpu(smfsr_model.patchers)
                module = smfsr_model.bundle.vae
            else:
                raise ValueError("connect a VAE, or an SMFSR model that contains its own VAE")
            codec = LatentCodec(module, 1.0, 0.0, vae_tiling(tile_size, mode))  # raw latents: no scaling
            if tile_size:
                codec.tiling.threshold_pixels = 0
            image = codec.decode(samples["samples"])
            if TARGET_KEY in samples:
                image = resize(image, *samples[TARGET_KEY])
        except (SMFSRError, ValueError) as e:
            raise user_error(e) from None
        return io.NodeOutput(image_from_core(image))


class SMFSRColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRColorFix",
            display_name="SMFSR Color Fix",
            category=CATEGORY,
            description="Takes colour from the reference (the LR image, resized to match) and detail from the image.",
            inputs=[
                io.Image.Input("image", tooltip="The super-resolved image."),
                io.Image.Input("reference", tooltip="The low-resolution input (any size: it is resized bicubically)."),
                io.Combo.Input("method", options=list(COLOR_FIXES), default="adain",
                               tooltip="adain: match mean/std per channel; wavelet: swap the low-frequency band."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, reference, method: str) -> io.NodeOutput:
        x = image_to_core(image)
        ref = resize(image_to_core(reference), *x.shape[-2:])
        return io.NodeOutput(image_from_core(color_fix(x, ref, method)))


class SMFSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRUpscale",
            display_name="SMFSR Upscale",
            category=CATEGORY,
            description="The whole SMFSR upscale in one node: LR encode, one-step sampling, exact tiled decode, colour fix.",
            inputs=[
                io.Image.Input("image", tooltip="The low-resolution image(s)."),
                model_input(),
                io.Vae.Input("vae", optional=True, tooltip="Your SD3.5 VAE; empty = the model's own VAE."),
                scale_input(),
                seed_input(),
                *sampling_inputs(),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="Colour correction toward the input: adain, wavelet or none."),
                vae_tile_input(),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, smfsr_model, scale: float, seed: int, steps: int, tile_size: int, tile_overlap: int,
                color_fix: str, vae_tile: int, vae=None) -> io.NodeOutput:
        try:
            up = smfsr_model.upscaler_for(vae, vae_tiling(vae_tile, "exact"))
            options = UpscaleOptions(scale=scale, seed=seed, steps=steps, tile_size=tile_size, tile_overlap=tile_overlap,
                                     color_fix=color_fix)
            x = image_to_core(image)
            out = up.upscale_tensor(x, options, seeds=[seed] * x.shape[0], progress=progress_bar())
        except (SMFSRError, ValueError) as e:
            raise user_error(e) from None
        return io.NodeOutput(image_from_core(out))


NODES = [SMFSRModelLoader, SMFSRLREncode, SMFSRSampler, SMFSRTiledVAEDecode, SMFSRColorFix, SMFSRUpscale]
