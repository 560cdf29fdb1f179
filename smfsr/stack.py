"""Does SMFSR's software stack import here? One line saying why not, for a host's console.

A host (A1111, Forge, ComfyUI) owns torch; the pack's ``install.py`` adds what is missing with
versions that fit it. When that did not happen (the pack was copied in by hand, or the host was
upgraded later), importing the doors fails deep inside a dependency, and hosts show either nothing
(A1111 leaves the upscaler out) or a long traceback. This module imports nothing heavy at the top,
so a door can ask first and print the cause and the fix instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

MIN_TORCH = (2, 1)  # the oldest torch a host installs (A1111 1.10.1: 2.1.2)
INSTALL_PY = Path(__file__).resolve().parents[1] / "install.py"
# what the doors import, and the distribution each belongs to
NEEDED = (("safetensors.torch", "safetensors"), ("diffusers.models.modeling_utils", "diffusers"))


def release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string ("2.1.2+cu121" -> (2, 1, 2))."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def import_problem(fix: str | None = None) -> str | None:
    """None when the doors' dependencies import with this torch; else one line: cause and ``fix``
    (default: run the pack's install.py with this Python)."""
    fix = fix or f"run `{sys.executable} {INSTALL_PY}` (it installs versions that fit this torch), then restart"
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any failure is reported, with its type
        return f"torch does not import ({type(e).__name__}: {e})"
    if release(torch.__version__) < MIN_TORCH:
        return (f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, the oldest SMFSR "
                "runs on; update the host's torch")
    for module, dist in NEEDED:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == dist:
                return f"{dist} is not installed; {fix}"
            return f"{dist} {_version(dist)} needs {e.name}, which is not installed; {fix}"
        except Exception as e:  # noqa: BLE001 - a dependency that does not fit this torch fails in many ways
            return (f"{dist} {_version(dist)} does not import with torch {torch.__version__} "
                    f"({type(e).__name__}: {e}); {fix}")
    return None
