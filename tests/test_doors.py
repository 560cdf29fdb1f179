"""One pipeline, every door: the same input, model and seed, every other setting at its default,
give bit-identical pixels through Python, the CLI and the app (here), and through ComfyUI's two
workflows and A1111's Extras tab (tests/test_comfyui.py and tests/test_a1111.py, with real hosts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import DOOR_SEED, REPO, door_input, free_port, library_pixels


def test_the_cli_writes_the_library_pixels(tmp_path, tiny_bundle_path):
    source, out = door_input(tmp_path), tmp_path / "cli.png"
    import torch

    # the same thread count as this process: a parallel sum's order (and its last bit) depends on it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run([sys.executable, "-m", "smfsr.cli", "upscale", str(source), "-o", str(out), "--model",
                          str(tiny_bundle_path), "--seed", str(DOOR_SEED), "-q"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(Image.open(out)), library_pixels(tiny_bundle_path, source))


def test_the_app_gives_the_library_pixels(tmp_path, tiny_bundle_path):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'smfsr[app]')")
    from gradio_client import Client, handle_file

    from smfsr.app import serve

    shutil.copy(tiny_bundle_path, tmp_path / "tiny.safetensors")
    port = free_port()
    demo = serve(None, str(tmp_path), "127.0.0.1", port, "cpu", "fp32", block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        source = door_input(tmp_path)
        # every widget at its default (scale = the model's factor, 0 = the model's, auto), the seed set
        _, downloads, _ = client.predict([handle_file(str(source))], "SMFSR x4 (tiny)", 4, DOOR_SEED, 0, 0, "auto",
                                         api_name="/upscale")
    finally:
        demo.close()
    assert np.array_equal(np.asarray(Image.open(downloads[0])), library_pixels(tiny_bundle_path, source))


def test_the_stages_called_one_by_one_are_the_whole_upscale(tiny_bundle_path, tmp_path):
    """What the modular ComfyUI chain does, through the public stages: encode, sample, decode, finish."""
    import torch

    from smfsr.options import UpscaleOptions
    from smfsr.pipeline import LRLatent, SMFSRUpscaler, decode_latent, finish

    up = SMFSRUpscaler.from_pretrained(tiny_bundle_path, device="cpu", dtype="fp32")
    x = torch.from_numpy(np.asarray(Image.open(door_input(tmp_path)))).permute(2, 0, 1).float()[None] / 255
    options = UpscaleOptions(seed=DOOR_SEED)
    settings = up.settings(options)
    lr = up.encode(x, options)
    latent = up.sample(LRLatent(lr.mean.cpu(), lr.logvar.cpu()), options)  # as a LATENT dict carries it
    image = decode_latent(up.codec.vae, latent, settings.vae_tiling)
    out = finish(image, x, settings.scale, settings.color_fix)
    assert torch.equal(out, up.upscale_tensor(x, options))
    assert lr.control.shape[-2:] == (160, 224) and out.shape[-2:] == (160, 224)
