"""The one prepared GPU check (H100/H200): SD3.5-medium-sized SMFSR with random weights (speed does
not depend on them), bf16, SDPA. Needs only torch/diffusers/safetensors and this repository.

    bash bench/gpu_check.sh OUT_DIR              # on the GPU machine, under 8 minutes
    python bench/gpu_check.py OUT_DIR --dry-run  # the same script at tiny size on a CPU

Measures latency and peak VRAM of a full upscale (encode, one step, exact tiled decode) at 512^2,
1024^2 and 2048^2 output for: bf16; fp8 weights; block swap of 8 and of 16 blocks; fp8 + block swap
16; torch.compile (512^2 only, its first call's compile time reported); the SD3.5 VAE's exact tiled
decode against its untiled one at 1024^2 and 2048^2 (device peak, host memory); and the 40-step
teacher at 512^2 for comparison. Writes OUT_DIR/results.json and OUT_DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from smfsr.checkpoint.random import random_bundle  # noqa: E402
from smfsr.options import UpscaleOptions  # noqa: E402
from smfsr.pipeline import SMFSRUpscaler  # noqa: E402


def measure(up: SMFSRUpscaler, side: int, steps: int, repeats: int, device: torch.device) -> dict:
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    up(x, UpscaleOptions(steps=steps, seed=0))  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        up(x, UpscaleOptions(steps=steps, seed=0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": sorted(times)[len(times) // 2], "peak_gib": peak}


def vae_runs(vae, device: torch.device, dry: bool) -> list[dict]:
    """The exact tiled decode against the untiled one: device memory set by the tile, host memory used."""
    import resource

    from smfsr.options import VAETiling
    from smfsr.tiling.vae import tiled_decode

    vae = vae.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    runs = []
    for side in ((32, 64) if dry else (128, 256)):  # latent px: 1024^2 and 2048^2 output at full size
        z = torch.randn(1, vae.config.latent_channels, side, side, device=device, dtype=next(vae.parameters()).dtype)
        for label, decode in (("untiled", lambda: vae.decode(z).sample),
                              ("exact tiled, tile 64", lambda: tiled_decode(vae, z, VAETiling(tile=64)))):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                decode()
            if device.type == "cuda":
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB, the process so far
            runs.append({"what": f"VAE decode {8 * side}^2, {label} (host peak RSS so far {host:.1f} GiB)",
                         "seconds": time.perf_counter() - start, "peak_gib": peak})
    return runs


def main() -> None:
    import copy

    from smfsr.runtime import Runtime, prepare

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="tiny networks on the CPU: checks the script runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    dtype = "fp32" if device.type == "cpu" else "bf16"
    student, teacher, vae = ("tiny", "tiny-teacher", "tiny") if dry else ("sd35-medium", "dit4sr-sd35-medium", "sd35")
    sides = [32, 64, 128] if dry else [128, 256, 512]  # LR inputs: x4 gives 512^2, 1024^2, 2048^2 (full size)
    swaps = (1, 2) if dry else (8, 16)

    def built(preset: str):
        return random_bundle(preset, vae, process_size=64 if dry else 512)

    base = built(student)
    configs = [("bf16" if not dry else "fp32", Runtime(device, dtype)),
               ("fp8 weights", Runtime(device, dtype, weights="fp8")),
               (f"block swap {swaps[0]}", Runtime(device, dtype, block_swap=swaps[0])),
               (f"block swap {swaps[1]}", Runtime(device, dtype, block_swap=swaps[1])),
               (f"fp8 + block swap {swaps[1]}", Runtime(device, dtype, weights="fp8", block_swap=swaps[1]))]
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
               "dtype": dtype, "student": student, "torch": torch.__version__, "runs": []}
    for label, runtime in configs:
        up = SMFSRUpscaler(prepare(copy.deepcopy(base), runtime))
        for side in sides:
            results["runs"].append({"what": f"SMFSR 1 step, {label}, {side}->{4 * side}", **measure(up, side, 1, 2, device)})
        del up
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not dry:  # compile: minutes on a CPU, so not in the dry run
        up = SMFSRUpscaler(prepare(copy.deepcopy(base), Runtime(device, dtype, compile=True)))
        start = time.perf_counter()
        up(torch.rand(1, 3, sides[0], sides[0]), UpscaleOptions(seed=0))
        first = time.perf_counter() - start
        run = measure(up, sides[0], 1, 3, device)
        results["runs"].append({"what": f"SMFSR 1 step, torch.compile, {sides[0]}->{4 * sides[0]} "
                                        f"(first call, compiling: {first:.1f} s)", **run})
        del up
        torch.cuda.empty_cache()
    results["runs"] += vae_runs(base.vae, device, dry)
    del base
    t = SMFSRUpscaler(prepare(built(teacher), Runtime(device, dtype)))
    results["runs"].append({"what": f"teacher 40 steps, {sides[0]}->{4 * sides[0]}", **measure(t, sides[0], 40, 1, device)})

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"GPU check on {results['device']}, {results['dtype']}, torch {results['torch']}", "",
             "| run | time (s) | peak VRAM (GiB) |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['seconds']:.3f} | {r['peak_gib']:.2f} |" for r in results["runs"]]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
