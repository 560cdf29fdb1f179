"""The official weights' paths (an official folder, a bundle whose position table is rebuilt, an
ldm-named VAE, one upscale) in each web UI's own Python: A1111 1.10.1's torch 2.1.2 with the
diffusers install.py picks there, and Forge's torch 2.3.1 with diffusers 0.31.0, the floor
requirements.txt declares. Code that leans on a newer torch or diffusers fails here first."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO, require_host
from tests.test_a1111 import WEBUIS, missing


@pytest.mark.parametrize("webui", sorted(WEBUIS))
def test_the_official_paths_run_on_the_web_uis_torch_and_diffusers(webui):
    require_host(missing(webui))
    python = os.environ[WEBUIS[webui][1]]
    run = subprocess.run([python, str(REPO / "tests" / "floor_smoke.py")], capture_output=True, text=True, cwd=REPO,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    print(f"\n[{webui}] torch, diffusers: {lines.get('versions')}")
    if webui == "forge":
        assert lines["versions"].split()[1] == "0.31.0", lines  # the declared floor
    assert lines["official"] == "folder True" and lines["bundle"] == "True True", run.stdout
    assert lines["ldm"] == "vae True" and lines["upscale"] == "(1, 3, 96, 128) True", run.stdout
    megabytes, meta = lines["meta"].split()[-2:]  # "build MiB N True"
    assert int(megabytes) < 100 and meta == "True", run.stdout  # was 3.4 GB on diffusers 0.31
