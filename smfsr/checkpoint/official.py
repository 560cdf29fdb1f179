"""Importers: the official release layout (``<dir>/transformer/config.json`` + weights) and diffusers
VAEs (folders or single files), and ``load_model``, which takes whatever a user points at."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .build import OPTIONAL_TRANSFORMER_KEYS, build_transformer, build_vae, check_state, expected_shapes, \
    filler, load_into
from .bundle import Bundle, load_bundle, read_prompt_file, to_device
from .defaults import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, SD35_VAE_SCALE, SD35_VAE_SHIFT, PipelineDefaults
from .peek import find_weights, official_transformer_config, read_json, transformer_folder
from .safe_read import load_tensors, read_header


def import_official_transformer(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An official SMFSR (or DiT4SR teacher) ``transformer/`` folder: config.json + weights, cast to
    ``dtype`` tensor by tensor as they are read (default: as stored)."""
    folder = transformer_folder(folder)
    weights = find_weights(folder)
    _, header = read_header(weights)
    shapes = {k: v[0] for k, v in header.items()}
    config = official_transformer_config(folder, shapes)

    def make():
        return build_transformer(config, folder / "config.json")

    what = "official SMFSR transformer" if config["interval_embedding"] else "DiT4SR teacher transformer"
    check_state(expected_shapes(make), shapes, what=what, path=weights, optional=OPTIONAL_TRANSFORMER_KEYS)
    return load_into(make, load_tensors(weights, dtype=dtype), filler(header))


def holds_flux_mmdit(names) -> bool:
    """A FLUX.1 single-file checkpoint: its MMDiT's double_blocks beside the VAE."""
    return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in names)


def infer_vae_config(shapes: dict[str, tuple[int, ...]], flux: bool = False) -> dict[str, Any]:
    """An AutoencoderKL config from a diffusers-keyed VAE state dict (SD / SDXL / SD3 families; ``flux``:
    FLUX.1's, the same architecture as SD3's with other constants)."""
    if "decoder.conv_in.weight" not in shapes:
        if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in shapes):
            raise CheckpointError(
                "this VAE uses the original (ldm) key names, not diffusers'. Use a diffusers VAE folder "
                "(config.json + diffusion_pytorch_model.safetensors), e.g. the vae/ folder of SD3.5-medium."
            )
        raise CheckpointError("this file does not look like a VAE (no decoder.conv_in.weight)")
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    latent = shapes["decoder.conv_in.weight"][1]
    blocks = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels)
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    # SD3.x or SD1.x by the channels; a 16-channel VAE inside a FLUX.1 checkpoint is FLUX.1's
    scale, shift = (SD35_VAE_SCALE, SD35_VAE_SHIFT) if latent == 16 else (0.18215, 0.0)
    if flux:
        scale, shift = FLUX_VAE_SCALE, FLUX_VAE_SHIFT
    return dict(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=blocks,
        layers_per_block=layers, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), scaling_factor=scale, shift_factor=shift,
        use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
    )


LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")  # a VAE inside a single-file checkpoint (SD3.5's own)


def _ldm_vae_tensors(path: Path, header: dict) -> dict[str, torch.Tensor] | None:
    """A single file's VAE in the original (ldm) names, converted to diffusers' names by diffusers'
    own converter; None if the file holds no ldm-named VAE."""
    prefix = next((p for p in LDM_VAE_PREFIXES if any(k.startswith(p + "decoder.up.") for k in header)), None)
    if prefix is None and not any(k.startswith("decoder.up.") for k in header):
        return None
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = load_tensors(path, prefix=prefix or "")
    levels = len({k.split(".")[2] for k in ldm if k.startswith("encoder.down.")})
    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    return convert_ldm_vae_checkpoint(ldm, config)


def import_vae(path: str | os.PathLike) -> torch.nn.Module:
    """A VAE: a diffusers folder (``vae/`` or one holding config.json + weights), a diffusers single
    file, or the VAE inside a single-file checkpoint in the original names (SD3.5's ``sd3.5_medium.safetensors``)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    path = Path(path)
    tensors = None
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        weights = find_weights(folder)
        config = read_json(folder / "config.json") if (folder / "config.json").exists() else None
    else:
        weights, config = path, None
    _, header = read_header(weights)
    shapes = {k: v[0] for k, v in header.items()}
    if config is None and "decoder.conv_in.weight" not in shapes:
        tensors = _ldm_vae_tensors(weights, shapes)
        if tensors is not None:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if config is None:
        try:
            config = infer_vae_config(shapes, holds_flux_mmdit(header))
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e}") from None
    else:
        config = {k: v for k, v in config.items() if k in inspect.signature(AutoencoderKL.__init__).parameters}

    def make():
        return build_vae(config, weights)

    check_state(expected_shapes(make), shapes, what="diffusers AutoencoderKL", path=weights)
    return load_into(make, tensors if tensors is not None else load_tensors(weights))


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Bundle:
    """Whatever a user points at: a bundle file, or an official folder (transformer/ [+ vae/]),
    ``dtype`` (default: as stored) given to the weights as they are read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        transformer = import_official_transformer(path, dtype)
        vae = import_vae(path) if (path / "vae").is_dir() else None
        prompt = path / "prompt.safetensors"  # an optional precomputed prompt beside the official folders
        embeds, pooled = read_prompt_file(prompt) if prompt.exists() else (None, None)
        # the official network is SD3.5's: a vae/ folder beside it must be SD3.5's VAE
        defaults = PipelineDefaults() if vae is None else PipelineDefaults().use_vae(vae, same_latent_space=True)
        bundle = Bundle(transformer=transformer, vae=vae, prompt_embeds=embeds, prompt_pooled=pooled,
                        defaults=defaults, source=str(path))
        return to_device(bundle, device, dtype)
    return load_bundle(path, device=device, dtype=dtype)
