"""``python -m bench [--quick] [--only NAME ...] [--no-write]``: run the comparisons, print tables,
append them to bench/RESULTS.md with the date, machine and commit.
``python -m bench fullsize ...``: the official path at full size through the doors (its own options);
``python -m bench conditioning ...``: ComfyUI's SD3 conditioning next to the project's prompt embedding;
``python -m bench memory ...``: each door's memory estimate against the peak it reaches."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .harness import Table, report

COMPARISONS = {
    "steps": "bench.steps",  # one SMFSR step vs a 40-step teacher
    "tiled_vae": "bench.tiled_vae",  # exact tiled VAE and diffusers tiling vs untiled
    "training_step": "bench.training_step",  # ISC vs MeanFlow JVP training step
    "pipeline": "bench.pipeline",  # end to end vs 40 teacher steps, throughput, scaling with size
    "runtime": "bench.runtime",  # fp8 vs bf16/fp32: size, load memory, speed, output difference
}


TOOLS = {"fullsize": "bench.fullsize",  # rehearsals with their own options and output folder
         "conditioning": "bench.conditioning",
         "memory": "bench.memory"}  # each door's memory estimate against its measured peak


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        sys.exit(importlib.import_module(TOOLS[sys.argv[1]]).main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smallest sizes only")
    parser.add_argument("--full", action="store_true", help="also the largest sizes (4096^2 VAE decodes: about 12 min on 2 cores)")
    parser.add_argument("--only", nargs="*", choices=sorted(COMPARISONS), help="run only these")
    parser.add_argument("--no-write", action="store_true", help="print, don't append to bench/RESULTS.md")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full" if args.full else "default"
    tables = []
    walls = Table(f"Harness wall time ({mode} mode)", ["comparison", "minutes"])
    started = time.perf_counter()
    for name in args.only or COMPARISONS:
        start = time.perf_counter()
        result = importlib.import_module(COMPARISONS[name]).run(mode)
        tables += result if isinstance(result, list) else [result]
        walls.add(name, f"{(time.perf_counter() - start) / 60:.1f}")
    walls.add("total", f"{(time.perf_counter() - started) / 60:.1f}")
    report(tables + [walls], write=not args.no_write)


if __name__ == "__main__":
    main()
