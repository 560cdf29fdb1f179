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
