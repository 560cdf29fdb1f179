"""Checkpoints: ``<output_dir>/<stage>/checkpoint-<step>/`` holds the accelerate state (networks,
optimizers, RNG; sharded per process under FSDP), the EMA weights (one safetensors file, gathered)
and the step. Written to a temporary folder and renamed, so an interrupted save never leaves a
checkpoint that looks whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .ema import EMA


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir())


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, micro: int, ema: EMA, keep: int) -> Path:
    final, tmp = out / f"checkpoint-{step:08d}", out / f".checkpoint-{step:08d}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    average = ema.full()  # every process: a gather under FSDP
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in average.items()}, str(tmp / "ema.safetensors"),
                  metadata={"decay": str(ema.decay)})
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "micro": micro}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMA, model: torch.nn.Module) -> tuple[int, int]:
    """Restores the state saved at ``path`` (``model``: the network the EMA follows, as prepared);
    returns (step, micro-batch)."""
    accelerator.load_state(str(path))
    ema.load(load_file(str(path / "ema.safetensors")), model)
    state = json.loads((path / "trainer_state.json").read_text())
    return int(state["step"]), int(state["micro"])
