"""install.py: installs only what is missing and never the host's torch/numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import install

REPO = Path(__file__).resolve().parents[1]


def test_requirements_leave_host_packages_alone():
    names = {install._name(r) for r in install.requirements()}
    assert names and not names & install.HOST_OWNED
    pyproject = (REPO / "pyproject.toml").read_text()
    for req in install.requirements():
        assert install._name(req) in pyproject  # the two lists agree


def test_only_missing_requirements_are_installed(tmp_path):
    reqs = ["safetensors>=0.4", "surely-not-a-real-package-smfsr>=1"]
    assert install.missing(reqs) == ["surely-not-a-real-package-smfsr>=1"]
    bad = tmp_path / "requirements.txt"
    bad.write_text("torch>=2\n")
    try:
        install.requirements(bad)
    except SystemExit as e:
        assert "host-owned" in str(e)
    else:
        raise AssertionError("a requirements file listing torch must be refused")


def test_check_mode_reports_without_installing(tmp_path, monkeypatch, capsys):
    """Never installs into the test environment: --check only reports."""
    result = subprocess.run([sys.executable, str(REPO / "install.py"), "--check"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "all requirements present" in result.stdout  # this environment has them
    wanted = tmp_path / "requirements.txt"
    wanted.write_text("safetensors>=0.4\nsurely-not-a-real-package-smfsr>=1\n")
    read = install.requirements
    monkeypatch.setattr(install, "requirements", lambda: read(wanted))
    monkeypatch.setattr(install, "install", lambda reqs: pytest.fail(f"--check installed {reqs}"))
    with pytest.raises(SystemExit) as stop:
        install.main(["--check"])
    assert stop.value.code == 1 and "would install surely-not-a-real-package-smfsr>=1" in capsys.readouterr().out


def test_version_bounds_are_read_without_the_packaging_module():
    assert install._below("4.30.2", "4.48") and not install._below("4.48.0", "4.48") and install._below("0.9", "0.10")


def test_undeclared_incompatibilities_become_constraints(monkeypatch):
    import importlib.metadata

    version = importlib.metadata.version("safetensors")
    monkeypatch.setattr(install, "UNDECLARED", [("safetensors", f"=={version}", "diffusers<0.37"),
                                                ("safetensors", "<0.0.1", "never-added"),
                                                ("surely-not-installed-smfsr", ">=0", "never-added")])
    assert install.undeclared_constraints() == ["diffusers<0.37"]
    pins = install.installed_constraints()
    assert f"safetensors=={version}" in pins.lower() and "torch==" in pins.lower()


def test_an_installed_version_a_rule_rules_out_is_replaced():
    import importlib.metadata

    version = importlib.metadata.version("safetensors")
    assert install.unfit(["safetensors>=0.4", "tqdm"], ["safetensors<0.0.1"]) == ["safetensors>=0.4"]
    assert install.unfit(["safetensors>=0.4"], [f"safetensors<{int(version.split('.')[0]) + 1}"]) == []
    assert install.unfit(["surely-not-installed-smfsr"], ["surely-not-installed-smfsr<1"]) == []
    # the rules measured in the hosts' venvs: stock A1111 (torch 2.1.2, transformers 4.30.2) and Forge (peft 0.13.2)
    rules = {(package, versions): constraint for package, versions, constraint in install.UNDECLARED}
    assert rules[("torch", "<2.3")] == rules[("peft", "<0.17")] == "diffusers<0.36"
    assert rules[("transformers", "<4.48")] == "diffusers<0.37"


def broken_diffusers(folder: Path) -> dict:
    """An environment whose diffusers fails at import as 0.36 does on torch 2.1.2."""
    package = folder / "diffusers"
    package.mkdir()
    (package / "__init__.py").write_text("import torch\nraise AttributeError(\"module 'torch' has no attribute 'xpu'\")\n")
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def test_a_dependency_that_does_not_import_is_one_line_with_the_fix(tmp_path):
    env = broken_diffusers(tmp_path)
    run = subprocess.run([sys.executable, "-c", "from smfsr.stack import import_problem; print(import_problem())"],
                         capture_output=True, text=True, env=env, timeout=120)
    line = run.stdout.strip()
    assert run.returncode == 0 and len(line.splitlines()) == 1, run.stderr
    assert "diffusers" in line and "does not import with torch" in line and "no attribute 'xpu'" in line
    assert f"{sys.executable} {REPO / 'install.py'}" in line
    # the A1111/Forge script, loaded as the web UIs load scripts (modules/script_loading.py): that
    # line on the console, and no upscaler (nothing of A1111 imported)
    load = ("import importlib.util as u, sys; s = u.spec_from_file_location('smfsr.py', sys.argv[1]); "
            "s.loader.exec_module(u.module_from_spec(s))")
    run = subprocess.run([sys.executable, "-c", load, str(REPO / "scripts" / "smfsr.py")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f"SMFSR: the upscaler is not loaded: {line}", run.stderr
    assert run.stderr == ""
    # where it imports, nothing is said
    from smfsr.stack import import_problem

    assert import_problem() is None


def test_the_lazy_exports_keep_the_real_cause(tmp_path):
    """`from smfsr.checkpoint import Bundle` with a diffusers that fails inside its import: the
    error names that failure, not "cannot import name 'Bundle'"."""
    run = subprocess.run([sys.executable, "-c", "from smfsr.checkpoint import load_model"], capture_output=True,
                         text=True, env=broken_diffusers(tmp_path), timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "no attribute 'xpu'" in last and "cannot import name" not in last, run.stderr[-2000:]
