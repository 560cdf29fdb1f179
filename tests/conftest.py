"""Shared fixtures: tiny models built from config, real safetensors files written to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from smfsr.checkpoint import Bundle, random_bundle, save_bundle

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
    bundle.license, bundle.provenance = "test", "tests/conftest.py"
    return bundle


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_bundle(path, tiny_bundle())
    return path


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, colourful test image with some texture (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    base = np.stack([np.sin(5 * xx + 1) * 0.4 + 0.5, np.cos(3 * yy + 4 * xx) * 0.4 + 0.5, 0.3 + 0.5 * xx * yy], -1)
    base += rng.normal(0, 0.03, base.shape)
    return (np.clip(base, 0, 1) * 255).astype(np.uint8)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cannot_import(python: str, modules: str) -> str | None:
    """Why ``python`` cannot import ``modules`` (comma-separated), or None if it can."""
    import subprocess

    probe = subprocess.run([python, "-c", f"import {modules}"], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    last = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "unknown error"
    return f"{python} cannot import {modules} ({last})"


@pytest.fixture
def sample_png(tmp_path) -> Path:
    path = tmp_path / "input.png"
    Image.fromarray(photo_like(24, 32)).save(path)
    return path


TINY_TRAIN_CONFIG = str(Path(__file__).resolve().parents[1] / "smfsr_trainer" / "configs" / "tiny.yaml")


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
