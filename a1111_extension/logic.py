"""What the A1111/Forge upscaler decides, without importing A1111 (so CI can test it)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from smfsr.models.catalog import ModelEntry, find_models
from smfsr.models.default import REPO_MODELS
from smfsr.pipeline import UpscaleOptions

SECTION = ("upscaling", "Upscaling")
MODEL_DIR_NAME = "SMFSR"  # models/SMFSR, like models/ESRGAN


@dataclass(frozen=True)
class Setting:
    key: str
    default: object
    label: str
    kind: str  # slider | number | radio
    args: dict


SETTINGS = [
    Setting("smfsr_steps", 1, "SMFSR steps (1 = one-step, as trained)", "slider", {"minimum": 1, "maximum": 8, "step": 1}),
    Setting("smfsr_seed", -1, "SMFSR seed (-1 = random each time)", "number", {"precision": 0}),
    Setting("smfsr_tile", 64, "SMFSR latent tile size (latent px; 0 = whole image)", "slider", {"minimum": 0, "maximum": 256, "step": 8}),
    Setting("smfsr_tile_overlap", 24, "SMFSR latent tile overlap", "slider", {"minimum": 0, "maximum": 128, "step": 4}),
    Setting("smfsr_vae_tile", 0, "SMFSR VAE tile (latent px; 0 = from free memory)", "slider", {"minimum": 0, "maximum": 512, "step": 8}),
    Setting("smfsr_color_fix", "adain", "SMFSR colour fix", "radio", {"choices": ["adain", "wavelet", "none"]}),
    Setting("smfsr_dtype", "auto", "SMFSR precision", "radio", {"choices": ["auto", "bf16", "fp16", "fp32"]}),
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
    return UpscaleOptions(scale=float(scale), seed=seed, steps=int(s["smfsr_steps"]), tile_size=int(s["smfsr_tile"]),
                          tile_overlap=int(s["smfsr_tile_overlap"]), color_fix=str(s["smfsr_color_fix"]))


def settings_key(settings: dict) -> tuple:
    """What our settings are now; a change invalidates A1111's Extras result cache."""
    return tuple(settings.get(k, DEFAULTS[k]) for k in DEFAULTS)
