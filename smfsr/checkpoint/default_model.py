"""The models that ship in the repository's ``models/``, and which one runs when none is named.

Every door accepts a shipped model by name (``--model smfsr-small-x4-q``) as well as by path.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SMFSRError

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
FIDELITY, QUALITY = "smfsr-small-x4", "smfsr-small-x4-q"
SHIPPED = {FIDELITY: "fidelity: closest to the ground truth (PSNR)",
           QUALITY: "quality: GAN + perceptual refinement (sharper, more natural detail)"}
DEFAULT = FIDELITY  # the model card says why this one (models/README.md)
SHIPPED_MODEL = REPO_MODELS / f"{DEFAULT}.safetensors"  # the default model's file, whatever $SMFSR_MODEL says


def shipped(name: str) -> Path:
    return REPO_MODELS / f"{name}.safetensors"


OFFICIAL = ("smfsr_q", "smfsr_f")  # the official weights' names, which `smfsr download` brings


def downloaded(name: str) -> Path | None:
    """An official model `smfsr download` put in the cache: its bundle, else its folder."""
    from ..download import cache_dir

    for path in (cache_dir() / f"{name}.safetensors", cache_dir() / name):
        if path.exists():
            return path
    return None


def resolve_model(model: str | os.PathLike) -> Path:
    """A path as given, a shipped model's name (with or without .safetensors), or an official
    model's name once `smfsr download` has brought it."""
    path = Path(model)
    if path.exists():
        return path
    name = path.name.removesuffix(".safetensors")
    by_name = str(model) == path.name
    if by_name and name in SHIPPED and shipped(name).exists():
        return shipped(name)
    if by_name and name in OFFICIAL:
        found = downloaded(name)
        if found is not None:
            return found
        raise SMFSRError(f"{model}: the official weights are not downloaded yet; `smfsr download {name} --bundle` "
                         "brings them (about 16 GB, SD3.5's parts are gated: the command says how to log in), or "
                         "pass the path of a file you have")
    known = ", ".join(SHIPPED)
    raise SMFSRError(f"{model}: no such file or folder (shipped models, usable by name: {known}; the official "
                     f"ones after `smfsr download`: {', '.join(OFFICIAL)})")


def default_model_path() -> Path:
    """$SMFSR_MODEL if set (a path or a shipped name), else the default shipped model."""
    env = os.environ.get("SMFSR_MODEL")
    if env:
        try:
            return resolve_model(env)
        except SMFSRError:
            raise SMFSRError(f"SMFSR_MODEL={env}: no such model. Pass --model with an SMFSR bundle (.safetensors), "
                             f"an official SMFSR folder or a shipped model's name ({', '.join(SHIPPED)}), or unset "
                             "SMFSR_MODEL.") from None
    if not SHIPPED_MODEL.exists():
        raise SMFSRError(
            f"no model given and the default model {SHIPPED_MODEL} is not there. Pass --model with an SMFSR bundle "
            "(.safetensors) or an official SMFSR folder, or set SMFSR_MODEL."
        )
    return SHIPPED_MODEL
