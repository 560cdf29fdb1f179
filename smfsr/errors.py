"""User-facing errors: each message says what is wrong and what to do. Doors print them without a
traceback; anything else is a bug and keeps its traceback.

A message about one of the options a door offers names it as ``${key}`` (keys of ``CLI_NAMES``);
each door says it in its own terms with :func:`door_message` (a flag on the command line, a widget
in ComfyUI, a setting in A1111). ``str(error)`` uses the command line's names."""

from __future__ import annotations

import re

CLI_NAMES = {
    "model": "--model", "steps": "--steps", "scale": "--scale", "seed": "--seed", "color_fix": "--color-fix",
    "latent_tile": "--tile-size", "latent_tile_overlap": "--tile-overlap", "vae_tile": "--vae-tile",
    "device": "--device", "dtype": "--dtype", "weights": "--weights", "block_swap": "--block-swap",
    "vae_input": "--vae", "encoders_input": "--sd35 (or --clip-l, --clip-g, --t5)",
}
_OPTION = re.compile(r"\$\{(\w+)\}")


def phrase(template: str, names: dict[str, str]) -> str:
    """``template`` with each ``${key}`` replaced by ``names[key]`` (else the command line's name)."""
    return _OPTION.sub(lambda m: names.get(m.group(1), CLI_NAMES.get(m.group(1), m.group(1))), template)


class SMFSRError(Exception):
    """An error caused by input the user gave (a file, an image, an option)."""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.template = message

    def __str__(self) -> str:
        return phrase(self.template, CLI_NAMES)


class CheckpointError(SMFSRError):
    """A model file that cannot be used: unreadable, foreign, pickled, or not matching its config."""


class ImageError(SMFSRError):
    """An image that cannot be upscaled: empty, unreadable, too small or too large."""


def door_message(error: Exception, names: dict[str, str]) -> str:
    """The error's message with the options named as a door names them."""
    return phrase(error.template, names) if isinstance(error, SMFSRError) else str(error)
