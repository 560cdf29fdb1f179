"""Stage ``flow``: the LR-conditioned flow-matching teacher (DiT4SR recipe, method.md 2.4).

    t ~ logit-normal(mu, sigma),  z_t = (1 - t) x + t e,  v = v_theta(z_t, t | LR, text)
    precondition (DiT4SR): L = || (z_t - t v) - x ||^2,   else L = || v - (e - x) ||^2
Text is dropped (replaced by the null prompt) with probability ``null_text_prob``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smfsr import meanflow


def flow_matching_loss(v, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond, *, precondition: bool = True
                       ) -> torch.Tensor:
    z_t = meanflow.interpolate(x, noise, t)
    pred = v(z_t, t, cond)
    if precondition:
        return F.mse_loss(meanflow.x0_from_velocity(z_t, pred, t), x)
    return F.mse_loss(pred, meanflow.velocity(x, noise))


def drop_text(cond, null, prob: float, g: torch.Generator):
    """Replace each sample's text by the null prompt with probability ``prob``."""
    if prob <= 0:
        return cond
    drop = (torch.rand(len(cond), generator=g) < prob).to(cond.embeds.device)
    embeds = torch.where(drop[:, None, None], null.embeds.expand_as(cond.embeds), cond.embeds)
    pooled = torch.where(drop[:, None], null.pooled.expand_as(cond.pooled), cond.pooled)
    return type(cond)(cond.lr_latent, embeds, pooled)
