"""Integration with a real AUTOMATIC1111 web UI (1.10.x): runs only where one can be launched.

Set A1111_DIR to a checkout (with its repositories/ filled) and, if its Python is not this one,
A1111_PYTHON to an interpreter with its requirements and this package's (`python install.py`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import DOOR_SEED, cannot_import, door_input, free_port, host_marker, library_pixels

REPO = Path(__file__).resolve().parents[1]
A1111_DIR = os.environ.get("A1111_DIR")
A1111_PYTHON = os.environ.get("A1111_PYTHON", sys.executable)


def _missing() -> str | None:
    if not A1111_DIR:
        return "A1111_DIR is not set (point it at an AUTOMATIC1111 checkout to run the A1111 integration tests)"
    if not (Path(A1111_DIR) / "launch.py").exists():
        return f"A1111_DIR={A1111_DIR} has no launch.py"
    if not (Path(A1111_DIR) / "repositories" / "stable-diffusion-stability-ai").is_dir():
        return f"A1111_DIR={A1111_DIR} lacks repositories/ (stable-diffusion-stability-ai, k-diffusion, ...)"
    return cannot_import(A1111_PYTHON, "torch, gradio, fastapi, diffusers, safetensors",
                         hint=f"run {A1111_PYTHON} install.py")


pytestmark = host_marker(_missing())


def _call(url: str, payload: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if payload is not None else "GET")
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def webui(tmp_path_factory, tiny_bundle_path):
    data = tmp_path_factory.mktemp("a1111")
    (data / "extensions").mkdir()
    os.symlink(REPO, data / "extensions" / "smfsr")
    (data / "models" / "SMFSR").mkdir(parents=True)
    shutil.copy(tiny_bundle_path, data / "models" / "SMFSR" / "tiny.safetensors")
    port = free_port()
    log = open(data / "webui.log", "w")
    proc = subprocess.Popen(
        [A1111_PYTHON, "launch.py", "--skip-prepare-environment", "--skip-install", "--no-download-sd-model",
         "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--api", "--nowebui", "--port", str(port),
         "--data-dir", str(data), "--skip-version-check", "--server-name", "127.0.0.1"],
        cwd=A1111_DIR, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            _call(url + "/sdapi/v1/upscalers")
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("A1111 did not start:\n" + (data / "webui.log").read_text()[-4000:])
            time.sleep(1)
    # no cached results, fixed seed: the upscale must really run and be reproducible
    # no cached results; every SMFSR setting at its default but the seed (fixed, so results are reproducible)
    _call(url + "/sdapi/v1/options", {"upscaling_max_images_in_cache": 0, "smfsr_seed": DOOR_SEED})
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_upscaler_is_listed(webui):
    from smfsr.checkpoint.default_model import SHIPPED_MODEL

    upscalers = {u["name"]: u for u in _call(webui + "/sdapi/v1/upscalers")}
    assert "SMFSR x4 (tiny)" in upscalers
    assert upscalers["SMFSR x4 (tiny)"]["scale"] == 4
    assert upscalers["SMFSR x4 (tiny)"]["model_path"].endswith("tiny.safetensors")
    # the shipped default model is there without installing anything
    assert upscalers["SMFSR x4 (smfsr-small-x4)"]["model_path"].endswith(SHIPPED_MODEL.name)


@pytest.mark.parametrize("name", ["tiny", "smfsr-small-x4"])
def test_extras_gives_the_library_pixels(webui, tiny_bundle_path, tmp_path, name):
    """Every SMFSR setting at its default but the seed: Extras returns the library's pixels, to the bit.
    (A failing upscaler still returns HTTP 200 with a Lanczos resize: only the pixels prove it ran.)"""
    from smfsr.checkpoint.default_model import SHIPPED_MODEL

    source = door_input(tmp_path)
    reply = _call(webui + "/sdapi/v1/extra-single-image", {
        "resize_mode": 0, "upscaling_resize": 4, "upscaler_1": f"SMFSR x4 ({name})", "upscaler_2": "None",
        "extras_upscaler_2_visibility": 0, "image": "data:image/png;base64," + base64.b64encode(source.read_bytes()).decode(),
    })
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["image"]))).convert("RGB"))
    want = library_pixels(tiny_bundle_path if name == "tiny" else SHIPPED_MODEL, source, python=A1111_PYTHON)
    assert got.shape == want.shape == (160, 224, 3)
    assert np.array_equal(got, want)
    lanczos = np.asarray(Image.open(source).resize((224, 160), Image.Resampling.LANCZOS)).astype(int)
    assert (np.abs(got.astype(int) - lanczos) > 1).mean() > 0.05  # not the fallback
