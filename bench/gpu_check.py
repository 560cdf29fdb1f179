"""The one prepared GPU check (H100/H200): SD3.5-medium-sized SMFSR with random weights (speed does
not depend on them), bf16, SDPA. Needs only torch/diffusers/safetensors and this repository.

    bash bench/gpu_check.sh OUT_DIR              # on the GPU machine, under 8 minutes
    python bench/gpu_check.py OUT_DIR --dry-run  # the same script at tiny size on a CPU

Measures: latency of a full upscale 128 -> 512 and 256 -> 1024 (encode, one step, decode) and peak
VRAM; the same with 40 teacher steps; a 4096x4096 output with tiling; torch.compile on/off.
Writes OUT_DIR/results.json and OUT_DIR/results.md.
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
from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="tiny networks on the CPU: checks the script runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    student, teacher, vae = ("tiny", "tiny-teacher", "tiny") if dry else ("sd35-medium", "dit4sr-sd35-medium", "sd35")
    sizes = [(32, 128), (64, 256)] if dry else [(128, 512), (256, 1024)]
    big = 256 if dry else 1024  # input side of the x4 tiled run (4096 output at full size)

    def upscaler(preset: str) -> SMFSRUpscaler:
        with torch.device(device):
            bundle = random_bundle(preset, vae, process_size=64 if dry else 512)
        up = SMFSRUpscaler(bundle)
        for module in (up.transformer, up.codec.vae):
            torch.nn.Module.to(module, device=device, dtype=dtype)
        up.prompt_embeds, up.prompt_pooled = up.prompt_embeds.to(device, dtype), up.prompt_pooled.to(device, dtype)
        return up

    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
               "dtype": str(dtype), "student": student, "torch": torch.__version__, "runs": []}
    up = upscaler(student)
    for lr, out in sizes:
        results["runs"].append({"what": f"SMFSR 1 step {lr}->{out}", **measure(up, lr, 1, 3, device)})
    up.transformer = torch.compile(up.transformer) if not dry else up.transformer
    results["runs"].append({"what": f"SMFSR 1 step {sizes[0][0]}->{sizes[0][1]}, torch.compile{' (skipped in dry run)' if dry else ''}",
                            **measure(up, sizes[0][0], 1, 3, device)})
    up = upscaler(student)
    results["runs"].append({"what": f"SMFSR 1 step {big}->{4 * big} (latent tiles + exact tiled VAE)",
                            **measure(up, big, 1, 1, device)})
    del up
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t = upscaler(teacher)
    for lr, out in sizes:
        results["runs"].append({"what": f"teacher 40 steps {lr}->{out}", **measure(t, lr, 40, 1, device)})

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"GPU check on {results['device']}, {results['dtype']}, torch {results['torch']}", "",
             "| run | time (s) | peak VRAM (GiB) |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['seconds']:.3f} | {r['peak_gib']:.2f} |" for r in results["runs"]]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
