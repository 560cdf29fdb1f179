"""The benchmark code keeps working (the numbers themselves live in bench/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from bench import steps
from tests.helpers import REPO
from bench.harness import Table, in_child


def _square(x: int) -> dict:
    return {"value": x * x}


@pytest.mark.slow
def test_step_benchmark_runs_and_reports_a_ratio_per_row():
    """The benchmark runs and reports; what the ratio is belongs to bench/RESULTS.md, not to a test
    (a timing depends on what else the machine is doing)."""
    table = steps.run("quick")
    assert isinstance(table, Table) and len(table.rows) == 2
    for row in table.rows:
        assert row[-1].endswith("x") and float(row[-1].rstrip("x")) > 0


@pytest.mark.slow
def test_child_processes_report_results_and_errors():
    assert in_child(_square, 7) == {"value": 49}
    assert "error" in in_child(_square, "x")


@pytest.mark.slow
def test_gpu_check_passes_its_dry_run(tmp_path):
    """The prepared GPU script, at tiny size on the CPU: it must be known to work before a GPU is lent."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "--dry-run"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 20 and all(r["seconds"] > 0 for r in runs)
    text = (tmp_path / "results.md").read_text()
    assert "teacher 40 steps" in text and "fp8 + block swap 2, 128->512" in text


def test_model_evaluation_scores_bicubic_and_the_model_and_measures_the_seed_spread(tiny_bundle_path, tmp_path):
    from PIL import Image

    from bench.eval_model import evaluate
    from tests.helpers import photo_like

    for i in range(3):
        Image.fromarray(photo_like(80, 96, seed=i)).save(tmp_path / f"v{i}.png")
    from tests.helpers import save_random_feature_stack

    lpips = save_random_feature_stack(tmp_path / "alex.safetensors", arch="alexnet-st")
    figure = tmp_path / "figure.png"
    quality, steps, spread = evaluate({"tiny": str(tiny_bundle_path)}, tmp_path, crop=64, seeds=2, lpips_file=str(lpips),
                                      steps=(1, 2), figure=figure)
    assert [r[:2] for r in quality.rows] == [["bicubic", "bicubic"], ["bicubic", "tiny"], ["bicubic", "ground truth"],
                                             ["realesrgan", "bicubic"], ["realesrgan", "tiny"],
                                             ["realesrgan", "ground truth"]]
    bicubic_psnr = float(quality.rows[0][2])
    assert 20 < bicubic_psnr < 60  # smooth images: bicubic does well
    methods = [r for r in quality.rows if r[1] != "ground truth"]
    assert all(float(r[6]) > 0 for r in methods)  # a perceptual distance for every method
    assert all(0 <= float(r[5]) < 1 for r in quality.rows)  # a grid strength for every row
    assert steps.rows[0][0] == "tiny" and len(steps.rows[0]) == 3
    from PIL import Image

    assert Image.open(figure).size[0] == 4 * 2 * 32  # LR, bicubic, the model, ground truth: 32 px crops x2
    values = dict(spread.rows)
    assert float(values["same seed twice: max abs difference"]) == 0.0  # same seed, same image
    assert float(values["different seeds: mean per-pixel std over seeds"]) > 0  # the noise start matters


def test_the_cnn_probe_starts_as_bicubic_and_trains(tmp_path):
    from PIL import Image

    from bench.probe_cnn import espcn, probe, upscale
    from smfsr.pipeline import resize
    from tests.helpers import photo_like

    lr = torch.rand(1, 3, 8, 12)
    assert torch.allclose(upscale(espcn(), lr), resize(lr, 32, 48))  # zero last layer: exactly bicubic
    for i in range(3):
        Image.fromarray(photo_like(80, 96, seed=i)).save(tmp_path / f"p{i}.png")
    table = probe(tmp_path, tmp_path, crop=64, val_crop=64, max_steps=2)
    assert [r[0] for r in table.rows] == ["bicubic", "CNN probe"] and "2 steps" in table.title
    bicubic, probed = (float(r[1]) for r in table.rows)
    assert 20 < bicubic < 60 and abs(probed - bicubic) < 1  # starts as bicubic; a misaligned output is far off


@pytest.mark.slow
def test_the_suite_runs_in_a_clone_named_smfsr(tmp_path):
    """The repository root is also a package (ComfyUI's entry, __init__.py); a clone folder named
    like the core package must not shadow it, neither in pytest nor in the benchmark's children."""
    import shutil
    import subprocess
    import sys

    from tests.helpers import REPO

    clone = tmp_path / "smfsr"
    clone.mkdir()
    for name in ("__init__.py", "pyproject.toml"):
        shutil.copy(REPO / name, clone / name)
    for folder in ("smfsr", "bench", "comfyui_nodes", "a1111_extension"):
        shutil.copytree(REPO / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "tests").mkdir()
    (clone / "models").mkdir()  # beside the package, as in a real clone
    for name in ("conftest.py", "helpers.py", "test_bench.py"):
        shutil.copy(REPO / "tests" / name, clone / "tests" / name)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bench.py",
                          "-k", "child_processes"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout


def _dies_on_import() -> dict:
    import os

    os._exit(3)  # as a child whose imports fail would, before it can report


def test_a_child_that_dies_is_reported_at_once():
    import time

    start = time.monotonic()
    result = in_child(_dies_on_import, timeout=600)
    assert "exited with 3" in result["error"]
    assert time.monotonic() - start < 60  # not the timeout


def test_grid_strength_sees_a_4_pixel_pattern_and_not_a_photo():
    import numpy as np
    import torch

    from bench.eval_model import grid_strength
    from smfsr.imageio import open_image

    photo = torch.from_numpy(np.array(open_image(REPO / "samples" / "sunset_lr.png").convert("RGB")))
    photo = photo.permute(2, 0, 1).float()[None] / 255
    gridded = photo.clone()
    gridded[..., ::4, ::4] += 0.03  # a faint dot every 4 px
    clean, grid = grid_strength(photo).item(), grid_strength(gridded.clamp(0, 1)).item()
    assert clean < 0.001 and grid > 0.02, (clean, grid)
    shifted = photo.clone()
    shifted[..., ::3, ::3] += 0.03  # another period is not this grid
    assert grid_strength(shifted.clamp(0, 1)).item() < 0.01


def test_the_grid_penalty_sees_the_errors_phase_pattern_not_its_sharpness():
    """grid_loss (the refine stage's weight_grid): zero for the target itself and for a sharpened
    copy (an error without a phase pattern), large for a faint 4-px dot pattern, and gradient
    descent on it takes the pattern out while keeping the sharpening."""
    import numpy as np
    import torch

    from smfsr.imageio import open_image
    from smfsr_trainer.grid import grid_loss, grid_strength, highpass_luma

    photo = torch.from_numpy(np.array(open_image(REPO / "samples" / "sunset_lr.png").convert("RGB")))
    photo = photo.permute(2, 0, 1).float()[None, :, :176, :264] / 255
    blurred = torch.nn.functional.avg_pool2d(photo, 3, 1, 1)
    sharpened = photo + 0.5 * (photo - blurred)
    dots = torch.zeros_like(photo)
    dots[..., ::4, ::4] = 0.03
    assert grid_loss(photo, photo, 4).item() == 0
    pattern, sharp = grid_loss(sharpened + dots, photo, 4).item(), grid_loss(sharpened, photo, 4).item()
    assert pattern > 20 * sharp and grid_loss(sharpened + dots, photo, 3).item() < pattern / 10
    image = (sharpened + dots).requires_grad_(True)
    optimiser = torch.optim.SGD([image], lr=2000.0)
    for _ in range(50):
        optimiser.zero_grad()
        grid_loss(image, photo, 4).backward()
        optimiser.step()
    assert grid_loss(image, photo, 4).item() < 2 * sharp  # down to what the sharpening alone has
    assert grid_strength(image.detach().clamp(0, 1)).item() < 0.002 < grid_strength((sharpened + dots).clamp(0, 1)).item()
    detail = highpass_luma(image.detach()).pow(2).mean() / highpass_luma(sharpened).pow(2).mean()
    assert 0.95 < detail < 1.1, detail  # not by blurring: the sharpened detail stays
