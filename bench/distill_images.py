"""Distillation and refinement on images: PSNR/SSIM/sharpness of the ISC student at 1 step vs its
flow teacher at 1 and 25 steps, and of the refined student when the run has one, on held-out
photos, for a run of the trainer (vae -> flow -> meanflow [-> refine]).

    python -m bench.distill_images RUN_DIR VAL_DIR [--crop 256] [--also LABEL=BUNDLE ...]

``--also`` adds other one-step bundles as rows (e.g. a control run that continued with L2 only).

Not part of the default ``python -m bench`` run: it needs a trained run (see
smfsr_trainer/recipes/default/README.md). Results append to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .eval_model import held_out, score
from .harness import Table, report


def evaluate(run: Path, val_dir: Path, crop: int, degradation: str, also: dict[str, Path] | None = None) -> Table:
    from smfsr.options import UpscaleOptions, VAETiling
    from smfsr.pipeline import SMFSRUpscaler, resize

    hr, lr = held_out(val_dir, crop, degradation)
    seeds = list(range(len(lr)))
    table = Table(f"Distillation on {len(hr)} held-out photos ({crop} px centre crops, x4, {degradation} LR), run {run}",
                  ["method", "steps", "PSNR (dB)", "SSIM", "sharpness / ground truth"])

    def row(name: str, steps: int | str, sr: torch.Tensor) -> None:
        s = score(sr, hr)
        table.add(name, str(steps), f"{s.psnr:.2f}", f"{s.ssim:.4f}", f"{s.sharpness_ratio:.3f}")

    row("bicubic", "-", resize(lr, *hr.shape[-2:]))
    teacher = SMFSRUpscaler.from_pretrained(run / "flow.safetensors", device="cpu", dtype="fp32")
    student = SMFSRUpscaler.from_pretrained(run / "meanflow.safetensors", device="cpu", dtype="fp32")
    codec = teacher.codec
    row("VAE reconstruction of HR (ceiling)", "-", codec.decode(codec.encode(hr)))
    for steps in (1, 25):
        row("flow teacher (Euler)", steps, teacher(lr, UpscaleOptions(steps=steps, vae_tiling=VAETiling.off()), seeds=seeds))
    for steps in (1, 2):
        row("SMFSR student (ISC)", steps, student(lr, UpscaleOptions(steps=steps, vae_tiling=VAETiling.off()), seeds=seeds))
    extra = dict(also or {})
    if (run / "refine.safetensors").exists():
        extra = {"SMFSR refined (GAN + VSD)": run / "refine.safetensors", **extra}
    for label, path in extra.items():
        up = SMFSRUpscaler.from_pretrained(path, device="cpu", dtype="fp32")
        row(label, 1, up(lr, UpscaleOptions(steps=1, vae_tiling=VAETiling.off()), seeds=seeds))
    table.notes.append("Colour fix AdaIN (the default); seeds 0..N-1; all models trained by the SMFSR trainer on the "
                       "training photos only.")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distill_images")
    parser.add_argument("run", type=Path)
    parser.add_argument("val_dir", type=Path)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--degradation", choices=["bicubic", "realesrgan"], default="bicubic")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=BUNDLE",
                        help="another one-step bundle to add as a row")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    also = {}
    for item in args.also:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--also expects LABEL=BUNDLE, got {item!r}")
        also[label] = Path(path)
    report([evaluate(args.run, args.val_dir, args.crop, args.degradation, also)], write=not args.no_write)


if __name__ == "__main__":
    main()
