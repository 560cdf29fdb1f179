"""The 4-px grid: detail that repeats on the codec's cell (a x4 space-to-depth cell holds a 4x4
pixel block in its channels, so a network can give each of the 16 pixel phases its own bias). The
one measure (``grid_strength``, bench/eval_model.py) and the refine stage's penalty on it
(``grid_loss``, config ``weight_grid``) share the phase means below."""

from __future__ import annotations

import torch


def highpass_luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W): luma minus its Gaussian blur (sigma 2)."""
    from kornia.filters import gaussian_blur2d

    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    return luma - gaussian_blur2d(luma, (13, 13), (2.0, 2.0), border_type="reflect")


def phase_means(residual: torch.Tensor, period: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, period, period): the mean over every position of each pixel phase."""
    h, w = (residual.shape[-2] // period) * period, (residual.shape[-1] // period) * period
    return residual[..., :h, :w].reshape(len(residual), h // period, period, w // period, period).mean((1, 3))


def grid_strength(x: torch.Tensor, period: int = 4) -> torch.Tensor:
    """Per image, the energy of the high-pass residual's phase means over the residual's total
    energy. A photo's is about 0.0002; a visible grid is 0.01 and above."""
    residual = highpass_luma(x.double())
    h, w = (residual.shape[-2] // period) * period, (residual.shape[-1] // period) * period
    energy = residual[..., :h, :w].pow(2).mean((1, 2, 3)).clamp_min(1e-20)
    return (phase_means(residual, period).pow(2).mean((1, 2)) / energy).float()


def grid_loss(image: torch.Tensor, target: torch.Tensor, period: int) -> torch.Tensor:
    """The energy of the phase means of the error's high-pass residual: zero when the error does
    not repeat on the ``period``-px grid, whatever the sharpness (a sharper image is not penalised,
    a phase pattern is)."""
    return phase_means(highpass_luma(image.float() - target.float()), period).pow(2).mean()
