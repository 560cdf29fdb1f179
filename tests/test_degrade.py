"""Real-ESRGAN second-order degradation: shapes, determinism, and small crops."""

from __future__ import annotations

import torch

from smfsr.degrade import anisotropic_kernel, bicubic_degrade, degrade, sinc_kernel
from tests.helpers import photo_like


def test_kernels_are_normalised_and_symmetric():
    for k in (anisotropic_kernel(2.0, 2.0, 0.0), anisotropic_kernel(3.0, 1.0, 0.7, beta=1.0),
              anisotropic_kernel(1.5, 1.5, 0.0, beta=2.0, plateau=True), sinc_kernel(1.2)):
        assert k.shape == (21, 21) and abs(k.sum().item() - 1) < 1e-5
        assert torch.allclose(k, k.flip(0).flip(1), atol=1e-6)


def test_degradation_is_seeded_and_handles_small_crops():
    for size in (64, 128):
        hr = torch.from_numpy(photo_like(size, size)).permute(2, 0, 1).float()[None] / 255
        for seed in range(40):  # covers strong downscales of small crops (image smaller than the kernel)
            lr = degrade(hr, 4, generator=torch.Generator().manual_seed(seed))
            assert lr.shape == (1, 3, size // 4, size // 4) and 0 <= lr.min() and lr.max() <= 1
        a = degrade(hr, 4, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, degrade(hr, 4, generator=torch.Generator().manual_seed(5)))
        assert bicubic_degrade(hr, 4).shape == (1, 3, size // 4, size // 4)
