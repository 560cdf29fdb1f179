"""The EMA of a LoRA run averages the adapters' A and B separately (smfsr_trainer/ema.py): the
exported weight is W + s * EMA(B) EMA(A), not the average of what was trained, W + s * EMA(B A).
How far apart are they? This trains the tiny model as a LoRA with a checkpoint every step, then
replays both averages over the saved trajectory with the trainer's decay:

    python -m bench.ema_lora [--steps 40] [--decay 0.9]

and prints, per adapted layer and overall, ||s EMA(B)EMA(A) - s EMA(BA)|| / ||s EMA(BA)|| and the same
difference relative to the base weight W (what the export changes)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--decay", type=float, default=0.9)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tests.helpers import photo_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = photo_folder(tmp / "photos", 8)
        out = tmp / "run"
        run = subprocess.run([sys.executable, str(REPO / "smfsr_trainer" / "train.py"), "--config",
                              str(REPO / "smfsr_trainer" / "configs" / "tiny.yaml"), "--train-dir", str(photos),
                              "--output-dir", str(out), "--stage", "flow", "--trainable", "lora", "--lora-rank",
                              str(args.rank), "--max-steps", str(args.steps), "--checkpoint-every", "1",
                              "--keep-checkpoints", str(args.steps + 1), "--ema-decay", str(args.decay),
                              "--learning-rate", "0.003"],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        states = [load_file(str(c / "model.safetensors")) for c in sorted((out / "flow").glob("checkpoint-*"))]
    suffix = ".lora_A.default.weight"
    layers = [k[: -len(suffix)] for k in states[0] if k.endswith(suffix)]
    scale = 1.0  # lora_alpha defaults to the rank: s = alpha / r = 1
    ema_a, ema_b, ema_ba = {}, {}, {}
    for i, state in enumerate(states):
        for layer in layers:
            a, b = state[f"{layer}{suffix}"].double(), state[f"{layer}.lora_B.default.weight"].double()
            if i == 0:
                ema_a[layer], ema_b[layer], ema_ba[layer] = a, b, b @ a
            else:
                d = args.decay
                ema_a[layer] = d * ema_a[layer] + (1 - d) * a
                ema_b[layer] = d * ema_b[layer] + (1 - d) * b
                ema_ba[layer] = d * ema_ba[layer] + (1 - d) * (b @ a)
    base = states[-1]
    diff = delta = weight = 0.0
    worst = (0.0, "")
    for layer in layers:
        separate, merged = scale * ema_b[layer] @ ema_a[layer], scale * ema_ba[layer]
        w = base[f"{layer}.base_layer.weight"].double()
        d2, m2 = (separate - merged).pow(2).sum().item(), merged.pow(2).sum().item()
        diff, delta, weight = diff + d2, delta + m2, weight + w.pow(2).sum().item()
        if m2 > 0 and (d2 / m2) ** 0.5 > worst[0]:
            worst = ((d2 / m2) ** 0.5, layer)
    print(f"{len(layers)} adapted layers, {len(states)} steps, decay {args.decay}, rank {args.rank}")
    print(f"||EMA(B)EMA(A) - EMA(BA)|| / ||EMA(BA)||: {(diff / delta) ** 0.5:.2e} overall, "
          f"{worst[0]:.2e} at worst ({worst[1]})")
    print(f"||EMA(B)EMA(A) - EMA(BA)|| / ||W||: {(diff / weight) ** 0.5:.2e}")


if __name__ == "__main__":
    main()
