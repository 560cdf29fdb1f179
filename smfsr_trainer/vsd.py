"""Variational score distillation (VSD / DMD) under a frozen flow teacher, method.md 2.5.

Scores of the rectified-flow path z_t = (1 - t) x + t e are read through their x0 predictions,
x0(z_t) = z_t - t v(z_t, t). With the real score = the frozen teacher and the fake score = a LoRA
copy of it trained (flow matching) on the generator's detached outputs, the gradient of
KL(p_fake || p_real) with respect to a generated latent x is, up to a positive weight,

    grad_x  ~  x0_fake(z_t) - x0_real(z_t)  =  -t (v_fake - v_real)

Weighting (DMD's normaliser, per sample): divide by mean |x - x0_real(z_t)|, so the step size does not
depend on the noise level or on how far the teacher's denoising lands from the sample. The generator
gets this gradient through the surrogate loss 0.5 || x - sg(x - grad) ||^2, whose gradient is ``grad``.
t is uniform in [t_min, t_max]. The real score can use classifier-free guidance on the text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smfsr import meanflow


def vsd_loss(x: torch.Tensor, v_real, v_fake, noise: torch.Tensor, t: torch.Tensor, cond
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate loss for the generator, per-sample score mismatch mean |x0_fake - x0_real| / weight).

    ``x`` is the generator's latent (with graph); ``v_real``/``v_fake`` are velocity callables
    v(z, t, cond), evaluated without gradient (VSD never backpropagates through a score network).
    """
    with torch.no_grad():
        z_t = meanflow.interpolate(x.detach(), noise, t)
        x0_real = meanflow.x0_from_velocity(z_t, v_real(z_t, t, cond), t)
        x0_fake = meanflow.x0_from_velocity(z_t, v_fake(z_t, t, cond), t)
        weight = (x.detach() - x0_real).abs().flatten(1).mean(1).clamp_min(1e-4)
        grad = (x0_fake - x0_real) / weight.view(-1, *([1] * (x.dim() - 1)))
        grad = torch.nan_to_num(grad)
    surrogate = 0.5 * F.mse_loss(x.float(), (x.detach() - grad).float())  # d/dx = grad / x.numel()
    return surrogate, grad.abs().flatten(1).mean(1)


def vsd_times(n: int, t_min: float, t_max: float, generator: torch.Generator) -> torch.Tensor:
    return t_min + (t_max - t_min) * torch.rand(n, generator=generator)
