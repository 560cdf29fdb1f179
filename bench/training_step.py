"""One mean-flow training step: Interval Splitting Consistency (ours) vs MeanFlow's JVP objective
on the same network (issue 4). SplitMeanFlow's argument is that ISC needs no Jacobian-vector
product; this measures what that saves. Each variant runs in its own process.

    ISC:      target = sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)]       (2 no-grad forwards)
    MeanFlow: target = sg[v - (t - r) du/dt],  du/dt = JVP of u along (v, 0, 1)  (torch.func.jvp)
"""

from __future__ import annotations

import time

from .harness import Table, in_child, mib, peak_rss_bytes, rss_bytes

STEPS = 5


def _step(objective: str, preset: str, latent: int, batch: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from smfsr import meanflow
    from smfsr.checkpoint import build_transformer
    from smfsr.models.presets import TEACHER_OF, transformer_config
    from smfsr_trainer.stages import Condition, average_velocity_fn, meanflow_loss, velocity_fn

    torch.manual_seed(0)
    student = build_transformer(transformer_config(preset)).train()
    teacher = build_transformer(transformer_config(TEACHER_OF[preset])).eval().requires_grad_(False)
    c = student.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, latent, latent, generator=g)
    cond = Condition(torch.randn(x.shape, generator=g), torch.randn(batch, 3, c.joint_attention_dim, generator=g),
                     torch.randn(batch, c.pooled_projection_dim, generator=g))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    u, v = average_velocity_fn(student), velocity_fn(teacher)

    def isc_step():
        r, t = meanflow.sample_time_pairs(batch, boundary_fraction=0.0, fixed_interval_fraction=0.0, generator=g)
        loss, _ = meanflow_loss(u, u, v, x, torch.randn(x.shape, generator=g), r, t, torch.rand(batch, generator=g), cond)
        return loss

    def jvp_step():
        r, t = meanflow.sample_time_pairs(batch, boundary_fraction=0.0, fixed_interval_fraction=0.0, generator=g)
        noise = torch.randn(x.shape, generator=g)
        z_t = meanflow.interpolate(x, noise, t)
        with torch.no_grad():
            v_t = v(z_t, t, cond)
        with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD runs through the math attention kernel
            pred, dudt = torch.func.jvp(lambda z, rr, tt: u(z, rr, tt, cond), (z_t, r, t),
                                        (v_t, torch.zeros_like(r), torch.ones_like(t)))
        target = (v_t - (t - r).reshape(-1, 1, 1, 1) * dudt).detach()
        return F.mse_loss(pred, target)

    step = isc_step if objective == "isc" else jvp_step
    base = rss_bytes()
    times = []
    for i in range(STEPS + 1):
        start = time.perf_counter()
        loss = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak": peak_rss_bytes() - base}


def run(mode: str = "default") -> Table:
    table = Table("Training step: ISC (SplitMeanFlow) vs JVP (MeanFlow), same student and teacher",
                  ["network", "latent x batch", "ISC step", "JVP step", "JVP / ISC time", "ISC peak", "JVP peak",
                   "JVP / ISC memory"])
    cases = [("tiny", 16, 4)] if mode == "quick" else [("tiny", 16, 4), ("small", 32, 4)]
    for preset, latent, batch in cases:
        isc = in_child(_step, "isc", preset, latent, batch)
        jvp = in_child(_step, "jvp", preset, latent, batch)
        if "error" in isc or "error" in jvp:
            table.add(preset, f"{latent}^2 x {batch}", isc.get("error", ""), jvp.get("error", ""), "", "", "", "")
            continue
        table.add(preset, f"{latent}^2 x {batch}", f"{isc['seconds'] * 1e3:.0f} ms", f"{jvp['seconds'] * 1e3:.0f} ms",
                  f"{jvp['seconds'] / isc['seconds']:.2f}x", mib(isc["peak"]), mib(jvp["peak"]),
                  f"{jvp['peak'] / max(isc['peak'], 1):.2f}x")
    table.notes.append(f"Median of {STEPS} steps after one warm-up; all samples r < t (no boundary samples); "
                       "peak = process peak RSS over the baseline after building the networks.")
    return table
