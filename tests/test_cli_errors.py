"""The CLI with bad input: every case says what is wrong in one line (no traceback), exits with the
documented status, changes no file the user had, and is found before the model loads (usage
errors before torch is even imported)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO, photo_like

pytestmark = pytest.mark.slow  # one fresh process per case

PROBE = ("import sys; from smfsr.cli import main; code = main(sys.argv[1:]); "
         "print('torch imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(code)")


def cli(*args, cwd: Path, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # a full disk, as a process sees it: writes past this size fail (EFBIG)
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}, timeout=300,
                          preexec_fn=limit)


@pytest.fixture
def place(tmp_path, tiny_bundle_path):
    """A folder with a good image, an existing output that must survive, and the model."""
    Image.fromarray(photo_like(24, 32)).save(tmp_path / "good.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.png").write_bytes(b"the user's file")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.fromarray(photo_like(64, 64)).save(tmp_path / "big.png")
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("hi")
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path, tiny_bundle_path


# (arguments, exit status, message, whether torch may be imported)
USAGE = [
    (["missing.png", "-o", "out/x.png"], 2, "missing.png: no such file or folder"),
    (["no-images", "-o", "out"], 2, "no-images: the folder has no images"),
    (["good.png", "-o", "out/x.png", "--scale", "0"], 2, "--scale must be greater than 0"),
    (["good.png", "-o", "out/x.png", "--scale", "-1"], 2, "--scale must be greater than 0"),
    (["good.png", "-o", "out/x.png", "--scale", "17"], 2, "scale must be greater than 0 and at most 16"),
    (["good.png", "-o", "out/x.png", "--steps", "0"], 2, "--steps must be at least 1"),
    (["good.png", "-o", "out/x.png", "--tile-size", "16", "--tile-overlap", "20"], 2,
     "--tile-overlap (20) must be smaller than --tile-size (16)"),
    (["good.png", "-o", "out/x.png", "--device", "tpu"], 2, "unknown device 'tpu'"),
    (["good.png", "-o", "out/x.png", "--dtype", "int8"], 2, "invalid choice: 'int8'"),
    (["good.png", "-o", "out/x.png", "--vae-tile", "huge"], 2, "--vae-tile must be 'auto', 'off' or a number"),
    (["good.png", "-o", "a-file/x.png"], 2, "cannot write to a-file: a-file is a file, not a folder; choose another -o"),
    (["good.png", "-o", "out/x.png", "--overwrite", "--skip-existing"], 2, "not allowed with argument"),
]


@pytest.mark.parametrize("args, status, message", USAGE, ids=[" ".join(a[0][2:]) or a[0][0] for a in USAGE])
def test_usage_errors_stop_before_anything_loads(place, args, status, message):
    folder, model = place
    run = cli("upscale", *args, "--model", model, cwd=folder)
    assert run.returncode == status, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "torch imported: False" in run.stderr  # found in well under a second: nothing heavy was imported
    assert (folder / "out" / "keep.png").read_bytes() == b"the user's file"
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["keep.png"]


def test_an_unavailable_device_is_a_usage_error(place):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the case is a CPU-only torch asked for cuda")
    folder, model = place
    run = cli("upscale", "good.png", "-o", "out/x.png", "--device", "cuda", "--model", model, cwd=folder)
    assert run.returncode == 2 and "device 'cuda' is not available" in run.stderr and "Traceback" not in run.stderr
    assert not (folder / "out" / "x.png").exists()


def test_a_model_that_cannot_run_the_options_is_refused_before_it_loads(place):
    folder, model = place  # the tiny model's patch size is 2
    run = cli("upscale", "good.png", "-o", "out/x.png", "--tile-size", "7", "--model", model, cwd=folder)
    assert run.returncode == 2 and "multiple of the model's patch size 2" in run.stderr


# (input, extra arguments, message): per-image failures, exit 1, the rest of a folder still finishes
PER_IMAGE = [
    ("empty.png", [], "empty.png is empty (0 bytes)"),
    ("dot.png", [], "dot.png is 1x1 pixels"),
    ("big.png", ["--max-pixels", "1000"], "64x64 = 4,096 pixels, over the input limit of 1,000 pixels"),
]


@pytest.mark.parametrize("source, extra, message", PER_IMAGE, ids=[c[0] for c in PER_IMAGE])
def test_a_bad_image_fails_alone_and_says_why(place, source, extra, message):
    folder, model = place
    run = cli("upscale", source, "good.png", "-o", "out", "--model", model, *extra, cwd=folder)
    assert run.returncode == 1, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "1 of 2 images upscaled, 1 failed" in run.stderr
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["good.png", "keep.png"]


def test_an_existing_output_is_never_replaced_and_skipping_is_counted(place):
    folder, model = place
    run = cli("upscale", "good.png", "-o", "out/keep.png", "--model", model, cwd=folder)
    assert run.returncode == 1 and "already exists (use --overwrite" in run.stderr
    assert (folder / "out" / "keep.png").read_bytes() == b"the user's file"
    run = cli("upscale", "good.png", "-o", "out/keep.png", "--model", model, "--skip-existing", cwd=folder)
    assert run.returncode == 0 and "exists, skipped" in run.stderr
    assert "0 of 1 images upscaled, 1 skipped (output exists)" in run.stderr
    assert "torch imported: False" in run.stderr  # nothing to do: the model was never loaded


def test_a_full_disk_fails_the_write_and_leaves_nothing_behind(place):
    folder, model = place
    (folder / "out" / "x.png").write_bytes(b"older result")
    run = cli("upscale", "good.png", "-o", "out/x.png", "--model", model, "--overwrite", cwd=folder,
              limit_file_size=2000)  # the PNG is larger: its write fails as on a full disk
    assert run.returncode == 1 and "could not write" in run.stderr and "nothing was written" in run.stderr, run.stderr
    assert (folder / "out" / "x.png").read_bytes() == b"older result"  # the user's file is intact
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["keep.png", "x.png"]  # no temporary left
