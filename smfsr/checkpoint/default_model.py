"""Where the default model lives: the small bundle that ships in the repository's ``models/``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SMFSRError

DEFAULT_MODEL_NAME = "smfsr-small-x4.safetensors"
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED_MODEL = REPO_MODELS / DEFAULT_MODEL_NAME  # the file itself, whatever $SMFSR_MODEL says


def default_model_path() -> Path:
    """$SMFSR_MODEL if set, else ``models/smfsr-small-x4.safetensors`` beside the package."""
    env = os.environ.get("SMFSR_MODEL")
    path = Path(env) if env else SHIPPED_MODEL
    if not path.exists():
        raise SMFSRError(
            f"no model given and the default model {path} is not there. Pass --model with an SMFSR bundle "
            "(.safetensors) or an official SMFSR folder, or set SMFSR_MODEL."
        )
    return path
