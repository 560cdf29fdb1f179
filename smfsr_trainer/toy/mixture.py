"""Conditional 2-D mixture: for a condition c in [0, 2 pi), data are two Gaussian modes at
+-2 (cos c, sin c) with std 0.15. A flow teacher and an ISC-distilled mean-flow student are
trained with the very loss functions the image trainer uses (stages.flow / stages.meanflow);
samples are compared with the sliced Wasserstein distance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smfsr import meanflow
from smfsr_trainer.stages import flow_matching_loss, meanflow_loss

STD = 0.15
BOUNDARY, FIXED = 0.5, 0.2  # share of r = t samples and of the fixed [0,1], [0,.5], [.5,1] intervals


def sample_data(c: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sign = torch.where(torch.rand(c.shape[0], generator=g) < 0.5, -1.0, 1.0)[:, None]
    centre = 2.0 * sign * torch.stack([torch.cos(c), torch.sin(c)], -1)
    return centre + STD * torch.randn(c.shape[0], 2, generator=g)


def sample_conditions(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * 2 * math.pi


class TimeMLP(nn.Module):
    """v(z, t, c) or u(z, r, t, c): an MLP on [z, sin/cos c, Fourier(t) (, Fourier(r))]."""

    def __init__(self, interval: bool, width: int = 128):
        super().__init__()
        self.interval = interval
        self.freqs = torch.arange(1, 9).float() * math.pi
        n_in = 2 + 2 + 16 * (2 if interval else 1)
        self.net = nn.Sequential(nn.Linear(n_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def fourier(self, t: torch.Tensor) -> torch.Tensor:
        a = t[:, None] * self.freqs
        return torch.cat([a.sin(), a.cos()], -1)

    def forward(self, z, t, c, r=None):
        parts = [z, torch.stack([c.sin(), c.cos()], -1), self.fourier(t)]
        if self.interval:
            parts.append(self.fourier(r))
        return self.net(torch.cat(parts, -1))


def student_from(teacher: TimeMLP) -> TimeMLP:
    """Same weights; the new r inputs start at zero so the student begins as the teacher."""
    student = TimeMLP(interval=True, width=teacher.net[0].out_features)
    with torch.no_grad():
        w = student.net[0].weight
        w.zero_()
        w[:, : teacher.net[0].in_features] = teacher.net[0].weight
        student.net[0].bias.copy_(teacher.net[0].bias)
        for a, b in zip(list(student.net)[1:], list(teacher.net)[1:]):
            if isinstance(a, nn.Linear):
                a.load_state_dict(b.state_dict())
    return student


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Mean over random directions of the 1-D Wasserstein-1 distance between projections."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(2, projections, generator=g)
    d = d / d.norm(dim=0, keepdim=True)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return (pa - pb).abs().mean().item()


@dataclass
class Result:
    teacher_1: float
    teacher_50: float
    student_1: float
    student_2: float


def train_and_compare(teacher_steps: int = 3000, student_steps: int = 3000, batch: int = 512, seed: int = 0) -> Result:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = TimeMLP(interval=False)
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    v = lambda z, t, c: teacher(z, t, c)  # noqa: E731
    for _ in range(teacher_steps):
        c = sample_conditions(batch, g)
        x = sample_data(c, g)
        loss = flow_matching_loss(v, x, torch.randn(x.shape, generator=g), meanflow.logit_normal(batch, generator=g), c,
                                  precondition=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.requires_grad_(False)

    student = student_from(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    u = lambda z, r, t, c: student(z, t, c, r)  # noqa: E731
    for _ in range(student_steps):
        c = sample_conditions(batch, g)
        x = sample_data(c, g)
        r, t = meanflow.sample_time_pairs(batch, boundary_fraction=BOUNDARY, fixed_interval_fraction=FIXED, generator=g)
        loss, _ = meanflow_loss(u, u, v, x, torch.randn(x.shape, generator=g), r, t, torch.rand(batch, generator=g), c)
        opt.zero_grad()
        loss.backward()
        opt.step()

    n = 4000
    eval_g = torch.Generator().manual_seed(seed + 1)
    c = torch.full((n,), 0.7)  # one condition: its own two-mode distribution
    data = sample_data(c, eval_g)
    noise = torch.randn(n, 2, generator=eval_g)
    with torch.no_grad():
        results = Result(
            teacher_1=sliced_wasserstein(meanflow.sample_euler(lambda z, t: v(z, t, c), noise, 1), data),
            teacher_50=sliced_wasserstein(meanflow.sample_euler(lambda z, t: v(z, t, c), noise, 50), data),
            student_1=sliced_wasserstein(meanflow.sample_average_velocity(lambda z, r, t: u(z, r, t, c), noise, 1), data),
            student_2=sliced_wasserstein(meanflow.sample_average_velocity(lambda z, r, t: u(z, r, t, c), noise, 2), data),
        )
    return results


if __name__ == "__main__":
    print(train_and_compare())
