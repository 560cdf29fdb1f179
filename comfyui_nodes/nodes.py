"""SMFSR nodes for ComfyUI (V3 schema). Each node translates ComfyUI types and makes one core call.

Chain: Model Loader -> LR Encode (stage 1) -> Sampler (stage 2) -> Tiled VAE Decode (stage 3) ->
Color Fix (stage 4: resize to scale x the input and colour-fix), or the all-in-one Upscale node,
which is those four calls. LATENTs stay in ComfyUI's raw VAE space, so core nodes can read them.
Every setting left at 0 / "auto" takes the model's stored default, as in every other door.
"""

from __future__ import annotations

import logging
import os

import comfy.utils
import folder_paths
from comfy_api.latest import io

from smfsr.checkpoint import PipelineDefaults
from smfsr.errors import SMFSRError, door_message
from smfsr.options import (BLOCK_SWAP, COLOR_FIX_CHOICES, DTYPE_CHOICES, LATENT_TILE, LATENT_TILE_OVERLAP,
                           MAX_SEED, SCALE, STEPS, VAE_TILE, UpscaleOptions)
from smfsr.runtime import WEIGHTS
from smfsr.pipeline import LRLatent, decode_latent, finish

from . import model as models
from .convert import image_from_core, image_to_core, lr_latent, moments_of, text_from_conditioning

log = logging.getLogger("smfsr")
CATEGORY = "SMFSR"
# how an option the core names is called on these nodes, for messages (smfsr.errors.door_message)
WIDGETS = {"steps": "the steps widget", "latent_tile": "the latent_tile widget",
           "latent_tile_overlap": "the latent_tile_overlap widget", "vae_tile": "the vae_tile widget",
           "weights": "the loader's weights widget", "dtype": "the loader's dtype widget",
           "block_swap": "the loader's block_swap widget", "scale": "the scale widget",
           "color_fix": "the color_fix widget", "model": "the loader's model_name",
           "vae_input": "the VAE (SMFSR VAE from Checkpoint, from models/checkpoints)",
           "encoders_input": "the CLIP (TripleCLIPLoader from models/text_encoders, or SMFSR CLIP from Checkpoint)"}
SMFSRModelType = io.Custom("SMFSR_MODEL")
AUTO = "auto"


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


# Inputs several nodes share, declared once so their defaults and tooltips agree.
def model_input(optional: bool = False, tooltip: str = "From SMFSR Model Loader.") -> io.Input:
    return SMFSRModelType.Input("smfsr_model", optional=optional, tooltip=tooltip)


def scale_input() -> io.Input:
    return io.Float.Input("scale", default=0.0, min=SCALE.minimum, max=SCALE.maximum, step=SCALE.step,
                          tooltip="Output size / input size; 0 = the model's factor (x4).")


def seed_input() -> io.Input:
    return io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                        tooltip="Start noise and LR posterior sample; same seed, same image, whatever the tiles.")


def sampling_inputs() -> list[io.Input]:
    return [
        io.Int.Input("steps", default=0, min=STEPS.minimum, max=STEPS.maximum,
                     tooltip="Mean-flow steps; 0 = the model's default. One-step models (the shipped small models, "
                             "the official SMFSR weights) take exactly 1: more is refused with the reason."),
        io.Int.Input("latent_tile", default=0, min=LATENT_TILE.minimum, max=LATENT_TILE.maximum, step=LATENT_TILE.step,
                     tooltip="The network's tile, in latent cells (1 cell = 8 px for SD3.5's VAE, 4 px for the "
                             "small models); a multiple of the model's patch size. 0 = the model's default."),
        io.Int.Input("latent_tile_overlap", default=0, min=LATENT_TILE_OVERLAP.minimum,
                     max=LATENT_TILE_OVERLAP.maximum, step=LATENT_TILE_OVERLAP.step,
                     tooltip="Overlap between network tiles, in latent cells (Gaussian-blended); 0 = the model's, "
                             "in proportion to the tile."),
    ]


def color_fix_input() -> io.Input:
    return io.Combo.Input("color_fix", options=list(COLOR_FIX_CHOICES), default=AUTO,
                          tooltip="Colour toward the input: adain (mean/std), wavelet (low band) or none; auto = the model's.")


def vae_tile_input() -> io.Input:
    return io.Int.Input("vae_tile", default=0, min=VAE_TILE.minimum, max=VAE_TILE.maximum, step=VAE_TILE.step,
                        tooltip="The VAE's tile, in latent cells (decoding: that many latent cells; encoding: the "
                                "same area in image px); tiled equals untiled, memory follows the tile. "
                                "0 = automatic: images over 1 MP are tiled, with a size from free memory.")


def user_error(e: Exception) -> Exception:
    """What ComfyUI shows: the message, in this host's terms (widget names, not CLI flags)."""
    return RuntimeError(door_message(e, WIDGETS)) if isinstance(e, SMFSRError) else e


def announce(upscaler, image, options) -> None:
    """A long job's size, tiles and estimated time, on the console before it starts."""
    line = upscaler.announcement(int(image.shape[1]), int(image.shape[2]), options)
    if line:
        log.warning("SMFSR Upscale: %s x %d image(s)", line, int(image.shape[0]))


class SMFSRModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRModelLoader",
            display_name="SMFSR Model Loader",
            category=CATEGORY,
            description="Loads an SMFSR bundle (.safetensors) or an official SMFSR folder from models/smfsr.",
            inputs=[
                io.Combo.Input("model_name", options=models.model_names(), default=models.default_name(),
                               tooltip="A bundle from models/smfsr (make one with `smfsr convert`) or an official "
                                       "folder; the shipped small models are listed too (default: smfsr-small-x4)."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto",
                               tooltip="Compute precision: auto = bf16/fp16 on GPU, fp32 on CPU."),
                io.Combo.Input("weights", options=list(WEIGHTS), default="auto",
                               tooltip="fp8_e4m3fn: the transformer blocks in fp8 (half of bf16's memory; an fp8 "
                                       "bundle is always fp8). auto: as stored."),
                io.Int.Input("block_swap", default=0, min=BLOCK_SWAP.minimum, max=BLOCK_SWAP.maximum,
                             tooltip="Transformer blocks kept in system memory and streamed to the GPU as they run "
                                     "(same pixels, less VRAM). -1 = as many as free VRAM needs; --lowvram/--novram "
                                     "turn it on by themselves."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the networks: the first run compiles (slow), later runs of the "
                                         "same size are faster."),
            ],
            outputs=[SMFSRModelType.Output(display_name="smfsr_model")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str, dtype: str, weights: str = "auto", block_swap: int = 0,
                           compile: bool = False):
        settings = f"{model_name}:{dtype}:{weights}:{block_swap}:{compile}"
        try:  # reload when the file changes on disk
            return f"{settings}:{os.path.getmtime(models.model_path(model_name))}"
        except Exception:
            return settings

    @classmethod
    def execute(cls, model_name: str, dtype: str, weights: str = "auto", block_swap: int = 0,
                compile: bool = False) -> io.NodeOutput:
        try:
            return io.NodeOutput(models.load(model_name, dtype, weights, block_swap, compile))
        except SMFSRError as e:
            raise user_error(e) from None


class SMFSRCheckpointVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRCheckpointVAELoader",
            display_name="SMFSR VAE from Checkpoint",
            category=CATEGORY,
            description="Loads only the VAE of a checkpoint: an SMFSR graph needs SD3.5's VAE, not its MMDiT, so this "
                        "reads about 0.17 GB of sd3.5_medium.safetensors instead of the whole 5 GB file (what "
                        "Load Checkpoint would keep in memory).",
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                                   tooltip="A checkpoint in models/checkpoints that holds a VAE (Stability's "
                                           "sd3.5_medium.safetensors, or Comfy-Org's all-in-one file).")],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        import comfy.sd

        try:
            state = models.checkpoint_vae_state(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
        except SMFSRError as e:
            raise user_error(e) from None
        vae = comfy.sd.VAE(sd=state)
        vae.throw_exception_if_invalid()
        return io.NodeOutput(vae)


class SMFSRCheckpointCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRCheckpointCLIPLoader",
            display_name="SMFSR CLIP from Checkpoint",
            category=CATEGORY,
            description="Loads only the text encoders (CLIP-L, CLIP-G, T5-XXL) of an all-in-one SD3.5 checkpoint, with "
                        "ComfyUI's own SD3 text-encoder loader: an SMFSR graph does not use the checkpoint's MMDiT, "
                        "which Load Checkpoint would keep in memory (about 10 GB in fp32 on a CPU).",
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                                   tooltip="A checkpoint in models/checkpoints that holds the text encoders "
                                           "(Comfy-Org's sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors).")],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils

        try:
            states = models.checkpoint_text_encoder_states(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
        except SMFSRError as e:
            raise user_error(e) from None
        # as ComfyUI's CLIP loaders read a text-encoder file: scaled fp8 (T5) converted, then the SD3 set
        states = [comfy.utils.convert_old_quants(state, model_prefix="", metadata={})[0] for state in states]
        clip = comfy.sd.load_text_encoder_state_dicts(states, clip_type=comfy.sd.CLIPType.SD3,
                                                      embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(clip)


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
                vae_tile_input(),
            ],
            outputs=[io.Latent.Output(display_name="lr_latent"), io.Image.Output(display_name="lr_upscaled")],
        )

    @classmethod
    def execute(cls, image, smfsr_model, vae_tile: int, vae=None) -> io.NodeOutput:
        try:
            lr = smfsr_model.upscaler_for(vae).encode(image_to_core(image), UpscaleOptions.from_widgets(vae_tile=vae_tile))
        except SMFSRError as e:
            raise user_error(e) from None
        return io.NodeOutput(lr_latent(lr.mean, lr.logvar), image_from_core(lr.control))


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
                io.Latent.Input("lr_latent", tooltip="From SMFSR LR Encode, connected directly: it carries the LR "
                                                     "posterior's variance, which core LATENT nodes drop."),
                seed_input(),
                *sampling_inputs(),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="SD3 text conditioning; empty = the model's stored prompt embedding."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, smfsr_model, lr_latent, seed: int, steps: int, latent_tile: int, latent_tile_overlap: int,
                conditioning=None) -> io.NodeOutput:
        try:
            embeds, pooled = text_from_conditioning(conditioning) if conditioning is not None else (None, None)
            mean, logvar = moments_of(lr_latent, smfsr_model.defaults, smfsr_model.bundle.transformer.config)
            options = UpscaleOptions.from_widgets(seed=seed, steps=steps, tile_size=latent_tile,
                                                  tile_overlap=latent_tile_overlap)
            latent = smfsr_model.sampler().sample(LRLatent(mean, logvar), options, prompt_embeds=embeds,
                                                  prompt_pooled=pooled, progress=progress_bar())
        except SMFSRError as e:
            raise user_error(e) from None
        return io.NodeOutput({"samples": latent.float().cpu()})


class SMFSRTiledVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRTiledVAEDecode",
            display_name="SMFSR Tiled VAE Decode",
            category=CATEGORY,
            description="Decodes a raw LATENT with SMFSR's exact tiled VAE: GroupNorm statistics pooled over all tiles, "
                        "so the result equals an untiled decode (no seams, no colour shifts) with memory set by the tile. "
                        "Works for any model's latents with that model's VAE.",
            inputs=[
                io.Latent.Input("samples", tooltip="A LATENT (raw VAE space), e.g. from SMFSR Sampler."),
                io.Vae.Input("vae", optional=True, tooltip="A core VAE (e.g. from your SD3.5 checkpoint loader)."),
                model_input(optional=True, tooltip="Or an SMFSR model with its own VAE (used when vae is empty)."),
                vae_tile_input(),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae_tile: int, vae=None, smfsr_model=None) -> io.NodeOutput:
        import comfy.model_management as mm

        try:
            if vae is not None:
                mm.load_models_gpu([vae.patcher])
                module = vae.first_stage_model
            else:
                module = smfsr_model.vae_module() if smfsr_model is not None else None
                if module is None:
                    raise SMFSRError("connect a VAE, or an SMFSR model that contains its own VAE")
            tiling = UpscaleOptions.from_widgets(vae_tile=vae_tile).vae_tiling
            image = decode_latent(module, samples["samples"], tiling)
        except SMFSRError as e:
            raise user_error(e) from None
        return io.NodeOutput(image_from_core(image))


class SMFSRColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SMFSRColorFix",
            display_name="SMFSR Color Fix",
            category=CATEGORY,
            description="Resizes the image to scale x the reference (the low-resolution input) and takes the reference's "
                        "colour, keeping the image's detail: SMFSR's last stage.",
            inputs=[
                io.Image.Input("image", tooltip="The super-resolved image (any size: it is resized bicubically)."),
                io.Image.Input("reference", tooltip="The low-resolution input."),
                color_fix_input(),
                scale_input(),
                model_input(optional=True, tooltip="The SMFSR model whose defaults 0 / auto take; without it, "
                                                   "the official ones (x4, adain)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, reference, color_fix: str, scale: float, smfsr_model=None) -> io.NodeOutput:
        defaults = smfsr_model.defaults if smfsr_model is not None else PipelineDefaults()
        try:
            settings = UpscaleOptions.from_widgets(scale=scale, color_fix=color_fix).resolve(defaults, 1)
        except SMFSRError as e:
            raise user_error(e) from None
        out = finish(image_to_core(image), image_to_core(reference), settings.scale, settings.color_fix)
        return io.NodeOutput(image_from_core(out))


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
                color_fix_input(),
                vae_tile_input(),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, smfsr_model, scale: float, seed: int, steps: int, latent_tile: int,
                latent_tile_overlap: int, color_fix: str, vae_tile: int, vae=None) -> io.NodeOutput:
        try:
            options = UpscaleOptions.from_widgets(scale=scale, seed=seed, steps=steps, tile_size=latent_tile,
                                                  tile_overlap=latent_tile_overlap, color_fix=color_fix,
                                                  vae_tile=vae_tile)
            upscaler = smfsr_model.upscaler_for(vae)
            announce(upscaler, image, options)
            out = upscaler.upscale_tensor(image_to_core(image), options, progress=progress_bar())
        except SMFSRError as e:
            raise user_error(e) from None
        return io.NodeOutput(image_from_core(out))


NODES = [SMFSRModelLoader, SMFSRCheckpointVAELoader, SMFSRCheckpointCLIPLoader, SMFSRLREncode, SMFSRSampler, SMFSRTiledVAEDecode, SMFSRColorFix,
         SMFSRUpscale]
