"""bf16 weights with float32 matmuls (T5's scheme, ``text_encoders._linears_in_float32``) for the
SMFSR transformer on a CPU, against float32 and plain bf16:

    python -m bench.bf16_storage [--depth 2] [--tile 64] [--no-write]

The SD3.5-medium-shaped transformer (random weights, full width, ``--depth`` of its 24 blocks) runs
one latent tile (``--tile`` latent px: 1024 tokens per stream at 64, plus 333 prompt tokens), each
mode in a fresh process, once with this CPU's own instruction set and once limited to AVX2 with
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN runs the bf16 matmuls; an AVX2-only CPU has no bf16
arithmetic). Modes: fp32; bf16 (every weight and activation bf16); bf16 storage (the linear
layers' weights bf16, cast to float32 as each runs; activations and the rest float32). Per mode:
the weights' GiB, the process's peak RSS, seconds per forward (median of 3 after a warm-up) and
the largest difference from fp32's output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .harness import Table, report

MODES = ("fp32", "bf16", "bf16 storage")
ISAS = {"this CPU": None, "AVX2 only": "AVX2"}

CHILD = r"""
import json, statistics, sys, time
import torch
from smfsr.checkpoint import build_transformer
from smfsr.models.presets import transformer_config
from smfsr.text_encoders import _linears_in_float32

mode, depth, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = build_transformer(transformer_config("sd35-medium", num_layers=depth)).eval().requires_grad_(False)
c = model.config
z = torch.randn(1, c.in_channels, tile, tile)
inputs = [z, torch.randn_like(z), torch.randn(1, 333, c.joint_attention_dim), torch.randn(1, c.pooled_projection_dim),
          torch.ones(1), torch.zeros(1)]
if mode == "bf16":
    model.to(torch.bfloat16)
    inputs = [x.to(torch.bfloat16) for x in inputs]
elif mode == "bf16 storage":
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.to(torch.bfloat16)
    _linears_in_float32(model)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
times = []
with torch.no_grad():
    for i in range(4):
        start = time.perf_counter()
        out = model(*inputs)
        times.append(time.perf_counter() - start)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
from safetensors.torch import save_file
save_file({"out": out.float().contiguous()}, sys.argv[4])
print(json.dumps({"weights": weights, "peak": peak, "seconds": statistics.median(times[1:])}))
"""


def run(mode: str, isa: str | None, depth: int, tile: int, out: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(depth), str(tile), out], capture_output=True,
                            text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{mode}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(prog="python -m bench.bf16_storage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    table = Table(f"bf16 storage + fp32 matmul vs fp32 and bf16: the SD3.5-shaped transformer, {args.depth} of 24 "
                  f"blocks, one {args.tile}x{args.tile} latent tile", ["CPU", "mode", "weights GiB", "peak RSS GiB",
                                                                       "s per forward", "vs fp32: s", "max |diff|"])
    with tempfile.TemporaryDirectory() as tmp:
        for label, isa in ISAS.items():
            rows = {mode: run(mode, isa, args.depth, args.tile, f"{tmp}/{mode}.safetensors") for mode in MODES}
            reference = load_file(f"{tmp}/fp32.safetensors")["out"]
            for mode, r in rows.items():
                diff = (load_file(f"{tmp}/{mode}.safetensors")["out"] - reference).abs().max().item()
                table.add(label, mode, f"{r['weights'] / 2**30:.2f}", f"{r['peak'] / 2**30:.2f}", f"{r['seconds']:.2f}",
                          f"{r['seconds'] / rows['fp32']['seconds']:.2f}x", f"{diff:.3g}")
    table.notes.append(f"`python -m bench.bf16_storage --depth {args.depth} --tile {args.tile}`; each mode in a fresh "
                       "process; AVX2 only: ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN's bf16 kernels limited to AVX2; float32 "
                       "matmuls run in MKL either way)")
    report([table], write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
