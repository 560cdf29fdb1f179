"""The trainer at full width on the CPU: real steps with random weights in the real SD3.5 / DiT4SR
shapes, measured next to the dry run's estimate (``smfsr_trainer/dry_run.py``) for the same settings.

    python -m bench.training_fullsize --out DIR [--cases lora,control,depth] [--steps 3]
    python -m bench.training_fullsize --plan-only    # the dry-run table of sd35-medium.yaml's header

Writes, once, random bundles in the real shapes into DIR (the DiT4SR teacher and an SMFSR student,
bf16, with a random SD3.5-shaped VAE; a DINOv3 ViT-S/16 for the discriminator), then trains each
case in its own process on 64 px crops, batch 1, bf16 autocast, gradient checkpointing: each stage
with ``trainable: lora`` and ``control`` at full depth, and a full fine-tune of the meanflow stage at
depths 2, 4 and 6, extrapolated linearly to the real 24 blocks. Each process reports its RSS while
stepping (sampled every 20 ms from the second step on; loading and the final export are
excluded) and the seconds per step. Prints a table and DIR/training_fullsize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
GB = 1e9
FULL_DEPTH = 24

# Runs the trainer in this process and reports its memory while it steps (see the module doc).
CHILD = r"""
import re, resource, sys, threading, time
sys.argv = sys.argv[1:]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
import torch, diffusers, transformers, accelerate, peft  # the libraries' own memory: the baseline
state = {"on": False, "peak": 0, "baseline": rss(), "last": None}
def sample():
    while True:
        if state["on"]:
            state["peak"] = max(state["peak"], rss())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
out = sys.stdout
class Watch:
    def write(self, text):
        m = re.search(r"step (\d+)/(\d+) .*\(([\d.]+) s/step\)", text)
        if m:
            step, total = int(m.group(1)), int(m.group(2))
            state["on"] = step < total          # from the end of step 1 to the end of the last
            if step == total:
                state["peak"] = max(state["peak"], rss())
                state["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            state["last"] = (step, float(m.group(3)))
        return out.write(text)
    def flush(self):
        out.flush()
sys.stdout = Watch()
import runpy
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.stdout = out
    print("RESULT", {"peak": state["peak"], "maxrss": state.get("maxrss"), "baseline": state["baseline"],
                     "last": state["last"]}, flush=True)
"""


def depth_config(preset: str, depth: int | None) -> dict:
    from smfsr.models.presets import transformer_config

    cfg = transformer_config(preset)
    if depth:
        cfg = {**cfg, "num_layers": depth, "dual_attention_layers": tuple(i for i in cfg["dual_attention_layers"]
                                                                          if i < depth)}
    return cfg


def write_random_bundle(path: Path, preset: str, depth: int | None) -> Path:
    """A bundle in the preset's real shapes: each tensor drawn on its own (std 0.02 weights, unit
    norms, zero biases) in bf16, adopted by a meta-built network, then written."""
    import torch

    from smfsr.checkpoint import Bundle, PipelineDefaults, build_transformer, build_vae, save_bundle
    from smfsr.checkpoint.build import fill_transformer, load_into
    from smfsr.models.presets import vae_config

    if path.exists():
        return path
    cfg = depth_config(preset, depth)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_transformer(cfg).state_dict().items() if k != "pos_embed.pos_embed"}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("weight") and len(shape) >= 2:
            tensors[key] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        elif "norm" in key and key.endswith("weight"):
            tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[key] = torch.zeros(shape, dtype=torch.bfloat16)
    transformer = load_into(lambda: build_transformer(cfg), tensors, fill_transformer).eval()
    vae_cfg = vae_config("sd35")
    torch.manual_seed(0)
    vae = build_vae(vae_cfg).eval()
    c = transformer.config
    bundle = Bundle(transformer=transformer, vae=vae, prompt_embeds=torch.zeros(1, 1, c.joint_attention_dim),
                    prompt_pooled=torch.zeros(1, c.pooled_projection_dim),
                    defaults=PipelineDefaults(vae_scaling_factor=vae_cfg["scaling_factor"],
                                              vae_shift_factor=vae_cfg["shift_factor"]),
                    license="none (random weights)", provenance="bench.training_fullsize")
    save_bundle(path, bundle, dtype=torch.bfloat16)
    return path


def write_dinov3(folder: Path) -> Path:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        DINOv3ViTModel(DINOv3ViTConfig()).save_pretrained(str(folder), safe_serialization=True)
    return folder


def photos(folder: Path) -> Path:
    from PIL import Image

    from tests.helpers import photo_like

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        if not (folder / f"p{i}.png").exists():
            Image.fromarray(photo_like(96, 96, seed=i)).save(folder / f"p{i}.png")
    return folder


def case_args(out: Path, stage: str, trainable: str, depth: int | None, steps: int) -> list[str]:
    suffix = f"-d{depth}" if depth else ""
    teacher = write_random_bundle(out / f"teacher{suffix}.safetensors", "dit4sr-sd35-medium", depth)
    args = ["--config", str(REPO / "smfsr_trainer" / "configs" / "sd35-medium.yaml"), "--stage", stage,
            "--trainable", trainable, "--train-dir", str(photos(out / "photos")), "--val-dir", "none",
            "--output-dir", str(out / "runs" / f"{stage}-{trainable}{suffix}"), "--crop", "64", "--batch-size", "1",
            "--num-workers", "0", "--max-steps", str(steps), "--log-every", "1", "--checkpoint-every", "1000",
            "--degradation", "bicubic", "--vae", "none", "--prompt-embeds", "none", "--null-prompt-embeds", "none",
            "--teacher", str(teacher), "--lora-rank", "32"]
    if stage == "flow":
        args += ["--init", str(teacher)]
    if stage == "refine":
        student = write_random_bundle(out / f"student{suffix}.safetensors", "sd35-medium", depth)
        args += ["--init", str(student), "--disc-backbone", str(write_dinov3(out / "dinov3-vits16")),
                 "--disc-resolution", "64", "--weight-gan", "0.1", "--weight-vsd", "1.0"]
    return args


def estimate(args: list[str]) -> dict:
    from smfsr_trainer.config import load_config
    from smfsr_trainer.dry_run import plan
    from smfsr_trainer.stages import get_stage

    config, _ = load_config(args)
    p = plan(config, get_stage(config.stage), 1, "none")
    totals = p.totals()
    return {"total": totals["total"], "framework": totals["framework"], "params": p.networks[0].total,
            "trainable": p.networks[0].trainable}


def run_case(out: Path, stage: str, trainable: str, depth: int | None, steps: int) -> dict:
    import shutil

    args = case_args(out, stage, trainable, depth, steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "smfsr_trainer" / "train.py"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.time() - started
    shutil.rmtree(out / "runs", ignore_errors=True)  # checkpoints and exports of a full-size run: 10+ GB each
    result = {"stage": stage, "trainable": trainable, "depth": depth or FULL_DEPTH, "wall_s": round(wall, 1),
              "ok": proc.returncode == 0}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if not result["ok"] or line is None:
        result["error"] = (proc.stderr or proc.stdout)[-1500:]
        return result
    measured = eval(line[len("RESULT "):])  # our own child's dict literal
    est = estimate(args)
    result.update(measured_gb=measured["peak"] / GB, baseline_gb=measured["baseline"] / GB,
                  maxrss_gb=(measured["maxrss"] or 0) / GB, s_per_step=measured["last"][1],
                  estimated_gb=est["total"] / GB, params=est["params"], trainable_params=est["trainable"])
    # on the CPU the "framework" term is this process's own baseline (libraries, no CUDA context)
    result["estimated_cpu_gb"] = (est["total"] - est["framework"]) / GB + result["baseline_gb"]
    return result


def extrapolate(rows: list[dict]) -> dict | None:
    """A least-squares line of measured GB against depth, evaluated at the real depth."""
    points = [(r["depth"], r["measured_gb"]) for r in rows if r.get("ok")]
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(d for d, _ in points) / n, sum(m for _, m in points) / n
    slope = sum((d - mx) * (m - my) for d, m in points) / sum((d - mx) ** 2 for d, _ in points)
    return {"gb_per_block": slope, "at_full_depth_gb": my + slope * (FULL_DEPTH - mx)}


def plan_table() -> str:
    """The dry run of sd35-medium.yaml for each stage and trainable set, on 1 GPU and on 8 under FSDP,
    at batch 4 and 1 x 512 px: the table in the config's header."""
    from smfsr_trainer.config import load_config
    from smfsr_trainer.dry_run import plan
    from smfsr_trainer.stages import get_stage

    layouts = [(1, "none", 4), (1, "none", 1), (8, "fsdp", 4), (8, "fsdp", 1)]
    lines = [f"{'stage':<10}{'trainable':<10}" + "".join(f"{f'{n} GPU {s} b{b}':>16}" for n, s, b in layouts)]
    for stage in ("flow", "meanflow", "refine"):
        for trainable in ("all", "control", "lora"):
            cells = []
            for processes, sharding, batch in layouts:
                args = ["--config", str(REPO / "smfsr_trainer" / "configs" / "sd35-medium.yaml"), "--stage", stage,
                        "--trainable", trainable, "--batch-size", str(batch), "--disc-backbone", "dinov3"]
                config, _ = load_config(args)
                cells.append(plan(config, get_stage(stage), processes, sharding).totals()["total"] / GB)
            lines.append(f"{stage:<10}{trainable:<10}" + "".join(f"{c:>13.1f} GB" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.training_fullsize")
    parser.add_argument("--plan-only", action="store_true",
                        help="print only the dry-run table per stage, trainable set and GPU layout (seconds)")
    parser.add_argument("--out", help="folder for the random full-size bundles (about 12 GB) and runs")
    parser.add_argument("--cases", default="lora,control,depth")
    parser.add_argument("--stages", default="flow,meanflow,refine")
    parser.add_argument("--depths", default="2,4,6", help="full fine-tune depths, extrapolated to 24")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.plan_only:
        print(plan_table())
        return
    if not args.out:
        parser.error("--out DIR is needed (random full-size bundles, about 12 GB, are written there)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    rows = []
    for trainable in ("lora", "control"):
        if trainable in cases:
            for stage in args.stages.split(","):
                rows.append(run_case(out, stage, trainable, None, args.steps))
                print(json.dumps(rows[-1]), flush=True)
    depth_rows = []
    if "depth" in cases:
        for depth in (int(d) for d in args.depths.split(",")):
            depth_rows.append(run_case(out, "meanflow", "all", depth, args.steps))
            print(json.dumps(depth_rows[-1]), flush=True)
    line = extrapolate(depth_rows)
    full = None
    if line:
        from smfsr_trainer.config import load_config
        from smfsr_trainer.dry_run import plan
        from smfsr_trainer.stages import get_stage

        full_args = case_args(out, "meanflow", "all", None, args.steps)  # writes nothing new: the teacher exists
        config, _ = load_config(full_args)
        totals = plan(config, get_stage("meanflow"), 1, "none").totals()
        baseline = sum(r["baseline_gb"] for r in depth_rows if r.get("ok")) / len(depth_rows)
        full = {**line, "dry_run_gb": (totals["total"] - totals["framework"]) / GB + baseline}
        full["difference"] = full["at_full_depth_gb"] / full["dry_run_gb"] - 1
    (out / "training_fullsize.json").write_text(json.dumps({"rows": rows + depth_rows, "full_fine_tune": full},
                                                           indent=2))
    print(f"\n{'stage':<10}{'trainable':<10}{'depth':>6}{'trainable':>12}{'s/step':>9}{'RSS stepping':>14}"
          f"{'dry run (CPU)':>15}{'ratio':>7}")
    for r in rows + depth_rows:
        if not r.get("ok"):
            print(f"{r['stage']:<10}{r['trainable']:<10}{r['depth']:>6}  FAILED: {r['error'][-300:]}")
            continue
        print(f"{r['stage']:<10}{r['trainable']:<10}{r['depth']:>6}{r['trainable_params'] / 1e9:>10.3f} B"
              f"{r['s_per_step']:>9.1f}{r['measured_gb']:>11.2f} GB{r['estimated_cpu_gb']:>12.2f} GB"
              f"{r['measured_gb'] / r['estimated_cpu_gb']:>7.2f}")
    if full:
        print(f"\nfull fine-tune, meanflow, 24 blocks: extrapolated {full['at_full_depth_gb']:.1f} GB "
              f"({full['gb_per_block']:.2f} GB per block) vs dry run {full['dry_run_gb']:.1f} GB "
              f"({100 * full['difference']:+.0f} %)")


if __name__ == "__main__":
    main()
