"""The shipped default model (models/smfsr-small-x4.safetensors) on held-out photos.

``tests/data/heldout`` holds the 256 px centre crops of the seven photos the recipe holds out of
training (models/README.md lists their authors and licences), so these tests measure what the
model card's table measures, with the same code (``bench.eval_model``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.eval_model import held_out, score
from smfsr.cli import main
from smfsr.checkpoint.default_model import SHIPPED_MODEL
from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions, resize

HELD_OUT = Path(__file__).parent / "data" / "heldout"
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "sunset_lr.png"


@pytest.fixture(scope="module")
def upscaler() -> SMFSRUpscaler:
    assert SHIPPED_MODEL.is_file(), f"the default model {SHIPPED_MODEL} is missing"
    return SMFSRUpscaler.from_pretrained(None, device="cpu", dtype="fp32")


def test_default_model_on_held_out_photos_against_bicubic(upscaler):
    """Issue 8's targets, as the model card measures them: (a) on clean bicubic inputs PSNR >=
    bicubic + 0.5 dB (measured + 0.71), (b) on the Real-ESRGAN degradation sharper than bicubic,
    closer to the ground truth's sharpness, at bicubic's PSNR. Noise leaking through the one step,
    a misaligned resize or codec costs far more than the 0.2 dB of headroom, and an untrained
    LR-residual net is bicubic exactly."""
    hr, lr = held_out(HELD_OUT, 256, "bicubic")
    assert len(hr) == 7
    bicubic = score(resize(lr, *hr.shape[-2:]), hr)
    ours = score(upscaler(lr, UpscaleOptions(), seeds=list(range(len(lr)))), hr)
    assert ours.psnr >= bicubic.psnr + 0.5, (ours, bicubic)  # measured: 32.63 vs 31.92
    assert ours.ssim > bicubic.ssim, (ours, bicubic)  # 0.9216 vs 0.9146
    assert ours.sharpness_ratio >= bicubic.sharpness_ratio + 0.04, (ours, bicubic)  # 0.602 vs 0.523

    hr, lr = held_out(HELD_OUT, 256, "realesrgan")
    bicubic = score(resize(lr, *hr.shape[-2:]), hr)
    ours = score(upscaler(lr, UpscaleOptions(), seeds=list(range(len(lr)))), hr)
    assert abs(ours.sharpness_ratio - 1) < abs(bicubic.sharpness_ratio - 1) - 0.02, (ours, bicubic)  # 0.786 vs 0.731
    assert ours.psnr >= bicubic.psnr - 0.5, (ours, bicubic)  # 25.46 vs 25.47


def test_same_seed_same_image_other_seeds_same_content(upscaler):
    from kornia.metrics import psnr

    hr, lr = held_out(HELD_OUT, 256, "realesrgan")
    hr, lr = hr[:3], lr[:3]
    a, b = (upscaler(lr, UpscaleOptions(seed=0)) for _ in range(2))
    c = upscaler(lr, UpscaleOptions(seed=1))
    assert torch.equal(a, b)
    # The noise start reaches the output, but faintly: the L2-only refinement taught the network
    # to mostly ignore it (about 60 dB PSNR between seeds; the model card says why).
    assert (a - c).abs().max() > 1e-3
    assert psnr(a, c, 1.0).mean() > 35


def test_front_door_upscales_the_bundled_sample_with_the_default_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SMFSR_MODEL", raising=False)
    assert main(["upscale", str(SAMPLE), "-o", str(tmp_path)]) == 0
    result = tmp_path / "sunset_lr.png"
    assert str(result) in capsys.readouterr().err
    from PIL import Image

    with Image.open(SAMPLE) as lr, Image.open(result) as sr:
        assert sr.size == (lr.width * 4, lr.height * 4)
