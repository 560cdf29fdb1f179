"""Install SMFSR's light dependencies into the running Python, only those that are missing.

Run by A1111/Forge at launch (extension root ``install.py``), or by hand: ``python install.py``
(``--check``: only say what is missing).
Nothing else the host has is changed: pip runs with every installed distribution pinned at its
current version (a constraints file), so it picks versions of the missing packages that fit the
host (e.g. an older diffusers that works with A1111's huggingface-hub) or fails without touching
anything. The one exception is a requirement already installed in a version that cannot import
beside the host's packages (UNDECLARED): that one is replaced by a version that can. torch,
torchvision and numpy are never installed. Afterwards the doors' imports are tried, and a problem
is said in one line (cause and fix). Idempotent.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HOST_OWNED = {"torch", "torchvision", "torchaudio", "numpy"}
HERE = Path(__file__).resolve().parent
# Incompatibilities pip cannot see because the package does not declare them: (host package,
# versions that trigger the rule, what we must add), each measured in the hosts' own venvs.
UNDECLARED = [
    # diffusers >= 0.37 imports transformers classes from 4.48 on when its autoencoders load
    # (A1111 1.10 pins transformers 4.30.2)
    ("transformers", "<4.48", "diffusers<0.37"),
    # diffusers 0.36 calls torch.xpu at import: A1111 1.10's torch 2.1.2 has none (0.31 to 0.35
    # run there; torch 2.3.1 has it)
    ("torch", "<2.3", "diffusers<0.36"),
    # diffusers 0.36 refuses, at import, a peft older than 0.17 (Forge installs peft 0.13.2)
    ("peft", "<0.17", "diffusers<0.36"),
]


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


def unfit(reqs: list[str], constraints: list[str]) -> list[str]:
    """Requirements installed in a version that an undeclared constraint rules out (e.g. a diffusers
    0.36 beside torch 2.1.2, put there by another extension or by hand): to be replaced."""
    import importlib.metadata

    out = []
    for req in reqs:
        bounds = [c.split("<", 1)[1] for c in constraints if _name(c) == _name(req) and "<" in c]
        try:
            installed = importlib.metadata.version(_name(req))
        except importlib.metadata.PackageNotFoundError:
            continue
        if any(not _below(installed, bound) for bound in bounds):
            out.append(req)
    return out


def install(reqs: list[str], replace: list[str] = ()) -> None:
    """pip install ``reqs`` with every installed distribution pinned, except those in ``replace``."""
    replaced = {_name(r) for r in replace}
    pins = [line for line in installed_constraints().splitlines() if _name(line) not in replaced]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="smfsr-constraints-", delete=False) as f:
        f.write("".join(line + "\n" for line in pins + undeclared_constraints()))
    try:
        try:
            import launch  # inside A1111/Forge: their pip wrapper honours --skip-install

            launch.run_pip(f'install -c "{f.name}" ' + " ".join(f'"{r}"' for r in reqs),
                           f"SMFSR requirements: {', '.join(reqs)}")
        except ImportError:
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-c", f.name, *reqs])
    except (subprocess.CalledProcessError, RuntimeError):
        raise SystemExit(f"SMFSR: pip found no versions of {', '.join(reqs)} that fit this Python's installed "
                         f"packages ({', '.join(undeclared_constraints()) or 'as installed'}); pip's output above "
                         "names the conflict: update the package it names, or install SMFSR in a fresh environment")
    finally:
        Path(f.name).unlink(missing_ok=True)


def import_problem() -> str | None:
    """The doors' imports tried in a fresh interpreter (this one may hold the old versions)."""
    fix = "this Python's packages leave no version that fits; update the package named, or use a fresh environment"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from smfsr.stack import import_problem as p; "
            f"print(p({fix!r}) or '')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode:
        return f"the import check failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}"
    return run.stdout.strip() or None


def main(argv: list[str] | None = None) -> None:
    """``--check``: say what would be installed and install nothing (exit 1 if something is missing)."""
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    reqs = requirements()
    todo, replace = missing(reqs), unfit(reqs, undeclared_constraints())
    if not todo and not replace:
        print("SMFSR: all requirements present")
    elif check:
        print(f"SMFSR: would install {', '.join(todo + replace)}")
        raise SystemExit(1)
    else:
        install(todo + replace, replace)
    if not check:
        problem = import_problem()
        if problem:
            raise SystemExit(f"SMFSR: {problem}")


if __name__ == "__main__":
    main()
