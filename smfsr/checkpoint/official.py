"""Importers: the official release layout (``<dir>/transformer/config.json`` + weights) and diffusers
VAEs (folders or single files), and ``load_model``, which takes whatever a user points at."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .build import OPTIONAL_TRANSFORMER_KEYS, build_transformer, build_vae, check_state, expected_shapes, \
    fill_transformer, load_into
from .bundle import Bundle, PipelineDefaults, load_bundle, read_prompt_file, to_device
from .safe_read import PICKLE_SUFFIXES, load_tensors, read_header, refuse_pickle

OFFICIAL_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the config ({e})") from None


def _find_weights(folder: Path) -> Path:
    weights = folder / OFFICIAL_WEIGHTS
    if weights.exists():
        return weights
    pickled = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        refuse_pickle(pickled[0])
    shards = sorted(folder.glob("*.safetensors.index.json"))
    if shards:
        raise CheckpointError(f"{folder} holds a sharded checkpoint ({shards[0].name}); merge the shards into "
                              f"{OFFICIAL_WEIGHTS} first")
    raise CheckpointError(f"{folder}: expected the weights file {weights.name} beside config.json")


def transformer_folder(folder: str | os.PathLike) -> Path:
    """The folder holding the transformer's config.json: ``<dir>/transformer`` or ``<dir>`` itself."""
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    if not (folder / "config.json").exists():
        raise CheckpointError(
            f"{folder}: no config.json. Expected the official layout <dir>/transformer/config.json "
            f"+ <dir>/transformer/{OFFICIAL_WEIGHTS} (as downloaded from the SMFSR release)."
        )
    return folder


def official_transformer_config(folder: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """The official config.json plus our behaviour switches set to what the official weights expect.
    SMFSR vs the DiT4SR teacher is told from the keys (``time_text_embed_interval.*``)."""
    if shapes is None:
        _, header = read_header(_find_weights(folder))
        shapes = {k: v[0] for k, v in header.items()}
    interval = any(k.startswith("time_text_embed_interval.") for k in shapes)
    config = {
        **_read_json(folder / "config.json"),
        "interval_embedding": interval,
        "time_scale": 1.0 if interval else 1000.0,
        "lr_key_quirk": True,
        "control_scale": 1.2,
        "official_dead_modules": True,
    }
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = tuple(config["dual_attention_layers"])
    return config


def import_official_transformer(folder: str | os.PathLike) -> torch.nn.Module:
    """An official SMFSR (or DiT4SR teacher) ``transformer/`` folder: config.json + weights."""
    folder = transformer_folder(folder)
    weights = _find_weights(folder)
    _, header = read_header(weights)
    shapes = {k: v[0] for k, v in header.items()}
    config = official_transformer_config(folder, shapes)

    def make():
        return build_transformer(config, folder / "config.json")

    what = "official SMFSR transformer" if config["interval_embedding"] else "DiT4SR teacher transformer"
    check_state(expected_shapes(make), shapes, what=what, path=weights, optional=OPTIONAL_TRANSFORMER_KEYS)
    return load_into(make, load_tensors(weights), fill_transformer)


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """An AutoencoderKL config from a diffusers-keyed VAE state dict (SD / SDXL / SD3 families)."""
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
    scale, shift = (1.5305, 0.0609) if latent == 16 else (0.18215, 0.0)
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
        weights = _find_weights(folder)
        config = _read_json(folder / "config.json") if (folder / "config.json").exists() else None
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
            config = infer_vae_config(shapes)
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e}") from None
    else:
        config = {k: v for k, v in config.items() if k in inspect.signature(AutoencoderKL.__init__).parameters}

    def make():
        return build_vae(config, weights)

    check_state(expected_shapes(make), shapes, what="diffusers AutoencoderKL", path=weights)
    return load_into(make, tensors if tensors is not None else load_tensors(weights))


def is_official_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "transformer" / "config.json").is_file()


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Bundle:
    """Whatever a user points at: a bundle file, or an official folder (transformer/ [+ vae/])."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        transformer = import_official_transformer(path)
        vae = import_vae(path) if (path / "vae").is_dir() else None
        prompt = path / "prompt.safetensors"  # an optional precomputed prompt beside the official folders
        embeds, pooled = read_prompt_file(prompt) if prompt.exists() else (None, None)
        defaults = PipelineDefaults()
        if vae is not None:
            defaults.vae_scaling_factor = float(vae.config.scaling_factor)
            defaults.vae_shift_factor = float(vae.config.shift_factor or 0.0)
        bundle = Bundle(transformer=transformer, vae=vae, prompt_embeds=embeds, prompt_pooled=pooled,
                        defaults=defaults, source=str(path))
        return to_device(bundle, device, dtype)
    return load_bundle(path, device=device, dtype=dtype)


def peek_model(path: str | os.PathLike) -> tuple[dict[str, Any], PipelineDefaults]:
    """(transformer config, pipeline defaults) of a bundle or official folder, from headers and
    config files only: what a door needs to check its options before the weights load."""
    from .bundle import read_bundle_info

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return official_transformer_config(transformer_folder(path)), PipelineDefaults()
    info = read_bundle_info(path)
    return info.transformer_config, info.defaults
