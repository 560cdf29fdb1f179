"""Real-ESRGAN second-order degradation: realistic LR images from HR ones, on the fly (kornia/torch).

Two rounds of blur -> resize -> noise -> JPEG, then a final resize to HR / scale, with a sinc
(ringing) filter placed before or after the last JPEG. Default parameters are DiT4SR's pair
generation, which SMFSR follows (method.md 2.6). All randomness comes from the caller's generator,
so a seed reproduces a degradation exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNEL_SIZE = 21
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class DegradationParams:
    # blur kernels: iso, aniso, generalized iso, generalized aniso, plateau iso, plateau aniso
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    # per order: (up, down, keep) probabilities and ranges
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    no_degradation_prob: float = 0.01


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _chance(g: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=g).item() < p


def _grid(size: int = KERNEL_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.meshgrid(r, r, indexing="ij")


def anisotropic_kernel(sigma_x: float, sigma_y: float, theta: float, beta: float = 2.0, plateau: bool = False) -> torch.Tensor:
    """Rotated (generalised) Gaussian or plateau kernel, normalised to sum 1.

    Gaussian-like: exp(-(d^T S^-1 d)^(beta/2));  plateau: 1 / (1 + (d^T S^-1 d)^(beta / 2))."""
    y, x = _grid()
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    q = (u / sigma_x) ** 2 + (v / sigma_y) ** 2
    k = 1 / (1 + q ** (beta / 2)) if plateau else torch.exp(-0.5 * q ** (beta / 2))
    return (k / k.sum()).float()


def sinc_kernel(cutoff: float, size: int = KERNEL_SIZE) -> torch.Tensor:
    """Circular low-pass (ringing/overshoot) kernel: cutoff * J1(cutoff r) / (2 pi r)."""
    y, x = _grid(size)
    r = torch.sqrt(x * x + y * y)
    k = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r.clamp_min(1e-12))
    k[r == 0] = cutoff**2 / (4 * math.pi)
    return (k / k.sum()).float()


def random_blur_kernel(g: torch.Generator, p: DegradationParams, sigma: tuple[float, float]) -> torch.Tensor:
    if _chance(g, p.sinc_prob):
        size = KERNEL_SIZE
        return sinc_kernel(_uniform(g, math.pi / 3, math.pi) if size < 13 else _uniform(g, math.pi / 5, math.pi))
    kind = torch.multinomial(torch.tensor(p.kernel_probs), 1, generator=g).item()
    sx = _uniform(g, *sigma)
    iso = kind % 2 == 0
    sy = sx if iso else _uniform(g, *sigma)
    theta = 0.0 if iso else _uniform(g, -math.pi, math.pi)
    if kind < 2:
        return anisotropic_kernel(sx, sy, theta)
    if kind < 4:
        return anisotropic_kernel(sx, sy, theta, beta=_uniform(g, *p.betag_range))
    return anisotropic_kernel(sx, sy, theta, beta=_uniform(g, *p.betap_range), plateau=True)


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    pad = kernel.shape[-1] // 2
    # reflect, as Real-ESRGAN does; an image smaller than the kernel (a small crop after a strong
    # downscale) cannot be reflected that far, so its border is replicated instead
    mode = "reflect" if pad < min(image.shape[-2:]) else "replicate"
    x = F.pad(image, (pad,) * 4, mode=mode)
    weight = kernel.to(image)[None, None].expand(image.shape[1], 1, -1, -1)
    return F.conv2d(x, weight, groups=image.shape[1])


def random_resize(image: torch.Tensor, g: torch.Generator, probs: tuple, scale_range: tuple) -> torch.Tensor:
    kind = torch.multinomial(torch.tensor(probs), 1, generator=g).item()
    factor = _uniform(g, 1.0, scale_range[1]) if kind == 0 else _uniform(g, scale_range[0], 1.0) if kind == 1 else 1.0
    mode = RESIZE_MODES[torch.randint(3, (), generator=g).item()]
    h, w = image.shape[-2:]
    size = (max(4, round(h * factor)), max(4, round(w * factor)))
    return resize_with(image, size, mode)


def resize_with(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "area":
        return F.interpolate(image, size=size, mode="area")
    return F.interpolate(image, size=size, mode=mode, align_corners=False).clamp(0, 1)


def add_noise(image: torch.Tensor, g: torch.Generator, p: DegradationParams, sigma: tuple, poisson: tuple) -> torch.Tensor:
    gray = _chance(g, p.gray_noise_prob)
    shape = (image.shape[0], 1 if gray else image.shape[1], *image.shape[-2:])
    if _chance(g, p.gaussian_noise_prob):
        noise = torch.randn(shape, generator=g) * (_uniform(g, *sigma) / 255)
    else:
        # Poisson (shot) noise at 8-bit levels, scaled: Real-ESRGAN's random_add_poisson_noise
        levels = 256.0
        base = image.mean(1, keepdim=True) if gray else image
        noise = (torch.poisson(base.clamp(0, 1) * levels, generator=g) / levels - base) * _uniform(g, *poisson)
    return (image + noise.to(image)).clamp(0, 1)


def jpeg(image: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG compress/decompress (kornia's differentiable codec); pads to whole 16x16 blocks."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(image, (0, pw, 0, ph), mode="replicate") if ph or pw else image
    from kornia.enhance import jpeg_codec_differentiable  # kornia comes with the trainer extra, not the core

    out = jpeg_codec_differentiable(x, torch.full((image.shape[0],), float(quality)))
    return out[..., :h, :w].clamp(0, 1)


def degrade(hr: torch.Tensor, scale: int = 4, *, generator: torch.Generator,
            params: DegradationParams = DegradationParams()) -> torch.Tensor:
    """(1, 3, H, W) HR in [0, 1] -> (1, 3, H/scale, W/scale) LR, second-order degradation."""
    p, g = params, generator
    h, w = hr.shape[-2:]
    out_size = (h // scale, w // scale)
    if _chance(g, p.no_degradation_prob):
        return resize_with(hr, out_size, "bicubic")
    x = hr
    # first order
    x = filter2d(x, random_blur_kernel(g, p, p.blur_sigma))
    x = random_resize(x, g, p.resize_prob, p.resize_range)
    x = add_noise(x, g, p, p.noise_range, p.poisson_scale_range)
    x = jpeg(x, _uniform(g, *p.jpeg_range))
    # second order
    if _chance(g, p.second_blur_prob):
        x = filter2d(x, random_blur_kernel(g, p, p.blur_sigma2))
    x = random_resize(x, g, p.resize_prob2, p.resize_range2)
    x = add_noise(x, g, p, p.noise_range2, p.poisson_scale_range2)
    final_sinc = sinc_kernel(_uniform(g, math.pi / 3, math.pi)) if _chance(g, p.final_sinc_prob) else None
    mode = RESIZE_MODES[torch.randint(3, (), generator=g).item()]
    quality = _uniform(g, *p.jpeg_range2)
    if _chance(g, 0.5):  # resize + sinc, then JPEG
        x = resize_with(x, out_size, mode)
        x = filter2d(x, final_sinc) if final_sinc is not None else x
        x = jpeg(x, quality)
    else:  # JPEG, then resize + sinc
        x = jpeg(x, quality)
        x = resize_with(x, out_size, mode)
        x = filter2d(x, final_sinc) if final_sinc is not None else x
    return x.clamp(0, 1)


def bicubic_degrade(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Plain antialiased bicubic downsampling (the classic SR benchmark degradation)."""
    h, w = hr.shape[-2:]
    return F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
