"""Install SMFSR's light dependencies into the running Python, only those that are missing.

Run by A1111/Forge at launch (extension root ``install.py``), or by hand: ``python install.py``
(``--check``: only say what is missing).
Nothing the host already has is changed: pip runs with every installed distribution pinned at its
current version (a constraints file), so it picks versions of the missing packages that fit the
host (e.g. an older diffusers that works with A1111's huggingface-hub) or fails without touching
anything. torch, torchvision and numpy are never installed. Idempotent.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HOST_OWNED = {"torch", "torchvision", "torchaudio", "numpy"}
# Incompatibilities pip cannot see because the package does not declare them: (host package,
# versions that trigger the rule, what we must add). diffusers >= 0.37 imports transformers
# classes from 4.48 on when its autoencoders load (A1111 1.10 pins transformers 4.30.2).
UNDECLARED = [("transformers", "<4.48", "diffusers<0.37")]


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


def installed_constraints() -> str:
    """name==version for every installed distribution: pip may add packages, never change these."""
    import importlib.metadata

    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and not dist.version.startswith("0.0.0"):
            pins[name.lower()] = f"{name}=={dist.version}"
    return "\n".join(sorted(pins.values())) + "\n"


def _below(version: str, bound: str) -> bool:
    """version < bound, comparing the leading numeric release parts (enough for UNDECLARED's "<X.Y")."""
    def release(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0])[:3])

    return release(version) < release(bound)


def undeclared_constraints() -> list[str]:
    """Extra constraints from UNDECLARED for the packages this Python has."""
    import importlib.metadata

    extra = []
    for package, versions, constraint in UNDECLARED:
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:  # pip's own version logic where it is importable; a bare Python may lack it
            from packaging.specifiers import SpecifierSet

            applies = installed in SpecifierSet(versions)
        except ImportError:
            if not versions.startswith("<") or versions.startswith("<="):
                raise SystemExit(f"install.py: cannot evaluate {versions!r} without the packaging module")
            applies = _below(installed, versions[1:])
        if applies:
            extra.append(constraint)
    return extra


def install(reqs: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="smfsr-constraints-", delete=False) as f:
        f.write(installed_constraints() + "".join(c + "\n" for c in undeclared_constraints()))
    try:
        try:
            import launch  # inside A1111/Forge: their pip wrapper honours --skip-install

            launch.run_pip(f'install -c "{f.name}" ' + " ".join(f'"{r}"' for r in reqs),
                           f"SMFSR requirements: {', '.join(reqs)}")
        except ImportError:
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-c", f.name, *reqs])
    finally:
        Path(f.name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """``--check``: say what would be installed and install nothing (exit 1 if something is missing)."""
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    todo = missing(requirements())
    if not todo:
        print("SMFSR: all requirements present")
    elif check:
        print(f"SMFSR: would install {', '.join(todo)}")
        raise SystemExit(1)
    else:
        install(todo)


if __name__ == "__main__":
    main()
