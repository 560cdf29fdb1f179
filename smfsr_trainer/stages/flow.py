"""Stage ``flow``: the LR-conditioned flow-matching teacher (DiT4SR recipe, method.md 2.4).

    t ~ logit-normal(mu, sigma),  z_t = (1 - t) x + t e,  v = v_theta(z_t, t | LR, text)
    precondition (DiT4SR): L = || (z_t - t v) - x ||^2,   else L = || v - (e - x) ||^2
Text is dropped (replaced by the null prompt) with probability ``null_text_prob``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smfsr import meanflow
from smfsr.checkpoint import build_transformer
from smfsr.models.presets import TEACHER_OF, transformer_config

from ..conditioning import velocity_fn
from ..networks import Networks, encode, load_bundle_of_kind, null_condition, select_trainable, with_frozen_parts
from .base import Stage


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


class FlowStage(Stage):
    name = "flow"
    exported_name = "flow transformer"
    default_steps = 25  # a flow teacher: Euler steps

    def build(self, config) -> Networks:
        source = None
        preset = TEACHER_OF.get(config.preset, config.preset)
        if config.init:
            source = load_bundle_of_kind(config.init, "init (a flow teacher to go on training)", average_velocity=False,
                                         preset=preset)
            trained = source.transformer
        else:
            torch.manual_seed(config.seed)
            trained = build_transformer(transformer_config(preset))
        select_trainable(trained, config)
        return with_frozen_parts(config, trained, None, source)

    def batch(self, config, nets, batch, g, device):
        x, cond = encode(nets, batch, device, g)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = meanflow.logit_normal(x.shape[0], config.time_mu, config.time_sigma, generator=g).to(device)
        return x, noise, t, drop_text(cond, null_condition(nets, cond), config.null_text_prob, g)

    def losses(self, config, nets, models):
        def loss(b):
            x, noise, t, cond = b
            return flow_matching_loss(velocity_fn(models["model"]), x, noise, t, cond,
                                      precondition=config.precondition), {}

        return {"model": loss}
