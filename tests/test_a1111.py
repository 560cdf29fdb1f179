"""Integration with the real web UIs, as their users install them: AUTOMATIC1111 1.10.1 on its
launcher's torch 2.1.2 and pins (A1111_DIR/A1111_PYTHON) and Forge on its torch 2.3.1 and pins
(FORGE_DIR/FORGE_PYTHON), each started API-only on the CPU with this repository as its extension
(`eval "$(../shared/hosts/setup.sh a1111-stock forge)"`, then the pack's install.py with each
web UI's Python). A web UI that is absent skips its tests and says what is missing.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cannot_import, door_input, photo_like, require_host

REPO = Path(__file__).resolve().parents[1]
WEBUIS = {"a1111": ("A1111_DIR", "A1111_PYTHON", "repositories/stable-diffusion-stability-ai"),
          "forge": ("FORGE_DIR", "FORGE_PYTHON", "backend/memory_management.py")}


def missing(webui: str) -> str | None:
    dir_var, python_var, marker = WEBUIS[webui]
    folder, python = os.environ.get(dir_var), os.environ.get(python_var)
    if not folder or not python:
        return (f"{dir_var}/{python_var} are not set (`eval \"$(../shared/hosts/setup.sh a1111-stock forge)\"` "
                f"builds the web UI; then run the pack's install.py with its Python)")
    if not (Path(folder) / "launch.py").exists() or not (Path(folder) / marker).exists():
        return f"{dir_var}={folder} is not a {webui} checkout with its repositories (no launch.py or {marker})"
    return cannot_import(python, "torch, gradio, fastapi, diffusers, safetensors", hint=f"run {python} install.py")


@pytest.fixture(scope="module", params=sorted(WEBUIS))
def webui(request, tmp_path_factory, tiny_bundle_path):
    from bench.a1111_server import a1111

    name = request.param
    require_host(missing(name))
    dir_var, python_var, _ = WEBUIS[name]
    data = tmp_path_factory.mktemp(name)
    (data / "models" / "SMFSR").mkdir(parents=True)
    shutil.copy(tiny_bundle_path, data / "models" / "SMFSR" / "tiny.safetensors")
    with a1111(data, os.environ[dir_var], os.environ[python_var], forge=name == "forge") as server:
        server.name, server.python = name, os.environ[python_var]
        # no cached results; every SMFSR setting at its default
        server.call("/sdapi/v1/options", {"upscaling_max_images_in_cache": 0})
        yield server


def cli_pixels(python: str, model: Path, image: Path, out: Path) -> np.ndarray:
    """`smfsr upscale IMAGE --model MODEL` with every other option at its default, run by the web UI's
    Python (the same torch build: float results of different torch releases may differ in the last bit)."""
    run = subprocess.run([python, "-c", "import sys; from smfsr.cli import main; sys.exit(main(sys.argv[1:]))",
                          "upscale", str(image), "-o", str(out), "--model", str(model), "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"))


def test_the_upscalers_and_settings_are_listed_in_api_only_mode(webui):
    from a1111_extension import logic
    from smfsr.checkpoint.default_model import SHIPPED_MODEL

    upscalers = {u["name"]: u for u in webui.call("/sdapi/v1/upscalers")}
    assert "SMFSR x4 (tiny)" in upscalers, (webui.name, sorted(upscalers), webui.log()[-3000:])
    assert upscalers["SMFSR x4 (tiny)"]["scale"] == 4
    assert upscalers["SMFSR x4 (tiny)"]["model_path"].endswith("tiny.safetensors")
    # the shipped default model is there without installing anything
    assert upscalers["SMFSR x4 (smfsr-small-x4)"]["model_path"].endswith(SHIPPED_MODEL.name)
    # --nowebui runs no on_ui_settings callback: the settings are registered when the script loads
    options = webui.call("/sdapi/v1/options")
    assert {k: options.get(k) for k in logic.DEFAULTS} == logic.DEFAULTS, webui.name


@pytest.mark.parametrize("name", ["tiny", "smfsr-small-x4"])
def test_extras_at_default_settings_gives_the_clis_pixels(webui, tiny_bundle_path, tmp_path, name):
    """Every SMFSR setting at its default (the seed too): Extras returns exactly what `smfsr upscale`
    writes with its defaults. (A failing upscaler still answers HTTP 200 with a Lanczos resize:
    only the pixels prove it ran.)"""
    from smfsr.checkpoint.default_model import SHIPPED_MODEL

    source = door_input(tmp_path)
    got = np.asarray(Image.open(io.BytesIO(webui.extras(source, f"SMFSR x4 ({name})", 4))).convert("RGB"))
    want = cli_pixels(webui.python, tiny_bundle_path if name == "tiny" else SHIPPED_MODEL, source, tmp_path / "cli.png")
    assert got.shape == want.shape == (160, 224, 3)
    assert np.array_equal(got, want), (webui.name, np.abs(got.astype(int) - want).max(), webui.log()[-3000:])
    lanczos = np.asarray(Image.open(source).resize((224, 160), Image.Resampling.LANCZOS)).astype(int)
    assert (np.abs(got.astype(int) - lanczos) > 1).mean() > 0.05  # not the fallback


def test_an_interrupted_upscale_returns_and_the_next_one_runs(webui, tmp_path):
    """Interrupt pressed midway (small latent tiles: many progress ticks): the request comes back at
    once, and the web UI upscales again afterwards."""
    source = tmp_path / "large.png"
    Image.fromarray(photo_like(192, 256, seed=3)).save(source)
    webui.call("/sdapi/v1/options", {"smfsr_tile": 8})
    try:
        reply, started = {}, time.perf_counter()

        def upscale():
            try:
                reply["image"] = webui.extras(source, "SMFSR x4 (smfsr-small-x4)", 4)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                reply["error"] = e
            reply["seconds"] = time.perf_counter() - started

        thread = threading.Thread(target=upscale)
        thread.start()
        deadline = time.time() + 120
        while True:  # the job has begun (its step count reset) and run two tiles
            state = webui.call("/sdapi/v1/progress?skip_current_image=true")["state"]
            if state.get("job") and state.get("sampling_step", 0) >= 2:
                break
            assert thread.is_alive() and time.time() < deadline, ("the upscale ended before it was interrupted", reply)
            time.sleep(0.05)
        interrupted_at = time.perf_counter() - started
        webui.call("/sdapi/v1/interrupt", {})
        thread.join(timeout=60)
        assert not thread.is_alive() and "error" not in reply, reply
        # back within seconds of the interrupt, long before the run of many small tiles would end
        assert reply["seconds"] - interrupted_at < 10, reply["seconds"]
        assert Image.open(io.BytesIO(reply["image"])).size == (1024, 768)
    finally:
        webui.call("/sdapi/v1/options", {"smfsr_tile": 0})
    small = door_input(tmp_path)
    again = np.asarray(Image.open(io.BytesIO(webui.extras(small, "SMFSR x4 (tiny)", 4))).convert("RGB"))
    lanczos = np.asarray(Image.open(small).resize((224, 160), Image.Resampling.LANCZOS)).astype(int)
    assert (np.abs(again.astype(int) - lanczos) > 1).mean() > 0.05  # it ran, not the fallback


def test_forge_makes_room_through_its_memory_manager(webui, tmp_path):
    if webui.name != "forge":
        pytest.skip("Forge's memory manager: A1111 has none (its SD model moves only under --lowvram)")
    webui.extras(door_input(tmp_path), "SMFSR x4 (tiny)", 4)
    assert "SMFSR: Forge's memory manager unloaded its models" in webui.log()
