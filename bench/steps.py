"""One SMFSR mean-flow step vs a 40-step flow-teacher loop on the same network (issue 2)."""

from __future__ import annotations

import torch

from smfsr.checkpoint.random import random_bundle
from smfsr.models.presets import TEACHER_OF
from smfsr.options import UpscaleOptions
from smfsr.pipeline import LRLatent, SMFSRUpscaler

from .harness import Table, median_time


def run(mode: str = "default") -> Table:
    table = Table("Sampling: one SMFSR step vs a 40-step teacher (same network, latent tiles as in the pipeline)",
                  ["network", "latent", "SMFSR 1 step", "teacher 40 steps", "ratio"])
    sizes = [(32, 32)] if mode == "quick" else [(32, 32), (64, 64)]
    for preset in ("tiny", "small"):
        student, teacher = random_bundle(preset), random_bundle(TEACHER_OF[preset])
        s_up, t_up = SMFSRUpscaler(student), SMFSRUpscaler(teacher)
        for h, w in sizes:
            c = student.transformer.config.in_channels
            lr = LRLatent(torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)))
            one = median_time(lambda: s_up.sample(lr, UpscaleOptions(steps=1, tile_size=64, tile_overlap=24)))
            forty = median_time(lambda: t_up.sample(lr, UpscaleOptions(steps=40, tile_size=64, tile_overlap=24)),
                                repeats=1)
            params = sum(p.numel() for p in student.transformer.parameters()) / 1e6
            table.add(f"{preset} ({params:.1f} M)", f"{h}x{w}", f"{one * 1e3:.1f} ms", f"{forty * 1e3:.0f} ms", f"{forty / one:.1f}x")
    table.notes.append("Times are the sampler only (no VAE); medians of 3 runs for 1 step, 1 run for 40 steps.")
    return table
