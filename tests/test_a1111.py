"""Integration with the real web UIs, as their users install them: AUTOMATIC1111 1.10.1 on its
launcher's torch 2.1.2 and pins (A1111_DIR/A1111_PYTHON) and Forge on its torch 2.3.1 and pins
(FORGE_DIR/FORGE_PYTHON), each started API-only on the CPU with this repository as its extension
(`eval "$(../shared/hosts/setup.sh a1111-stock forge)"`, then the pack's install.py with each
web UI's Python). A web UI that is absent skips its tests and says what is missing.
"""

from __future__ import annotations

import base64
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


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> tuple[Path, Path] | str:
    """(an SD1.5 checkpoint with random weights in its real shapes, an offline hub cache with CLIP's
    files), or why they cannot be made: the Hires. fix test generates with them."""
    from bench.sd15 import offline_clip, sd15_shapes, tokenizer_folder, write_sd15_checkpoint

    if missing("a1111"):
        return f"the SD1.5 checkpoint's shapes come from A1111's model code: {missing('a1111')}"
    tokenizers = tokenizer_folder(os.environ.get("COMFYUI_DIR"), os.environ.get("FORGE_DIR"))
    if tokenizers is None:
        return "CLIP's tokenizer files come from a host tree: set COMFYUI_DIR or FORGE_DIR"
    folder = tmp_path_factory.mktemp("sd15")
    shapes = sd15_shapes(os.environ["A1111_DIR"], os.environ["A1111_PYTHON"])
    return write_sd15_checkpoint(folder / "sd15.safetensors", shapes), offline_clip(folder / "hf", tokenizers)


@pytest.fixture(scope="module", params=sorted(WEBUIS))
def webui(request, tmp_path_factory, tiny_bundle_path, sd15):
    from bench.a1111_server import a1111

    name = request.param
    require_host(missing(name))
    dir_var, python_var, _ = WEBUIS[name]
    data = tmp_path_factory.mktemp(name)
    (data / "models" / "SMFSR").mkdir(parents=True)
    shutil.copy(tiny_bundle_path, data / "models" / "SMFSR" / "tiny.safetensors")
    env = {}
    if not isinstance(sd15, str):  # loaded on the first generation only (the web UIs load it lazily)
        (data / "models" / "Stable-diffusion").mkdir(parents=True)
        os.symlink(sd15[0], data / "models" / "Stable-diffusion" / sd15[0].name)
        env["HF_HOME"] = str(sd15[1])
    with a1111(data, os.environ[dir_var], os.environ[python_var], forge=name == "forge", env=env) as server:
        server.name, server.python, server.sd15 = name, os.environ[python_var], sd15
        # no cached results; every SMFSR setting at its default; no live previews (their model is a download)
        server.call("/sdapi/v1/options", {"upscaling_max_images_in_cache": 0, "live_previews_enable": False})
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


def test_hires_fix_with_smfsr_then_a_plain_generation(webui):
    """Hires. fix VAE-encodes right after the upscale, with the web UI's SD model: SMFSR as its
    upscaler must leave that model usable, for this generation and the next (a plain txt2img). A
    random-weight SD1.5 at 64x64, one step, x2 in the hires pass."""
    if isinstance(webui.sd15, str):
        pytest.skip(webui.sd15)
    payload = {"prompt": "a photo", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1,
               "cfg_scale": 1}
    hires = {**payload, "enable_hr": True, "hr_upscaler": "SMFSR x4 (smfsr-small-x4)", "hr_scale": 2,
             "hr_second_pass_steps": 1, "denoising_strength": 0.5,
             # Forge's API fails without it (processing.py: 'Use same choices' not in None)
             "hr_additional_modules": ["Use same choices"]}
    started = len(webui.log())
    for request, size in ((hires, (128, 128)), (payload, (64, 64))):
        reply = webui.call("/sdapi/v1/txt2img", request, timeout=900)
        assert len(reply["images"]) == 1
        assert Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).size == size
    log = webui.log()[started:]
    said = [line for line in log.splitlines() if "SMFSR:" in line
            and not line.startswith(("SMFSR: Forge's memory manager", "SMFSR: memory: "))]
    assert "Traceback" not in log and not said, log[-3000:]
