"""The ``smfsr`` command: files, folders, globs, no overwrites, broken inputs, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smfsr.batch import plan
from smfsr.cli import main
from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions
from tests.helpers import photo_like

REPO = Path(__file__).resolve().parents[1]


def smfsr(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "smfsr.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def write_images(folder: Path, n: int, size=(24, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(photo_like(*size, seed=i)).save(p)
        paths.append(p)
    return paths


def test_upscale_one_file_matches_the_library(tmp_path, tiny_bundle_path, sample_png):
    out = tmp_path / "out.png"
    assert main(["upscale", str(sample_png), "-o", str(out), "--model", str(tiny_bundle_path), "--seed", "3", "-q"]) == 0
    expected = SMFSRUpscaler.from_pretrained(tiny_bundle_path, device="cpu")(Image.open(sample_png), UpscaleOptions(seed=3))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_results_get_the_permissions_a_plain_file_would(tmp_path, tiny_bundle_path, sample_png):
    """Written through a temporary file (mkstemp's are owner-only), the result still gets the umask's."""
    old = os.umask(0o022)
    try:
        assert main(["upscale", str(sample_png), "-o", str(tmp_path / "out.png"), "--model", str(tiny_bundle_path),
                     "-q"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_folders_and_globs_keep_names_and_never_overwrite(tmp_path, tiny_bundle_path, capsys):
    src = tmp_path / "in"
    write_images(src / "sub", 2)
    write_images(src, 1)
    out = tmp_path / "out"
    assert main(["upscale", str(src), "-o", str(out), "--model", str(tiny_bundle_path), "-q"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["img0.png", "sub/img0.png", "sub/img1.png"]
    assert Image.open(out / "sub" / "img1.png").size == (128, 96)

    before = (out / "img0.png").read_bytes()
    code = main(["upscale", str(src / "img0.png"), "-o", str(out), "--model", str(tiny_bundle_path), "--seed", "9"])
    assert code == 1 and "already exists" in capsys.readouterr().err
    assert (out / "img0.png").read_bytes() == before
    assert main(["upscale", str(src / "img0.png"), "-o", str(out), "--model", str(tiny_bundle_path), "--skip-existing"]) == 0
    assert main(["upscale", str(src / "img0.png"), "-o", str(out), "--model", str(tiny_bundle_path), "--seed", "9",
                 "--overwrite", "-q"]) == 0
    assert (out / "img0.png").read_bytes() != before

    globbed = tmp_path / "globbed"
    assert main(["upscale", str(src / "sub" / "*.png"), "-o", str(globbed), "--model", str(tiny_bundle_path), "-q"]) == 0
    assert sorted(p.name for p in globbed.iterdir()) == ["img0.png", "img1.png"]


@pytest.mark.slow
def test_broken_images_are_reported_and_the_rest_finish(tmp_path, tiny_bundle_path):
    src = tmp_path / "in"
    write_images(src, 2)
    (src / "empty.png").write_bytes(b"")
    (src / "tiny.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(src / "tiny.png")
    (src / "notes.png").write_text("this is not an image")
    good = src / "img0.png"
    (src / "cut.png").write_bytes(good.read_bytes()[:200])
    result = smfsr("upscale", src, "-o", tmp_path / "out", "--model", tiny_bundle_path)
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert "Traceback" not in err
    assert "empty.png is empty (0 bytes)" in err
    assert "tiny.png is 1x1 pixels" in err
    assert "notes.png is not an image file" in err
    assert "cut.png could not be decoded" in err and "truncated" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png"]
    assert "2 of 6 images upscaled, 4 failed" in err


@pytest.mark.slow
def test_bad_model_files_exit_2_with_one_clear_line(tmp_path, sample_png, tiny_bundle_path):
    pkl = tmp_path / "model.ckpt"
    pkl.write_bytes(b"\x80\x04K\x01.")
    result = smfsr("upscale", sample_png, "-o", tmp_path / "o.png", "--model", pkl)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pickled PyTorch checkpoint" in result.stderr
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_bundle_path.read_bytes()[:5000])
    result = smfsr("info", cut)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "truncated" in result.stderr
    result = smfsr("info", tiny_bundle_path)
    assert result.returncode == 0 and "SMFSR bundle" in result.stdout


def test_missing_default_model_says_what_to_do(tmp_path, sample_png, monkeypatch, capsys):
    monkeypatch.setenv("SMFSR_MODEL", str(tmp_path / "nothing.safetensors"))
    assert main(["upscale", str(sample_png), "-o", str(tmp_path / "o.png")]) == 2
    assert "--model" in capsys.readouterr().err


def test_inputs_are_split_across_processes(tmp_path, tiny_bundle_path, monkeypatch):
    src = tmp_path / "in"
    write_images(src, 5)
    shares = [plan([str(src)], str(tmp_path / "o"), overwrite=False, skip_existing=False, rank=r, world=3).todo
              for r in range(3)]
    assert [[job.source.name for job in share] for share in shares] == [["img0.png", "img3.png"],
                                                                         ["img1.png", "img4.png"], ["img2.png"]]
    out = tmp_path / "out"
    for rank in (0, 1):  # what `accelerate launch --num_processes 2` sets for each process
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(["upscale", str(src), "-o", str(out), "--model", str(tiny_bundle_path), "-q"]) == 0
        done = sorted(p.name for p in out.iterdir())
        assert done == (["img0.png", "img2.png", "img4.png"] if rank == 0 else [f"img{i}.png" for i in range(5)])


def test_convert_writes_a_bundle_from_official_parts(tmp_path, sample_png):
    from tests.helpers import write_official_folder
    from tests.helpers import tiny_sd35_vae
    import torch
    from safetensors.torch import save_file

    from smfsr.checkpoint import build_transformer
    from smfsr.models import transformer_config

    model = build_transformer(transformer_config("tiny-official"))
    root = write_official_folder(tmp_path / "smfsr_q", model)
    tiny_sd35_vae().save_pretrained(tmp_path / "sd35" / "vae", safe_serialization=True)
    save_file({"embeds": torch.randn(1, 5, 16), "pooled": torch.randn(1, 16)}, str(tmp_path / "prompt.safetensors"))
    out = tmp_path / "smfsr_q.safetensors"
    assert main(["convert", "--transformer", str(root), "--vae", str(tmp_path / "sd35"), "--prompt-embeds",
                 str(tmp_path / "prompt.safetensors"), "-o", str(out)]) == 0
    up = SMFSRUpscaler.from_pretrained(out, device="cpu")
    assert up.transformer.config.lr_key_quirk and up.prompt_embeds.shape == (1, 5, 16)
    assert up(Image.open(sample_png)).size == (128, 96)
    assert main(["convert", "--transformer", str(root), "-o", str(out)]) == 2  # exists: refused


@pytest.mark.parametrize("flag", ["--vae-tile=16", "--vae-tile=off", "--vae-tile=2"])
def test_vae_tile_flag(tmp_path, tiny_bundle_path, sample_png, flag, capsys):
    out = tmp_path / "o.png"
    code = main(["upscale", str(sample_png), "-o", str(out), "--model", str(tiny_bundle_path), flag, "-q"])
    assert code == 0 and Image.open(out).size == (128, 96)
    reference = tmp_path / "ref.png"
    assert main(["upscale", str(sample_png), "-o", str(reference), "--model", str(tiny_bundle_path), "-q"]) == 0
    a, b = np.asarray(Image.open(out)).astype(int), np.asarray(Image.open(reference)).astype(int)
    assert np.abs(a - b).max() <= 1  # exact tiling: equal up to 8-bit rounding


def test_compare_writes_bicubic_and_the_result_side_by_side(tmp_path, tiny_bundle_path, sample_png):
    """--compare: NAME_compare.png beside the result, (bicubic | result) at the result's size with a
    gap; the result's pixels are the right panel's; an existing one is kept without --overwrite."""
    import numpy as np
    from PIL import Image

    from smfsr.compare import GAP

    out = tmp_path / "out.png"
    run = smfsr("upscale", sample_png, "-o", out, "--model", tiny_bundle_path, "--compare")
    assert run.returncode == 0, run.stderr
    result = np.asarray(Image.open(out).convert("RGB"))
    pair = np.asarray(Image.open(tmp_path / "out_compare.png"))
    h, w, _ = result.shape
    assert pair.shape == (h, 2 * w + GAP, 3)
    right = pair[:, w + GAP:]
    assert (right[30:] == result[30:]).all()  # below the label
    bicubic = np.asarray(Image.open(sample_png).convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
    assert (pair[30:, :w] == bicubic[30:]).all() and (pair[:, w:w + GAP] == 255).all()
    (tmp_path / "mine_compare.png").write_bytes(b"mine")
    run = smfsr("upscale", sample_png, "-o", tmp_path / "mine.png", "--model", tiny_bundle_path, "--compare")
    assert run.returncode == 0 and (tmp_path / "mine.png").exists(), run.stderr
    assert (tmp_path / "mine_compare.png").read_bytes() == b"mine"
    assert "mine_compare.png already exists, not replaced (use --overwrite)" in run.stderr
