"""The refinement stage's discriminator: small trainable heads on a frozen backbone's features at
several depths (``backbones.py``), each turning its depth's feature map into a map of real/fake
logits, and the GAN losses.

    logits_l = head_l(features_l [+ proj_l(LR image)])       one head per depth l in ``disc_layers``

Why frozen features: the generator is pushed towards textures that look like the right *kind* of
thing (DINOv3's semantic features, method.md 2.5; VGG's texture statistics) rather than towards
pixel statistics. The backbone never trains; the generator's images reach it with their gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureHead(nn.Module):
    """A feature map (+ the LR image at its grid) -> one logit per position."""

    def __init__(self, dim: int, width: int, conditioned: bool):
        super().__init__()
        self.inp = nn.Conv2d(dim, width, 1)
        self.lr = nn.Conv2d(3, width, 1) if conditioned else None
        self.body = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, 1, 1))

    def forward(self, features: torch.Tensor, lr: torch.Tensor | None) -> torch.Tensor:
        h = self.inp(features)
        if self.lr is not None:
            h = h + self.lr(F.interpolate(lr * 2 - 1, size=features.shape[-2:], mode="area"))
        return self.body(h)


class DiscriminatorHeads(nn.Module):
    """The trainable part of the discriminator: one head per backbone depth (``channels`` of each)."""

    def __init__(self, channels: list[int], width: int = 128, conditioned: bool = True):
        super().__init__()
        self.conditioned = conditioned
        self.heads = nn.ModuleList(FeatureHead(c, width, conditioned) for c in channels)

    def forward(self, features: list[torch.Tensor], lr: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [head(f, lr if self.conditioned else None) for head, f in zip(self.heads, features)]


# --- losses: each averaged over the layers' logit maps ------------------------------------------


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":  # E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]
        parts = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    else:  # non-saturating: E[softplus(-D(x))] + E[softplus(D(G(z)))]
        parts = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)]
    return torch.stack(parts).mean()


def generator_adversarial_loss(fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":  # -E[D(G(z))]
        parts = [-f.mean() for f in fake]
    else:  # E[softplus(-D(G(z)))]
        parts = [F.softplus(-f).mean() for f in fake]
    return torch.stack(parts).mean()


def r1_penalty(logits: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """R1 = E ||grad_x D(x)||^2 on real images (``images`` must require grad)."""
    total = torch.stack([lg.sum() for lg in logits]).sum()
    (grad,) = torch.autograd.grad(total, images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
