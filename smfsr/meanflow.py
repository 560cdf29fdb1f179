"""The mean-flow math of SMFSR, one short function per equation.

Convention (design.md, method.md section 1.1): t = 1 is noise, t = 0 is data.

    path                 z_t = (1 - t) x + t e
    velocity             v   = e - x                          (dz_t/dt)
    average velocity     u(z_t, r, t) = 1/(t - r) * int_r^t v(z_tau, tau) dtau
    displacement         z_r = z_t - (t - r) u(z_t, r, t)
    boundary condition   u(z_t, t, t) = v(z_t, t)
    ISC (r <= s <= t)    (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t)

Networks are plain callables: ``u(z, r, t)`` for an average-velocity model and ``v(z, t)`` for
an instantaneous-velocity (flow) model, with ``r`` and ``t`` float tensors of shape (B,) in [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable

import torch

AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The three intervals SplitMeanFlow trains explicitly so that the exact 1-step ([0, 1]) and
# 2-step ([0, .5], [.5, 1]) sampling intervals are seen in training (method.md 1.3).
FIXED_INTERVALS = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0))


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) time tensor against a (B, ...) sample tensor."""
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x + t e."""
    t = _per_sample(t, x)
    return (1 - t) * x + t * noise


def velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The conditional velocity v = dz_t/dt = e - x."""
    return noise - x


def displace(z_t: torch.Tensor, u: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_r = z_t - (t - r) u(z_t, r, t)."""
    return z_t - _per_sample(t - r, z_t) * u


def x0_from_velocity(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x = z_t - t v: the data estimate a velocity implies (DiT4SR's x0-preconditioning, method.md 2.4)."""
    return z_t - _per_sample(t, z_t) * v


def cosine_schedule(steps: int) -> torch.Tensor:
    """The official N-step schedule: t_i = (1 - cos(pi i / N)) / 2 for i = 0..N, flipped to run 1 -> 0.

    N=1: [1, 0];  N=2: [1, .5, 0];  N=3: [1, .75, .25, 0];  N=4: [1, .854, .5, .146, 0].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    i = torch.arange(steps + 1, dtype=torch.float64)
    return ((1 - torch.cos(math.pi * i / steps)) / 2).flip(0)


def flow_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Uniform times 1 -> 0 for a flow teacher, with SD3's resolution shift t' = s t / (1 + (s - 1) t)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def sample_average_velocity(
    u: AverageVelocity,
    noise: torch.Tensor,
    steps: int = 1,
    schedule: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean-flow sampling from noise (method.md 1.4): z <- z - (t_i - t_{i+1}) u(z, t_{i+1}, t_i).

    One step is x = e - u(e, 0, 1).
    """
    times = cosine_schedule(steps) if schedule is None else schedule
    z = noise
    batch = noise.shape[0]
    for t_i, r_i in zip(times[:-1].tolist(), times[1:].tolist()):
        t = torch.full((batch,), t_i, device=noise.device)
        r = torch.full((batch,), r_i, device=noise.device)
        z = displace(z, u(z, r, t), r, t)
    return z


def sample_euler(v: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
    """Euler integration of the flow ODE dz/dt = v(z, t) from t = 1 to t = 0 (the teacher's sampler)."""
    times = flow_schedule(steps, shift)
    z = noise
    batch = noise.shape[0]
    for t_i, r_i in zip(times[:-1].tolist(), times[1:].tolist()):
        t = torch.full((batch,), t_i, device=noise.device)
        z = z - (t_i - r_i) * v(z, t)
    return z


def logit_normal(
    n: int, mu: float = 0.0, sigma: float = 1.0, *, generator: torch.Generator | None = None,
    t_min: float = 1e-4, t_max: float = 1 - 1e-4,
) -> torch.Tensor:
    """t = sigmoid(mu + sigma * N(0, 1)), clamped away from the ends (SD3 / DiT4SR time density)."""
    t = torch.sigmoid(mu + sigma * torch.randn(n, generator=generator, dtype=torch.float64))
    return t.clamp(t_min, t_max).float()


def sample_time_pairs(
    n: int,
    *,
    boundary_fraction: float = 0.5,
    fixed_interval_fraction: float = 0.1,
    mu: float = 0.0,
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (r, t) pairs with r <= t for SplitMeanFlow training, per sample (method.md 1.3).

    - with probability ``boundary_fraction``: r = t, t logit-normal (the boundary, trained on v);
    - with probability ``fixed_interval_fraction``: one of [0, 1], [0, .5], [.5, 1];
    - otherwise: two logit-normal draws, r = min, t = max.
    """
    if not 0 <= boundary_fraction + fixed_interval_fraction <= 1:
        raise ValueError("boundary_fraction + fixed_interval_fraction must lie in [0, 1]")
    a = logit_normal(n, mu, sigma, generator=generator)
    b = logit_normal(n, mu, sigma, generator=generator)
    r, t = torch.minimum(a, b), torch.maximum(a, b)

    branch = torch.rand(n, generator=generator)
    boundary = branch < boundary_fraction
    fixed = (branch >= boundary_fraction) & (branch < boundary_fraction + fixed_interval_fraction)
    r = torch.where(boundary, t, r)

    intervals = torch.tensor(FIXED_INTERVALS)
    pick = intervals[torch.randint(len(FIXED_INTERVALS), (n,), generator=generator)]
    r = torch.where(fixed, pick[:, 0], r)
    t = torch.where(fixed, pick[:, 1], t)
    return r, t


@torch.no_grad()
def boundary_target(v: Velocity, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Target for r = t samples: u(z_t, t, t) = v(z_t, t), the frozen teacher's velocity."""
    return v(z_t, t)


@torch.no_grad()
def isc_target(
    u: AverageVelocity, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Interval Splitting Consistency target (SplitMeanFlow Algorithm 1), with stop-gradient.

    With s = (1 - lam) t + lam r, so that t - s = lam (t - r) and s - r = (1 - lam)(t - r):
        u(z_t, r, t) = (1 - lam) u(z_s, r, s) + lam u(z_t, s, t),   z_s = z_t - (t - s) u(z_t, s, t).
    Both student evaluations run without gradient: the loss trains only u(z_t, r, t).
    """
    s = (1 - lam) * t + lam * r
    u_st = u(z_t, s, t)
    z_s = displace(z_t, u_st, s, t)
    u_rs = u(z_s, r, s)
    return _per_sample(1 - lam, z_t) * u_rs + _per_sample(lam, z_t) * u_st
