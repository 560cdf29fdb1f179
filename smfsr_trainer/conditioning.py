"""What every stage shares: the conditioning of a batch and the networks as plain callables."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Condition:
    """The LR latent and the text a velocity net is conditioned on; indexable like a batch."""

    lr_latent: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor

    def __getitem__(self, index) -> "Condition":
        return Condition(self.lr_latent[index], self.embeds[index], self.pooled[index])

    def __len__(self) -> int:
        return self.lr_latent.shape[0]


def velocity_fn(model: torch.nn.Module):
    """v(z, t, c) of a flow (teacher) transformer."""

    def v(z: torch.Tensor, t: torch.Tensor, c: Condition) -> torch.Tensor:
        return model(z, c.lr_latent, c.embeds, c.pooled, t).float()

    return v


def average_velocity_fn(model: torch.nn.Module):
    """u(z, r, t, c) of a mean-flow (student) transformer."""

    def u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, c: Condition) -> torch.Tensor:
        return model(z, c.lr_latent, c.embeds, c.pooled, t, r).float()

    return u


def guided(v, scale: float, null_embeds: torch.Tensor | None, null_pooled: torch.Tensor | None):
    """Classifier-free guidance on the text: v(c_null) + scale (v(c) - v(c_null)), where c_null keeps
    the LR latent and replaces the prompt by the null prompt. Scale 1 is the plain velocity."""
    if scale == 1.0 or null_embeds is None:
        return v

    def v_cfg(z: torch.Tensor, t: torch.Tensor, c: Condition) -> torch.Tensor:
        n = len(c)
        uncond = Condition(c.lr_latent, null_embeds.expand(n, -1, -1), null_pooled.expand(n, -1))
        v_c, v_u = v(z, t, c), v(z, t, uncond)
        return v_u + scale * (v_c - v_u)

    return v_cfg
