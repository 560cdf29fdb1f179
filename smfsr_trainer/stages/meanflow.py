"""Stage ``meanflow``: Interval Splitting Consistency distillation (SplitMeanFlow, method.md 1.3).

For (r, t) pairs from ``meanflow.sample_time_pairs`` and z_t = (1 - t) x + t e:
    r = t (boundary):  target = v_teacher(z_t, t)                     (frozen teacher, optional CFG)
    r < t (ISC):       target = sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)],  s = (1 - lam) t + lam r
    L = || u_theta(z_t, r, t) - target ||^2
Cost per ISC sample: two no-grad student evaluations and one with gradient; no JVP.
"""

from __future__ import annotations

import torch

from smfsr import meanflow


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
        logs["loss_boundary"] = per_sample[boundary].mean().item()
    if (~boundary).any():
        logs["loss_isc"] = per_sample[~boundary].mean().item()
    return per_sample.mean(), logs


def student_from_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """An average-velocity student initialised from a flow teacher: the same weights, with the
    stock time embedding moved under ``time_text_embed_interval`` and a new interval MLP."""
    from smfsr.checkpoint import build_transformer

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
