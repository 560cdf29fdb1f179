"""Evaluate a model bundle on held-out photos (the default model's quality table, issue 8).

    python -m bench.eval_model [MODEL] VAL_DIR [--crop 256] [--seeds 3] [--no-write]

x4 with two degradations of each held-out photo's centre crop: (a) bicubic downsampling, (b) the
Real-ESRGAN second-order pipeline at a fixed seed. Prints PSNR, SSIM and sharpness (mean gradient
magnitude relative to the ground truth) for bicubic upsampling and for the model, checks the
targets, and measures what the seed changes: the same seed must give the same image; different
seeds should change fine detail (spread of the output) but not content (PSNR between seeds high).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from .harness import Table, report


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude per image (a no-reference sharpness measure)."""
    dx, dy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    return dx.abs().mean((1, 2, 3)) + dy.abs().mean((1, 2, 3))


@dataclass
class Scores:
    psnr: float
    ssim: float
    sharpness_ratio: float  # sharpness / ground truth's, averaged over images


def score(sr: torch.Tensor, hr: torch.Tensor) -> Scores:
    from kornia.metrics import psnr, ssim

    return Scores(psnr(sr, hr, 1.0).mean().item(), ssim(sr, hr, 11).mean().item(),
                  (sharpness(sr) / sharpness(hr)).mean().item())


def held_out(val_dir: Path, crop: int, degradation: str, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    from smfsr_trainer.data import SRPairs

    data = SRPairs(str(val_dir), crop=crop, scale=4, degradation=degradation, seed=seed, train=False)
    items = [data[i] for i in range(len(data))]
    return torch.stack([it["hr"] for it in items]), torch.stack([it["lr"] for it in items])


def evaluate(model: str | None, val_dir: Path, crop: int, seeds: int) -> list[Table]:
    from smfsr.options import UpscaleOptions, VAETiling
    from smfsr.pipeline import SMFSRUpscaler, resize

    up = SMFSRUpscaler.from_pretrained(model, device="cpu", dtype="fp32")
    name = model or "the default model"
    quality = Table(f"Quality of {name}, x4 on held-out photos ({crop} px centre crops of {val_dir})",
                    ["degradation", "method", "PSNR (dB)", "SSIM", "sharpness / ground truth", "target", "met"])
    spread = None
    for degradation in ("bicubic", "realesrgan"):
        hr, lr = held_out(val_dir, crop, degradation)
        base = score(resize(lr, *hr.shape[-2:]), hr)
        sr = up(lr, UpscaleOptions(vae_tiling=VAETiling.off()), seeds=list(range(len(lr))))
        ours = score(sr, hr)
        quality.add(degradation, "bicubic", f"{base.psnr:.2f}", f"{base.ssim:.4f}", f"{base.sharpness_ratio:.3f}", "", "")
        if degradation == "bicubic":
            target, met = f"PSNR >= {base.psnr + 0.5:.2f}", ours.psnr >= base.psnr + 0.5
        else:
            closer = abs(ours.sharpness_ratio - 1) < abs(base.sharpness_ratio - 1)
            target = f"sharpness closer to 1 than {base.sharpness_ratio:.3f}; PSNR >= {base.psnr - 0.5:.2f}"
            met = closer and ours.psnr >= base.psnr - 0.5
        quality.add(degradation, "SMFSR (1 step)", f"{ours.psnr:.2f}", f"{ours.ssim:.4f}",
                    f"{ours.sharpness_ratio:.3f}", target, "yes" if met else "NO")
        if degradation == "realesrgan":
            spread = seed_spread(up, lr, hr, seeds)
    quality.notes.append(f"{len(hr)} photos; the Real-ESRGAN degradation is drawn with seed 1234; the model's noise "
                         "seed is the image's index.")
    return [quality, spread]


def seed_spread(up, lr: torch.Tensor, hr: torch.Tensor, seeds: int) -> Table:
    """Same seed twice: identical. Different seeds: how much the output moves, and where."""
    from kornia.metrics import psnr

    from smfsr.pipeline import UpscaleOptions

    runs = [up(lr, UpscaleOptions(), seeds=[s] * len(lr)) for s in range(seeds)]
    again = up(lr, UpscaleOptions(), seeds=[0] * len(lr))
    stack = torch.stack(runs)  # (seeds, B, 3, H, W)
    std = stack.std(0)  # per-pixel spread over seeds
    detail = (hr - torch.nn.functional.avg_pool2d(hr, 5, 1, 2, count_include_pad=False)).abs()
    busy = detail > detail.flatten(1).median(1).values.view(-1, 1, 1, 1)
    between = [psnr(runs[i], runs[j], 1.0).mean().item() for i in range(seeds) for j in range(i + 1, seeds)]
    table = Table(f"Seeds: {seeds} seeds on the Real-ESRGAN-degraded photos", ["measure", "value"])
    table.add("same seed twice: max abs difference", f"{(again - runs[0]).abs().max().item():.2e}")
    table.add("different seeds: mean per-pixel std over seeds", f"{std.mean().item():.4f}")
    table.add("  in detailed regions / in flat regions", f"{std[busy].mean().item():.4f} / {std[~busy].mean().item():.4f}")
    table.add("different seeds: PSNR between two seeds' outputs (dB)", f"{min(between):.2f} - {max(between):.2f}")
    table.add("PSNR to ground truth per seed (dB)", " / ".join(f"{psnr(r, hr, 1.0).mean().item():.2f}" for r in runs))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_model")
    parser.add_argument("paths", nargs="+", metavar="[MODEL] VAL_DIR", help="a bundle (default: the default model), then a folder of held-out photos")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if len(args.paths) > 2:
        parser.error("expected [MODEL] VAL_DIR")
    model, val_dir = (args.paths[0], args.paths[1]) if len(args.paths) == 2 else (None, args.paths[0])
    report(evaluate(model, Path(val_dir), args.crop, max(2, args.seeds)), write=not args.no_write)


if __name__ == "__main__":
    main()
