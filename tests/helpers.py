"""What several test files share: tiny models built from config, test images, host probes and the
in-process trainer. Fixtures live in conftest.py; this is a plain module, imported by name."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import torch

from smfsr.checkpoint import Bundle
from smfsr.checkpoint.random import random_bundle

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN_CONFIG = str(REPO / "smfsr_trainer" / "configs" / "tiny.yaml")


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised control layers also do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_bundle(seed: int = 0, preset: str = "tiny", **defaults) -> Bundle:
    settings = dict(upscale=4, steps=1, process_size=64, vae_scaling_factor=1.0, vae_shift_factor=0.0,
                    latent_tile=16, latent_overlap=4, color_fix="adain")
    settings.update(defaults)
    bundle = random_bundle(preset, "tiny", seed=seed, **settings)
    perturb(bundle.transformer, seed)
    perturb(bundle.vae, seed + 1, std=0.01)
    bundle.license, bundle.provenance = "test", "tests/helpers.py"
    return bundle


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, colourful test image with some texture (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    base = np.stack([np.sin(5 * xx + 1) * 0.4 + 0.5, np.cos(3 * yy + 4 * xx) * 0.4 + 0.5, 0.3 + 0.5 * xx * yy], -1)
    base += rng.normal(0, 0.03, base.shape)
    return (np.clip(base, 0, 1) * 255).astype(np.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cannot_import(python: str, modules: str) -> str | None:
    """Why ``python`` cannot import ``modules`` (comma-separated), or None if it can."""
    probe = subprocess.run([python, "-c", f"import {modules}"], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    last = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "unknown error"
    return f"{python} cannot import {modules} ({last})"


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; tests that run several trainings reset them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train(photos: Path, out: Path, *args: str) -> Path:
    """One in-process trainer run on the tiny config; returns what it exported."""
    from smfsr_trainer.train import main

    reset_accelerate()
    return main(["--config", TINY_TRAIN_CONFIG, "--train-dir", str(photos), "--output-dir", str(out), *args])


def stage_loss(config, nets, batch: dict, g: torch.Generator, model: torch.nn.Module | None = None):
    """The first trained network's loss on one batch, as the loop computes it (unprepared model)."""
    from smfsr_trainer.stages import get_stage

    stage = get_stage(config.stage)
    name = stage.trained(config, nets)[0][0]
    state = stage.batch(config, nets, batch, g, torch.device("cpu"))
    return stage.losses(config, nets, {name: model or nets.trained})[name](state)


def build_networks(config):
    from smfsr_trainer.stages import get_stage

    return get_stage(config.stage).build(config)


# ----------------------------------------------------------------------------------------------
# one pipeline, every door: the reference each door's test compares with (every setting at its
# default, only the seed set)

DOOR_SEED = 7
DOOR_INPUT = (40, 56)  # x4 = 160 x 224: a multiple of 8, so A1111 adds no resize of its own


def door_input(folder: Path) -> Path:
    from PIL import Image

    path = folder / "door-input.png"
    Image.fromarray(photo_like(*DOOR_INPUT, seed=5)).save(path)
    return path


def library_result(model: Path, image: Path, seed: int = DOOR_SEED, *, python: str | None = None) -> np.ndarray:
    """The Python door's result, (H, W, 3) float in [0, 1], every setting at its default but the seed.

    ``python``: compute it in that interpreter (a host's), so the comparison is with the same torch
    build; float results of different torch releases may differ in the last bit."""
    if python is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.npy"
            code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import numpy as np; from pathlib import Path; "
                    f"from tests.helpers import library_result; np.save({str(out)!r}, library_result("
                    f"Path({str(model)!r}), Path({str(image)!r}), {seed}))")
            run = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if run.returncode:
                raise RuntimeError(f"{python} could not run the library: {run.stderr[-2000:]}")
            return np.load(out)
    from smfsr.imageio import from_pil, open_image
    from smfsr.options import UpscaleOptions
    from smfsr.pipeline import SMFSRUpscaler

    up = SMFSRUpscaler.from_pretrained(model, device="cpu", dtype="fp32")
    rgb = from_pil(open_image(image)).rgb
    return up.upscale_tensor(rgb[None], UpscaleOptions(seed=seed))[0].permute(1, 2, 0).numpy()


def library_pixels(model: Path, image: Path, seed: int = DOOR_SEED, *, python: str | None = None) -> np.ndarray:
    """The Python door's result as smfsr writes it: 8-bit, rounded."""
    return (np.clip(library_result(model, image, seed, python=python), 0, 1) * 255).round().astype(np.uint8)


def truncation_mismatches(saved: np.ndarray, result: np.ndarray, margin: float = 1e-3) -> int:
    """Pixels where ComfyUI's SaveImage output (x 255, truncated) disagrees with the library's float
    result, not counting values within ``margin`` of a truncation boundary: there the last bit of
    a float (which the order of a parallel sum can change, measured 2e-6) decides the level."""
    scaled = np.clip(result * 255.0, 0, 255)
    settled = np.abs(scaled - np.round(scaled)) > margin
    return int(((saved != scaled.astype(np.uint8)) & settled).sum())
