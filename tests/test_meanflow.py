"""The mean-flow math against a case with a closed form: Gaussian data x ~ N(mu, s^2).

With e ~ N(0, 1) and z_t = (1 - t) x + t e, the marginal of z_t is N(m_t, sigma_t^2) with
m_t = (1 - t) mu and sigma_t^2 = (1 - t)^2 s^2 + t^2. The probability-flow map between times is
affine, z_r = m_r + (sigma_r / sigma_t)(z_t - m_t), so

    v(z, t)    = -mu + (sigma_t' / sigma_t)(z - m_t),   sigma_t' / sigma_t = (t - (1 - t) s^2) / sigma_t^2
    u(z, r, t) = (z - z_r) / (t - r) = -mu + (1 - sigma_r / sigma_t)(z - m_t) / (t - r).
"""

from __future__ import annotations

import math

import pytest
import torch

from smfsr import meanflow

MU, S = 1.7, 0.6


def sigma(t: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    return -MU + (t - (1 - t) * S**2) / sigma(t) ** 2 * (z - (1 - t) * MU)


def exact_u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r = r.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    t = t.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    same = (t - r).abs() < 1e-12
    gap = torch.where(same, torch.ones_like(t), t - r)
    u = -MU + (1 - sigma(r) / sigma(t)) * (z - (1 - t) * MU) / gap
    return torch.where(same, exact_v(z, t.flatten()), u)


def test_exact_u_satisfies_boundary_condition():
    z = torch.randn(1000, 1, dtype=torch.float64)
    t = torch.rand(1000, dtype=torch.float64)
    near = exact_u(z, t - 1e-7, t)  # the limit r -> t
    assert torch.allclose(near, exact_v(z, t), atol=1e-6)
    assert torch.allclose(meanflow.boundary_target(exact_v, z, t), exact_u(z, t, t), atol=0)


def test_exact_u_satisfies_interval_splitting_consistency():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 1, generator=g, dtype=torch.float64)
    a, b = torch.rand(2000, generator=g, dtype=torch.float64), torch.rand(2000, generator=g, dtype=torch.float64)
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    lam = torch.rand(2000, generator=g, dtype=torch.float64)
    target = meanflow.isc_target(exact_u, z, r, t, lam)
    assert torch.allclose(target, exact_u(z, r, t), rtol=0, atol=1e-12)


def test_one_step_sampler_with_exact_u_maps_noise_onto_data():
    noise = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(1))
    x = meanflow.sample_average_velocity(exact_u, noise, steps=1)
    assert abs(x.mean().item() - MU) / MU < 0.01
    assert abs(x.std().item() - S) / S < 0.01


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_multi_step_sampler_with_exact_u_is_exact_too(steps):
    noise = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one = meanflow.sample_average_velocity(exact_u, noise, steps=1)
    many = meanflow.sample_average_velocity(exact_u, noise, steps=steps)
    assert torch.allclose(one, many, atol=1e-9)


def test_euler_on_exact_v_needs_many_steps():
    noise = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    one = meanflow.sample_euler(exact_v, noise, steps=1)
    fifty = meanflow.sample_euler(exact_v, noise, steps=50)
    assert abs(fifty.std().item() - S) / S < 0.05  # Euler's O(1/N) error
    assert abs(one.std().item() - S) / S > 0.2  # a 1-step Euler flow sample is badly off


def test_cosine_schedule_matches_official_values():
    assert meanflow.cosine_schedule(1).tolist() == [1.0, 0.0]
    assert torch.allclose(meanflow.cosine_schedule(2), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(meanflow.cosine_schedule(3), torch.tensor([1.0, 0.75, 0.25, 0.0], dtype=torch.float64))
    c = math.cos(math.pi / 4)
    expected = torch.tensor([1, (1 + c) / 2, 0.5, (1 - c) / 2, 0], dtype=torch.float64)  # [1, .854, .5, .146, 0]
    assert torch.allclose(meanflow.cosine_schedule(4), expected)
    with pytest.raises(ValueError):
        meanflow.cosine_schedule(0)


def test_interpolation_velocity_and_displacement_agree():
    x, e = torch.randn(4, 3), torch.randn(4, 3)
    t, r = torch.rand(4), torch.rand(4) * 0.5
    z_t = meanflow.interpolate(x, e, t)
    v = meanflow.velocity(x, e)
    # for straight conditional paths the average velocity over any interval is v itself
    assert torch.allclose(meanflow.displace(z_t, v, r, t), meanflow.interpolate(x, e, r), atol=1e-6)
    assert torch.allclose(meanflow.x0_from_velocity(z_t, v, t), x, atol=1e-6)


def test_time_pairs_have_requested_mix():
    r, t = meanflow.sample_time_pairs(20_000, boundary_fraction=0.5, fixed_interval_fraction=0.1,
                                      generator=torch.Generator().manual_seed(0))
    assert (r <= t).all() and (r >= 0).all() and (t <= 1).all()
    boundary = (r == t).float().mean().item()
    assert abs(boundary - 0.5) < 0.02
    fixed = torch.zeros_like(r, dtype=torch.bool)
    for a, b in meanflow.FIXED_INTERVALS:
        hits = (r == a) & (t == b)
        assert hits.float().mean().item() > 0.02
        fixed |= hits
    assert abs(fixed.float().mean().item() - 0.1) < 0.01


def test_isc_target_carries_no_gradient():
    w = torch.nn.Parameter(torch.tensor(0.7))

    def u(z, r, t):
        return w * z + (t - r).reshape(-1, 1)

    z = torch.randn(8, 2)
    r, t, lam = torch.zeros(8), torch.ones(8), torch.full((8,), 0.3)
    target = meanflow.isc_target(u, z, r, t, lam)
    assert not target.requires_grad
    loss = ((u(z, r, t) - target) ** 2).mean()
    loss.backward()
    assert w.grad is not None  # the gradient flows through the prediction only
