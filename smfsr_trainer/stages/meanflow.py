"""Stage ``meanflow``: Interval Splitting Consistency distillation (SplitMeanFlow, method.md 1.3).

For (r, t) pairs from ``meanflow.sample_time_pairs`` and z_t = (1 - t) x + t e:
    r = t (boundary):  target = v_teacher(z_t, t)                     (frozen teacher, optional CFG)
    r < t (ISC):       target = sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)],  s = (1 - lam) t + lam r
    L = || u_theta(z_t, r, t) - target ||^2
Cost per ISC sample: two no-grad student evaluations and one with gradient; no JVP.
"""

from __future__ import annotations

import torch

from pathlib import Path

from smfsr import meanflow
from smfsr.checkpoint import build_transformer
from smfsr.models.presets import TEACHER_OF

from ..conditioning import average_velocity_fn, guided, velocity_fn
from ..networks import NEW_LAYERS, Networks, encode, load_bundle_of_kind, null_condition, select_trainable, \
    weight_dtype, with_frozen_parts
from .base import Stage


def meanflow_loss(u, u_target, v_teacher, x: torch.Tensor, noise: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                  lam: torch.Tensor, cond) -> tuple[torch.Tensor, dict[str, float]]:
    """``u`` is the student being trained; ``u_target`` the same network used without gradient for
    the ISC target (the unwrapped model under DDP); ``v_teacher`` the frozen teacher."""
    z_t = meanflow.interpolate(x, noise, t)
    boundary = r == t
    target = torch.empty_like(x)
    if boundary.any():
        b = boundary
        target[b] = meanflow.boundary_target(lambda z, tt: v_teacher(z, tt, cond[b]), z_t[b], t[b]).to(x.dtype)
    if (~boundary).any():
        s = ~boundary
        target[s] = meanflow.isc_target(lambda z, rr, tt: u_target(z, rr, tt, cond[s]), z_t[s], r[s], t[s], lam[s]).to(x.dtype)
    pred = u(z_t, r, t, cond)
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    logs = {}
    if boundary.any():
        logs["loss_boundary"] = per_sample[boundary].mean().detach()
    if (~boundary).any():
        logs["loss_isc"] = per_sample[~boundary].mean().detach()
    return per_sample.mean(), logs


def student_from_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """An average-velocity student initialised from a flow teacher: the same weights, with the
    stock time embedding moved under ``time_text_embed_interval`` and a new interval MLP."""
    config = {**dict(teacher.config), "interval_embedding": True}
    student = build_transformer(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("time_text_embed."):
            key = "time_text_embed_interval." + key
        state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    new = [k for k in missing if "interval_embedder" not in k]
    if new or unexpected:
        raise RuntimeError(f"student init from teacher: missing {new}, unexpected {unexpected}")
    return student


def teacher_bundle(config):
    path = config.teacher or str(Path(config.output_dir) / "flow.safetensors")
    return load_bundle_of_kind(path, "a teacher", average_velocity=False, dtype=weight_dtype(config),
                               preset=TEACHER_OF.get(config.preset, config.preset))


class MeanFlowStage(Stage):
    name = "meanflow"
    exported_name = "student"
    default_steps = 1
    summary_keys = ("boundary_fraction", "fixed_interval_fraction")

    def needs_teacher(self, config) -> bool:
        return True

    def build(self, config) -> Networks:
        source = teacher_bundle(config)
        trained = student_from_teacher(source.transformer)
        select_trainable(trained, config, NEW_LAYERS)
        return with_frozen_parts(config, trained, source.transformer, source)

    def batch(self, config, nets, batch, g, device):
        x, cond = encode(nets, batch, device, g)
        n = x.shape[0]
        noise = torch.randn(x.shape, generator=g).to(device)
        r, t = meanflow.sample_time_pairs(n, boundary_fraction=config.boundary_fraction,
                                          fixed_interval_fraction=config.fixed_interval_fraction,
                                          mu=config.time_mu, sigma=config.time_sigma, generator=g)
        lam = torch.rand(n, generator=g)
        return x, noise, r.to(device), t.to(device), lam.to(device), cond, null_condition(nets, cond)

    def losses(self, config, nets, models):
        model = models["model"]
        unwrapped = model.module if hasattr(model, "module") else model  # the ISC target: no DDP hooks

        def loss(b):
            x, noise, r, t, lam, cond, null = b
            teacher_v = guided(velocity_fn(nets.teacher), config.teacher_cfg, null.embeds[:1], null.pooled[:1])
            return meanflow_loss(average_velocity_fn(model), average_velocity_fn(unwrapped), teacher_v, x, noise,
                                 r, t, lam, cond)

        return {"model": loss}
