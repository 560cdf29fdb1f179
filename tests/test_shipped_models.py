"""The two shipped models (models/smfsr-small-x4.safetensors, fidelity; models/smfsr-small-x4-q.safetensors,
quality) on held-out photos, and the doors that offer them by name.

``tests/data/heldout`` holds the 256 px centre crops of the seven photos the recipes hold out of
training (models/README.md lists their authors and licences), so these tests measure what the
model card's table measures, with the same code (``bench.eval_model``). The perceptual distance
of the card needs the ST-LPIPS weights, which are not in the repository: bench.eval_model measures it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.eval_model import held_out, score
from smfsr.cli import main
from smfsr.checkpoint.default_model import FIDELITY, QUALITY, SHIPPED_MODEL, shipped
from smfsr.errors import SMFSRError
from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions, resize

HELD_OUT = Path(__file__).parent / "data" / "heldout"
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "sunset_lr.png"


@pytest.fixture(scope="module")
def upscaler() -> SMFSRUpscaler:
    """The fidelity model, by name, as a user would ask for it."""
    assert shipped(FIDELITY).is_file(), f"the fidelity model {shipped(FIDELITY)} is missing"
    return SMFSRUpscaler.from_pretrained(FIDELITY, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def quality() -> SMFSRUpscaler:
    assert shipped(QUALITY).is_file(), f"the quality model {shipped(QUALITY)} is missing"
    return SMFSRUpscaler.from_pretrained(QUALITY, device="cpu", dtype="fp32")


@pytest.mark.slow
def test_fidelity_model_on_held_out_photos_against_bicubic(upscaler):
    """Issue 8's targets, as the model card measures them: (a) on clean bicubic inputs PSNR >=
    bicubic + 0.5 dB (measured + 0.71), (b) on the Real-ESRGAN degradation sharper than bicubic,
    closer to the ground truth's sharpness, at bicubic's PSNR. Noise leaking through the one step,
    a misaligned resize or codec costs far more than the 0.2 dB of headroom, and an untrained
    LR-residual net is bicubic exactly."""
    hr, lr = held_out(HELD_OUT, 256, "bicubic")
    assert len(hr) == 7 and SHIPPED_MODEL.is_file()
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


@pytest.mark.slow
def test_quality_model_on_held_out_photos_against_bicubic_and_the_fidelity_model(upscaler, quality):
    """Issue 16's targets that need no perceptual network: PSNR no more than 1 dB below bicubic on
    clean inputs, and a sharpness closer to the ground truth's than the fidelity model's, under
    both degradations; and issue 44's: no 4-px grid (at most 0.002, a photo's is 0.0002)."""
    for degradation in ("bicubic", "realesrgan"):
        hr, lr = held_out(HELD_OUT, 256, degradation)
        seeds = list(range(len(lr)))
        bicubic = score(resize(lr, *hr.shape[-2:]), hr)
        fidelity = score(upscaler(lr, UpscaleOptions(), seeds=seeds), hr)
        ours = score(quality(lr, UpscaleOptions(), seeds=seeds), hr)
        assert abs(ours.sharpness_ratio - 1) < abs(fidelity.sharpness_ratio - 1), (degradation, ours, fidelity)
        # issue 44: no 4-px grid (measured 0.0018 clean, 0.0010 degraded; the previous model's 0.078 / 0.124)
        assert ours.grid <= 0.002, (degradation, ours)
        if degradation == "bicubic":
            assert ours.psnr >= bicubic.psnr - 1.0, (ours, bicubic)  # measured: 32.21 vs 31.92


def test_both_models_are_one_step_models_and_say_so(upscaler, quality):
    """Refined at one step only, their other intervals drifted (2 and 4 steps come out grainy):
    each bundle records it, and a request for more steps is refused with the reason."""
    x = torch.rand(1, 3, 32, 32)
    for model in (upscaler, quality):
        assert model.defaults.max_steps == 1
        with pytest.raises(SMFSRError, match="trained for 1 step"):
            model(x, UpscaleOptions(steps=2))


def test_every_door_lists_both_models_by_name(tmp_path, sample_png):
    from smfsr.checkpoint.catalog import find_models
    from smfsr.checkpoint.default_model import REPO_MODELS

    names = [e.name for e in find_models([REPO_MODELS])]
    assert names == [f"SMFSR x4 ({FIDELITY})", f"SMFSR x4 ({QUALITY})"]  # the app's menu and A1111's list
    assert main(["upscale", str(sample_png), "-o", str(tmp_path / "q.png"), "--model", QUALITY, "-q"]) == 0
    assert main(["upscale", str(sample_png), "-o", str(tmp_path / "x.png"), "--model", "no-such-model", "-q"]) == 2


def test_front_door_upscales_the_bundled_sample_with_the_default_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SMFSR_MODEL", raising=False)
    assert main(["upscale", str(SAMPLE), "-o", str(tmp_path)]) == 0
    result = tmp_path / "sunset_lr.png"
    assert str(result) in capsys.readouterr().err
    from PIL import Image

    with Image.open(SAMPLE) as lr, Image.open(result) as sr:
        assert sr.size == (lr.width * 4, lr.height * 4)
