"""Fixtures: tiny models built from config, real safetensors files written to tmp dirs. Shared
helpers are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from smfsr.checkpoint import save_bundle
from tests.helpers import photo_like, tiny_bundle

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_bundle(path, tiny_bundle())
    return path


@pytest.fixture
def sample_png(tmp_path) -> Path:
    path = tmp_path / "input.png"
    Image.fromarray(photo_like(24, 32)).save(path)
    return path
