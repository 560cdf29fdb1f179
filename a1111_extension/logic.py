"""What the A1111/Forge upscaler decides, without importing A1111 (so CI can test it)."""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from smfsr.checkpoint.catalog import ModelEntry, find_models
from smfsr.checkpoint.default_model import REPO_MODELS
from smfsr.options import (BLOCK_SWAP, COLOR_FIX_CHOICES, DTYPE_CHOICES, LATENT_TILE, LATENT_TILE_OVERLAP, STEPS,
                           VAE_TILE, Range, UpscaleOptions)
from smfsr.runtime import WEIGHTS, Runtime

SECTION = ("upscaling", "Upscaling")
MODEL_DIR_NAME = "SMFSR"  # models/SMFSR, like models/ESRGAN


@dataclass(frozen=True)
class Setting:
    key: str
    default: object
    label: str
    kind: str  # slider | number | radio
    args: dict


def slider(r: Range) -> dict:
    return {"minimum": r.minimum, "maximum": r.maximum, "step": r.step}


# 0 / "auto" everywhere means what the chosen model stores, as in every other door; the ranges and
# lists are the core's (smfsr.options), as every door offers them.
SETTINGS = [
    Setting("smfsr_steps", 0, "SMFSR steps (0 = the model's default, one step)", "slider", slider(STEPS)),
    # 0, as in every other door: the same input gives the same image each time
    Setting("smfsr_seed", 0, "SMFSR seed (-1 = random each time)", "number", {"precision": 0}),
    Setting("smfsr_tile", 0, "SMFSR latent tile size (latent px; 0 = the model's default)", "slider",
            slider(LATENT_TILE)),
    Setting("smfsr_tile_overlap", 0, "SMFSR latent tile overlap (0 = the model's, in proportion to the tile)",
            "slider", slider(LATENT_TILE_OVERLAP)),
    Setting("smfsr_vae_tile", 0, "SMFSR VAE tile (latent px; 0 = automatic, from free memory)", "slider",
            slider(VAE_TILE)),
    Setting("smfsr_color_fix", "auto", "SMFSR colour fix (auto = the model's default)", "radio",
            {"choices": list(COLOR_FIX_CHOICES)}),
    Setting("smfsr_dtype", "auto", "SMFSR precision", "radio", {"choices": list(DTYPE_CHOICES)}),
    Setting("smfsr_weights", "auto", "SMFSR weights (fp8_e4m3fn: the transformer blocks in fp8, half of bf16's "
            "memory)", "radio", {"choices": list(WEIGHTS)}),
    Setting("smfsr_block_swap", 0, "SMFSR block swap (transformer blocks streamed from system memory; -1 = from free "
            "VRAM; --lowvram/--medvram turn it on)", "slider", slider(BLOCK_SWAP)),
]
DEFAULTS = {s.key: s.default for s in SETTINGS}


def model_folders(models_path: str | Path, user_path: str | None) -> list[Path]:
    """models/SMFSR, the --smfsr-models-path folder, and the repository's bundled models/."""
    folders = [Path(models_path) / MODEL_DIR_NAME]
    if user_path:
        folders.insert(0, Path(user_path))
    folders.append(REPO_MODELS)
    return folders


def discover(models_path: str | Path, user_path: str | None) -> list[ModelEntry]:
    return find_models(model_folders(models_path, user_path))


def options(settings: dict, scale: float, rng: random.Random | None = None) -> UpscaleOptions:
    """The pipeline options for one A1111 upscale call at the requested scale.

    A1111 calls do_upscale until the image reaches scale x input and then Lanczos-resizes to a
    multiple of 8; producing scale x input in one pass means one model run and no second pass."""
    s = {**DEFAULTS, **{k: v for k, v in settings.items() if k in DEFAULTS}}
    seed = int(s["smfsr_seed"])
    if seed < 0:
        seed = (rng or random.SystemRandom()).randrange(2**32)
    return UpscaleOptions.from_widgets(scale=scale, seed=seed, steps=s["smfsr_steps"], tile_size=s["smfsr_tile"],
                                       tile_overlap=s["smfsr_tile_overlap"], color_fix=s["smfsr_color_fix"],
                                       vae_tile=s["smfsr_vae_tile"])


def runtime(settings: dict, device, no_half: bool, lowvram: bool) -> Runtime:
    """How the model loads under these settings (--no-half: fp32; a low-VRAM web UI swaps blocks)."""
    s = {**DEFAULTS, **{k: v for k, v in settings.items() if k in DEFAULTS}}
    return Runtime.from_widgets(device, "fp32" if no_half else s["smfsr_dtype"], weights=s["smfsr_weights"],
                                block_swap=s["smfsr_block_swap"], low_memory=lowvram)


# how an option the core names is called in the web UI, for messages (smfsr.errors.door_message)
SETTING_NAMES = {
    "steps": "Settings > Upscaling > 'SMFSR steps'", "seed": "Settings > Upscaling > 'SMFSR seed'",
    "latent_tile": "Settings > Upscaling > 'SMFSR latent tile size'",
    "latent_tile_overlap": "Settings > Upscaling > 'SMFSR latent tile overlap'",
    "vae_tile": "Settings > Upscaling > 'SMFSR VAE tile'", "color_fix": "Settings > Upscaling > 'SMFSR colour fix'",
    "dtype": "Settings > Upscaling > 'SMFSR precision'", "weights": "Settings > Upscaling > 'SMFSR weights'",
    "block_swap": "Settings > Upscaling > 'SMFSR block swap'", "scale": "the upscale factor (Resize)",
    "device": "the web UI's device (--use-cpu)", "model": "the upscaler",
    "vae_input": "a bundle's VAE (`smfsr convert --vae`)", "encoders_input": "a bundle's prompt (`smfsr convert --sd35`)",
}


@contextmanager
def host_model_aside(model, lowvram: bool, to_cpu, to_device):
    """While SMFSR runs on a GPU, the web UI's SD model goes to the CPU only when the user asked for
    low VRAM (--lowvram/--medvram), and back after, even if the upscale fails: A1111 does not reload
    a checkpoint that is already loaded, so Hires. fix's VAE encode right after the upscale, and every
    later generation, would otherwise find a CPU model. Without low VRAM the model stays where it is
    (SMFSR's own memory check says what to lower when both do not fit)."""
    move = lowvram and model is not None
    if move:
        to_cpu(model)
    try:
        yield
    finally:
        if move:
            to_device(model)


def settings_key(settings: dict) -> tuple:
    """What our settings are now; a change invalidates A1111's Extras result cache."""
    return tuple(settings.get(k, DEFAULTS[k]) for k in DEFAULTS)
