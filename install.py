"""Install SMFSR's light dependencies into the running Python, only those that are missing.

Run by A1111/Forge at launch (extension root ``install.py``), or by hand: ``python install.py``.
It never installs or upgrades torch, torchvision or numpy: the host owns them. Idempotent: when
everything is present it does nothing.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

HOST_OWNED = {"torch", "torchvision", "torchaudio", "numpy"}


def requirements(path: Path = Path(__file__).with_name("requirements.txt")) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    reqs = [line for line in lines if line]
    owned = [r for r in reqs if _name(r) in HOST_OWNED]
    if owned:
        raise SystemExit(f"requirements.txt must not list host-owned packages: {owned}")
    return reqs


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def missing(reqs: list[str]) -> list[str]:
    """Requirements whose module cannot be imported (import name = package name, dashes as underscores)."""
    return [r for r in reqs if importlib.util.find_spec(_name(r).replace("-", "_")) is None]


def install(reqs: list[str]) -> None:
    try:
        import launch  # inside A1111/Forge: their pip wrapper honours --skip-install

        launch.run_pip("install " + " ".join(f'"{r}"' for r in reqs), f"SMFSR requirements: {', '.join(reqs)}")
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *reqs])


def main() -> None:
    todo = missing(requirements())
    if todo:
        install(todo)
    else:
        print("SMFSR: all requirements present")


if __name__ == "__main__":
    main()
