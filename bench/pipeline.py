"""Whole-pipeline comparisons (issue 10), each variant in its own process:

- end to end: one SMFSR step vs a 40-step teacher on the same network, per image (encode, sample,
  decode, colour fix) at 512^2 and 1024^2 output;
- throughput: 20 images one at a time vs batched;
- scaling: time and peak memory vs output size with tiling, and the fitted exponent of time vs
  pixels (1 = linear).

Networks have random weights (speed does not depend on them). Until the default model ships, the
"small" preset stands in for it.
"""

from __future__ import annotations

import math
import time

from .harness import Table, in_child, mib, peak_rss_bytes, rss_bytes


def _upscale(preset: str, out_side: int, steps: int, batch: int, repeats: int) -> dict:
    import torch

    from smfsr.checkpoint import random_bundle
    from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions

    torch.set_num_threads(torch.get_num_threads())
    up = SMFSRUpscaler(random_bundle(preset, process_size=64, latent_tile=64, latent_overlap=16))
    side = out_side // 4
    images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    options = UpscaleOptions(steps=steps, seed=0)
    up(images[:1], UpscaleOptions(steps=1, seed=0))  # warm-up
    base = rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        up(images, options, seeds=list(range(batch)))
        times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak": peak_rss_bytes() - base}


def end_to_end(mode: str) -> Table:
    table = Table("End to end per image: one SMFSR step vs a 40-step teacher (same network, random weights)",
                  ["network", "output", "SMFSR 1 step", "teacher 40 steps", "ratio"])
    sizes = [512] if mode == "quick" else [512, 1024]
    for student, teacher in (("tiny", "tiny-teacher"),):
        for side in sizes:
            one = in_child(_upscale, student, side, 1, 1, 3)
            forty = in_child(_upscale, teacher, side, 40, 1, 1)
            if "error" in one or "error" in forty:
                table.add(student, f"{side}^2", one.get("error", ""), forty.get("error", ""), "")
                continue
            table.add(student, f"{side}^2", f"{one['seconds']:.2f} s", f"{forty['seconds']:.1f} s",
                      f"{forty['seconds'] / one['seconds']:.1f}x")
    table.notes.append("Includes VAE encode/decode and colour fix, which both variants share, so the ratio is below "
                       "the sampler-only one.")
    return table


def throughput(mode: str) -> Table:
    table = Table("Throughput: images of 128^2 -> 512^2, one at a time vs batched (small preset, stand-in for "
                  "the default model)", ["images", "batch", "images/s", "peak memory over baseline"])
    n = {"quick": 4, "default": 8, "full": 20}[mode]
    for batch in (1, 4, n):
        r = in_child(_throughput, batch, n)
        if "error" in r:
            table.add(n, batch, r["error"], "")
            continue
        table.add(n, batch, f"{n / r['seconds']:.2f}", mib(r["peak"]))
    return table


def _throughput(batch: int, n: int) -> dict:
    import torch

    from smfsr.checkpoint import random_bundle
    from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions

    up = SMFSRUpscaler(random_bundle("small", process_size=64, latent_tile=64, latent_overlap=16))
    images = torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    up(images[:1], UpscaleOptions(seed=0))  # warm-up
    base = rss_bytes()
    start = time.perf_counter()
    for i in range(0, n, batch):
        chunk = images[i:i + batch]
        up(chunk, UpscaleOptions(seed=0), seeds=list(range(i, i + len(chunk))))
    return {"seconds": time.perf_counter() - start, "peak": peak_rss_bytes() - base}


def scaling(mode: str) -> Table:
    sides = {"quick": [512, 1024], "default": [512, 1024, 2048], "full": [512, 1024, 2048, 4096]}[mode]
    table = Table("Scaling with output size (tiny network, latent tiles 64, exact tiled VAE)",
                  ["output", "time", "time / megapixel", "peak memory over baseline", "output image buffer"])
    points = []
    for side in sides:
        r = in_child(_upscale, "tiny", side, 1, 1, 1)
        if "error" in r:
            table.add(f"{side}^2", r["error"], "", "", "")
            continue
        mp = side * side / 1e6
        points.append((math.log(side * side), math.log(r["seconds"])))
        table.add(f"{side}^2", f"{r['seconds']:.2f} s", f"{r['seconds'] / mp:.2f} s", mib(r["peak"]), mib(3 * 4 * side * side))
    if len(points) >= 2:
        table.notes.append(f"Fitted exponent of time vs pixels: {fit_exponent(points):.2f} (1 = linear), "
                           f"{math.exp(points[0][0]) / 1e6:.2f} to {math.exp(points[-1][0]) / 1e6:.2f} MP.")
    return table


def fit_exponent(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(time) against log(pixels)."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def run(mode: str = "default") -> list[Table]:
    return [end_to_end(mode), throughput(mode), scaling(mode)]
