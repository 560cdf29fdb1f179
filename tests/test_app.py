"""The gradio app: driven through gradio_client, and through a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import free_port, photo_like

gradio = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'smfsr[app]')")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_bundle_path):
    from smfsr.app import serve

    models = tmp_path_factory.mktemp("app-models")
    shutil.copy(tiny_bundle_path, models / "tiny.safetensors")
    port = free_port()
    demo = serve(None, str(models), "127.0.0.1", port, "cpu", "fp32", block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def reference(tiny_bundle_path: Path, path: Path, seed: int) -> np.ndarray:
    from smfsr.imageio import from_pil, open_image
    from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions

    up = SMFSRUpscaler.from_pretrained(tiny_bundle_path, device="cpu", dtype="fp32")
    options = UpscaleOptions(scale=4, seed=seed, steps=1, tile_size=64, color_fix="adain")
    return np.asarray(up.upscale_image(from_pil(open_image(path)), options))


def test_client_upload_run_download_matches_the_library(app, tiny_bundle_path, tmp_path):
    from gradio_client import Client, handle_file

    source = tmp_path / "in.png"
    Image.fromarray(photo_like(40, 56)).save(source)
    client = Client(app, verbose=False)
    slider, downloads, status = client.predict([handle_file(str(source))], "SMFSR x4 (tiny)", 4, 3, 1, 64, "adain",
                                               api_name="/upscale")
    assert "Upscaled 1 of 1" in status and "seed 3" in status
    result = np.asarray(Image.open(downloads[0]))
    assert result.shape == (160, 224, 3)
    assert np.array_equal(result, reference(tiny_bundle_path, source, 3))
    before, after = (Image.open(p) for p in slider)
    assert before.size == after.size == (224, 160)  # before/after at the same zoom


def test_bad_images_are_reported_on_the_page(app, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    client = Client(app, verbose=False)
    with pytest.raises(Exception, match="not an image file"):
        client.predict([handle_file(str(bad))], "SMFSR x4 (tiny)", 4, 0, 1, 64, "adain", api_name="/upscale")


def test_a_missing_model_is_named_as_missing(tmp_path):
    from smfsr.app import model_entries
    from smfsr.errors import SMFSRError

    with pytest.raises(SMFSRError, match="missing.safetensors: no such file or folder"):
        model_entries(str(tmp_path / "missing.safetensors"), None)
    (tmp_path / "notes.safetensors").write_text("not a model")
    with pytest.raises(SMFSRError, match="not an SMFSR bundle or official folder.*smfsr info"):
        model_entries(str(tmp_path / "notes.safetensors"), None)


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver")
@pytest.mark.slow
def test_in_a_real_browser(app, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    source = tmp_path / "browser.png"
    Image.fromarray(photo_like(48, 64, seed=4)).save(source)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(app)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#smfsr-input input[type=file]"))
        upload.send_keys(str(source))
        wait.until(lambda d: "browser" in d.find_element(By.ID, "smfsr-input").text)  # name and suffix render apart
        driver.find_element(By.ID, "smfsr-run").click()
        sizes = wait.until(lambda d: [
            (img.get_property("naturalWidth"), img.get_property("naturalHeight"))
            for img in d.find_elements(By.CSS_SELECTOR, "#smfsr-result img")
            if img.get_property("naturalWidth")] or None)
        assert (256, 192) in sizes  # 4 x 64 by 4 x 48
        wait.until(lambda d: "Upscaled 1 of 1" in d.find_element(By.ID, "smfsr-status").text)
        time.sleep(0.5)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "app.png"))
    finally:
        driver.quit()


def test_the_readmes_gradio_client_example_runs_as_written(app, tmp_path):
    """The README's example, with only the address, the photo and the model name changed to this app's."""
    import re

    readme = (REPO / "README.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "gradio_client" in block)
    Image.fromarray(photo_like(40, 56)).save(tmp_path / "photo.png")
    code = (example.replace("http://127.0.0.1:7860/", app).replace('"photo.png"', repr(str(tmp_path / "photo.png")))
            .replace("SMFSR x4 (smfsr-small-x4)", "SMFSR x4 (tiny)"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["status"].startswith("Upscaled 1 of 1")
    assert Image.open(scope["pngs"][0]).size == (224, 160)


def test_app_errors_are_one_line_without_temporary_paths(app, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 64)
    client = Client(app, verbose=False)
    with pytest.raises(Exception) as error:
        client.predict([handle_file(str(bad))], "SMFSR x4 (tiny)", 4, 0, 0, 0, "auto", api_name="/upscale")
    message = str(error.value)
    assert "broken.png" in message and "/tmp/" not in message and "Traceback" not in message
    with pytest.raises(Exception, match="the Latent tile slider 3 must be a multiple of the model's patch size"):
        client.predict([handle_file(str(bad))], "SMFSR x4 (tiny)", 4, 0, 0, 3, "auto", api_name="/upscale")


def test_the_sliders_follow_the_models_limits():
    from smfsr.app import slider_limits
    from smfsr.checkpoint.catalog import find_models
    from smfsr.checkpoint.default_model import REPO_MODELS

    shipped = {e.path.stem: e for e in find_models([REPO_MODELS])}
    steps, tile = slider_limits(shipped["smfsr-small-x4"])
    assert steps["maximum"] == 1 and "one step only" in steps["label"]  # a one-step model offers 0 or 1
    assert tile["step"] == 4 and tile["maximum"] % 4 == 0  # its patch size
