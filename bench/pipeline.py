"""Whole-pipeline comparisons (issue 10), each variant in its own process:

- end to end: one SMFSR step vs a 40-step teacher on the same network, per image (encode, sample,
  decode, colour fix) at 512^2 and 1024^2 output;
- throughput: 20 images with the default model, one at a time vs batched, and `smfsr upscale`
  on a folder of them;
- scaling: time and peak memory vs output size with tiling, and the fitted exponent of time vs
  pixels (1 = linear).

Networks other than the default model have random weights (speed does not depend on them).
"""

from __future__ import annotations

import math
import time

from .harness import Table, in_child, mib, peak_rss_bytes, rss_bytes


def _upscale(preset: str, out_side: int, steps: int, batch: int, repeats: int) -> dict:
    import torch

    from smfsr.checkpoint.random import random_bundle
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


THROUGHPUT_SIDE = 128  # input side; x4 -> 512^2 outputs


def default_model() -> str | None:
    from smfsr.checkpoint.default_model import SHIPPED_MODEL

    return str(SHIPPED_MODEL) if SHIPPED_MODEL.is_file() else None


def throughput(mode: str) -> Table:
    model = default_model()
    name = "the default model" if model else "random small-x4 stand-in (the default model is missing)"
    n = 4 if mode == "quick" else 20
    table = Table(f"Throughput: {n} images of {THROUGHPUT_SIDE}^2 -> {4 * THROUGHPUT_SIDE}^2, {name}",
                  ["how", "batch", "images/s", "peak memory"])
    for batch in (1, 4, n):
        r = in_child(_throughput, model, batch, n)
        if "error" in r:
            table.add("library call (SMFSRUpscaler)", batch, r["error"], "")
            continue
        table.add("library call (SMFSRUpscaler)", batch, f"{n / r['seconds']:.2f}", f"{mib(r['peak'])} over baseline")
    r = in_child(_cli_folder, model, n)
    if "error" in r:
        table.add("`smfsr upscale FOLDER`", 1, r["error"], "")
    else:
        table.add("`smfsr upscale FOLDER`", 1, f"{n / r['seconds']:.2f}", f"{mib(r['peak'])} process peak")
    table.notes.append("Library rows: the upscaling alone, after loading and one warm-up image; peak RSS over the "
                       "loaded process. CLI row: the whole command (model loading, PNG decode/encode included) "
                       "on a folder of PNGs, run in its own process; the CLI upscales one image at a time.")
    return table


def _upscaler(model: str | None):
    from smfsr.checkpoint.random import random_bundle
    from smfsr.pipeline import SMFSRUpscaler

    if model:
        return SMFSRUpscaler.from_pretrained(model, device="cpu", dtype="fp32")
    return SMFSRUpscaler(random_bundle("small-x4", "space-to-depth-x4", process_size=128, latent_tile=32,
                                       latent_overlap=8))


def _images(n: int):
    import torch

    return torch.rand(n, 3, THROUGHPUT_SIDE, THROUGHPUT_SIDE, generator=torch.Generator().manual_seed(0))


def _throughput(model: str | None, batch: int, n: int) -> dict:
    from smfsr.pipeline import UpscaleOptions

    up = _upscaler(model)
    images = _images(n)
    up(images[:1], UpscaleOptions(seed=0))  # warm-up
    base = rss_bytes()
    start = time.perf_counter()
    for i in range(0, n, batch):
        chunk = images[i:i + batch]
        up(chunk, UpscaleOptions(seed=0), seeds=list(range(i, i + len(chunk))))
    return {"seconds": time.perf_counter() - start, "peak": peak_rss_bytes() - base}


def _cli_folder(model: str | None, n: int) -> dict:
    """``smfsr upscale FOLDER -o OUT`` as a user runs it (in this child process, so its peak is the command's)."""
    import tempfile
    from pathlib import Path

    from smfsr.cli import main
    from smfsr.imageio import to_pil

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i, image in enumerate(_images(n)):
            to_pil(image).save(folder / f"{i:02d}.png")
        args = ["upscale", str(folder), "-o", str(Path(tmp) / "out"), "-q", "--device", "cpu"]
        if model is None:
            from smfsr.checkpoint import save_bundle
            from smfsr.checkpoint.random import random_bundle

            model = str(save_bundle(Path(tmp) / "standin.safetensors", random_bundle("small-x4", "space-to-depth-x4")))
        start = time.perf_counter()
        status = main(args + ["--model", model])
        seconds = time.perf_counter() - start
        if status != 0 or len(list((Path(tmp) / "out").iterdir())) != n:
            return {"error": f"smfsr upscale exited with {status}"}
    return {"seconds": seconds, "peak": peak_rss_bytes()}


def scaling(mode: str) -> list[Table]:
    sides = {"quick": [512, 1024], "default": [512, 1024, 2048], "full": [512, 1024, 2048, 4096]}[mode]
    model = default_model()
    runs = [("tiny network, SD3.5-shaped tiny VAE (exact tiling above 1 MP), latent tiles 64",
             lambda side: in_child(_upscale, "tiny", side, 1, 1, 1))]
    if model:
        runs.append(("the default model (lossless pointwise codec, latent tiles 32)",
                     lambda side: in_child(_upscale_model, model, side)))
    tables = []
    for title, measure in runs:
        table = Table(f"Scaling with output size: {title}",
                      ["output", "time", "time / megapixel", "peak memory over baseline", "output image buffer"])
        points = []
        for side in sides:
            r = measure(side)
            if "error" in r:
                table.add(f"{side}^2", r["error"], "", "", "")
                continue
            mp = side * side / 1e6
            points.append((math.log(side * side), math.log(r["seconds"])))
            table.add(f"{side}^2", f"{r['seconds']:.2f} s", f"{r['seconds'] / mp:.2f} s", mib(r["peak"]),
                      mib(3 * 4 * side * side))
        if len(points) >= 2:
            table.notes.append(f"Fitted exponent of time vs pixels: {fit_exponent(points):.2f} (1 = linear), "
                               f"{math.exp(points[0][0]) / 1e6:.2f} to {math.exp(points[-1][0]) / 1e6:.2f} MP.")
        tables.append(table)
    return tables


def _upscale_model(model: str, out_side: int) -> dict:
    import torch

    from smfsr.pipeline import UpscaleOptions

    up = _upscaler(model)
    image = torch.rand(1, 3, out_side // 4, out_side // 4, generator=torch.Generator().manual_seed(0))
    up(image[..., :32, :32], UpscaleOptions(seed=0))  # warm-up
    base = rss_bytes()
    start = time.perf_counter()
    up(image, UpscaleOptions(seed=0))
    return {"seconds": time.perf_counter() - start, "peak": peak_rss_bytes() - base}


def fit_exponent(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(time) against log(pixels)."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def run(mode: str = "default") -> list[Table]:
    return [end_to_end(mode), throughput(mode), *scaling(mode)]
