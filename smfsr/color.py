"""Colour correction of the SR output toward the (bicubic-upsampled) LR image (method.md 3, step 8).

Both methods keep the SR image's detail and take the LR image's colour: AdaIN matches per-channel
mean and standard deviation over the whole image; the wavelet fix swaps the low-frequency band.
Images are (B, 3, H, W) in [0, 1], SR and reference the same size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")


def adain(sr: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(sr - mean_sr) / std_sr * std_ref + mean_ref, per image and channel (eps on the variance)."""
    dims = (-2, -1)
    sr_mean, sr_var = sr.mean(dims, keepdim=True), sr.var(dims, keepdim=True, unbiased=False)
    ref_mean, ref_var = reference.mean(dims, keepdim=True), reference.var(dims, keepdim=True, unbiased=False)
    return (sr - sr_mean) / (sr_var + eps).sqrt() * (ref_var + eps).sqrt() + ref_mean


def _atrous_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 [1,2,1] x [1,2,1] / 16 binomial blur with holes (a trous), replicate-padded."""
    k1 = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = (k1[:, None] * k1[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, kernel, dilation=dilation, groups=x.shape[1])


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with high + low == x: ``levels`` a-trous levels with dilation 2^i."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _atrous_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet(sr: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """SR high frequencies + reference low frequencies."""
    return wavelet_split(sr, levels)[0] + wavelet_split(reference, levels)[1]


def color_fix(sr: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIXES)}")
    if method == "none":
        return sr
    fixed = (adain if method == "adain" else wavelet)(sr.float(), reference.float())
    return fixed.clamp(0, 1).to(sr.dtype)
