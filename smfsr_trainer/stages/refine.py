"""Stage ``refine``: the one-step generator sharpened by a DINOv3 GAN and kept on the teacher's
image distribution by VSD (method.md 2.5). Three networks train, in this order every step:

  1. generator (the SMFSR student, fully or as a LoRA), one step from noise:  x_hat = e - u(e, 0, 1 | LR)
        L_G = w_l2 |x_hat - x|^2 + w_l1 |x_hat - x| + w_gan L_adv(D(decode(x_hat))) + w_vsd L_vsd(x_hat)
  2. fake score (a LoRA copy of the frozen teacher), flow matching on sg(x_hat):
        L_fake = flow-matching loss of v_fake at logit-normal t
  3. discriminator heads on frozen DINOv3 features, real = the HR crop, fake = sg(decode(x_hat)):
        L_D = hinge or non-saturating loss (+ r1_gamma / 2 * R1 on the real images)

While one network trains the others are frozen for that loss (their parameters get no gradient),
the DINOv3 backbone, the real-score teacher and the VAE never train. The fake score and the
discriminator see the sample the generator produced before its update (as in DMD2).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smfsr import meanflow

from ..conditioning import Condition, average_velocity_fn, guided, velocity_fn
from ..discriminator import DiscriminatorHeads, dino_features, discriminator_loss, generator_adversarial_loss, \
    load_dinov3, parse_layers, r1_penalty
from ..lora import add_lora
from ..networks import Networks, encode, load_bundle_of_kind, null_condition, select_trainable, with_frozen_parts
from ..vsd import vsd_loss, vsd_times
from .base import Stage
from .flow import flow_matching_loss
from .meanflow import teacher_bundle


@dataclass
class RefineNets:
    """What the refine stage adds to the generator: ``fake`` and ``heads`` train, the rest is frozen."""

    teacher: torch.nn.Module  # real score
    fake: torch.nn.Module | None  # fake score: a LoRA copy of the teacher (None: VSD off)
    backbone: torch.nn.Module | None  # DINOv3 (None: GAN off)
    heads: torch.nn.Module | None  # DiscriminatorHeads (None: GAN off)
    layers: list[int]

    def frozen(self) -> list[torch.nn.Module]:
        return [m for m in (self.teacher, self.backbone) if m is not None]


@dataclass
class RefineBatch:
    """One micro-batch and what the generator's turn leaves for the other two."""

    x: torch.Tensor  # HR latent
    cond: Condition
    null: Condition
    hr: torch.Tensor  # HR image in [0, 1]
    lr: torch.Tensor  # LR image in [0, 1]
    g: torch.Generator
    sample: torch.Tensor | None = None  # sg(x_hat)
    image: torch.Tensor | None = None  # sg(decode(x_hat)), when the GAN term decoded it
    logs: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No parameter of ``module`` records a gradient inside the block (inputs still get theirs)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def one_step(generator: torch.nn.Module, noise: torch.Tensor, cond: Condition) -> torch.Tensor:
    """x_hat = z_0 = z_1 - (1 - 0) u(z_1, r=0, t=1): the SMFSR sampler with one step, differentiable."""
    n = noise.shape[0]
    ones, zeros = noise.new_ones(n), noise.new_zeros(n)
    return meanflow.displace(noise, average_velocity_fn(generator)(noise, zeros, ones, cond), zeros, ones)


def discriminate(nets: RefineNets, heads: torch.nn.Module, images: torch.Tensor, lr: torch.Tensor, config
                 ) -> list[torch.Tensor]:
    features = dino_features(nets.backbone, images, nets.layers, config.dino_resolution)
    return heads(features, lr)


def generator_loss(config, nets: RefineNets, generator: torch.nn.Module, codec, b: RefineBatch
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    noise = torch.randn(b.x.shape, generator=b.g).to(b.x)
    x_hat = one_step(generator, noise, b.cond)
    b.sample = x_hat.detach()
    loss = x_hat.new_zeros(())
    logs: dict[str, float] = {}
    if config.weight_l2:
        l2 = F.mse_loss(x_hat, b.x)
        loss = loss + config.weight_l2 * l2
        logs["loss_l2"] = l2.item()
    if config.weight_l1:
        l1 = F.l1_loss(x_hat, b.x)
        loss = loss + config.weight_l1 * l1
        logs["loss_l1"] = l1.item()
    if config.weight_gan:
        image = codec.decode(x_hat, grad=True)
        b.image = image.detach()
        with frozen(nets.heads) as heads:
            adv = generator_adversarial_loss(discriminate(nets, heads, image, b.lr, config), config.gan_loss)
        loss = loss + config.weight_gan * adv
        logs["loss_gan"] = adv.item()
    if config.weight_vsd:
        t = vsd_times(len(b.cond), config.vsd_t_min, config.vsd_t_max, b.g).to(b.x)
        vsd_noise = torch.randn(b.x.shape, generator=b.g).to(b.x)
        real = guided(velocity_fn(nets.teacher), config.vsd_cfg, b.null.embeds[:1], b.null.pooled[:1])
        surrogate, mismatch = vsd_loss(x_hat, real, velocity_fn(nets.fake), vsd_noise, t, b.cond)
        loss = loss + config.weight_vsd * surrogate
        logs["vsd_mismatch"] = mismatch.mean().item()
    logs["loss_generator"] = loss.item()
    return loss, logs


def fake_score_loss(config, fake: torch.nn.Module, b: RefineBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow matching of the fake score on the generator's detached samples."""
    if b.sample is None:
        raise RuntimeError("the fake score trains on the generator's samples: run generator_loss first")
    n = b.sample.shape[0]
    t = meanflow.logit_normal(n, config.time_mu, config.time_sigma, generator=b.g).to(b.sample)
    noise = torch.randn(b.sample.shape, generator=b.g).to(b.sample)
    loss = flow_matching_loss(velocity_fn(fake), b.sample, noise, t, b.cond, precondition=config.precondition)
    return loss, {"loss_fake_score": loss.item()}


def discriminator_step_loss(config, nets: RefineNets, heads: torch.nn.Module, codec, b: RefineBatch
                            ) -> tuple[torch.Tensor, dict[str, float]]:
    if b.sample is None:
        raise RuntimeError("the discriminator needs the generator's samples: run generator_loss first")
    fake = b.image if b.image is not None else codec.decode(b.sample)
    real = b.hr.detach().requires_grad_(config.r1_gamma > 0)
    n = real.shape[0]
    # one pass over real and fake together: one forward per step for DDP. R1 differentiates a
    # gradient: only the math attention kernel has a double backward.
    kernels = sdpa_kernel(SDPBackend.MATH) if config.r1_gamma > 0 else contextlib.nullcontext()
    with kernels:
        logits = discriminate(nets, heads, torch.cat([real, fake.to(real)]), torch.cat([b.lr, b.lr]), config)
    real_logits, fake_logits = [lg[:n] for lg in logits], [lg[n:] for lg in logits]
    loss = discriminator_loss(real_logits, fake_logits, config.gan_loss)
    logs = {"loss_discriminator": loss.item(),
            "d_real": torch.stack([lg.mean() for lg in real_logits]).mean().item(),
            "d_fake": torch.stack([lg.mean() for lg in fake_logits]).mean().item()}
    if config.r1_gamma > 0:
        r1 = r1_penalty(real_logits, real)
        loss = loss + 0.5 * config.r1_gamma * r1
        logs["r1"] = r1.item()
    return loss, logs


def refine_networks(config, teacher: torch.nn.Module) -> RefineNets:
    """The frozen backbone with new heads (when the GAN term is on), and the fake score: a LoRA
    on a teacher copy (when the VSD term is on)."""
    backbone = heads = None
    layers: list[int] = []
    if config.weight_gan:
        backbone = load_dinov3(config.dinov3)
        layers = parse_layers(config.dino_layers, backbone.config.num_hidden_layers)
        torch.manual_seed(config.seed)
        heads = DiscriminatorHeads(backbone.config.hidden_size, len(layers), config.disc_width,
                                   config.disc_conditioned).train()
    fake = add_lora(copy.deepcopy(teacher), config.fake_lora_rank, seed=config.seed).train() if config.weight_vsd else None
    return RefineNets(teacher, fake, backbone, heads, layers)


class RefineStage(Stage):
    name = "refine"

    def build(self, config) -> Networks:
        teacher = teacher_bundle(config).transformer.eval().requires_grad_(False)
        path = config.init or str(Path(config.output_dir) / "meanflow.safetensors")
        source = load_bundle_of_kind(path, "a student to refine (init)", average_velocity=True)
        trained = source.transformer
        if config.generator_lora_rank > 0:
            add_lora(trained, config.generator_lora_rank, seed=config.seed)
        else:
            select_trainable(trained, config.trainable)
        nets = with_frozen_parts(config, trained, teacher, source)
        nets.extra = refine_networks(config, teacher)
        return nets

    def trained(self, config, nets):
        chosen = [("generator", nets.trained, config.learning_rate)]
        if config.weight_vsd:
            chosen.append(("fake_score", nets.extra.fake, config.fake_learning_rate))
        if config.weight_gan:
            chosen.append(("discriminator", nets.extra.heads, config.disc_learning_rate))
        return chosen

    def batch(self, config, nets, batch, g, device) -> RefineBatch:
        x, cond = encode(nets, batch, device)
        return RefineBatch(x, cond, null_condition(nets, cond), batch["hr"].to(device), batch["lr"].to(device), g)

    def losses(self, config, nets, models):
        r = nets.extra
        return {
            "generator": lambda b: generator_loss(config, r, models["generator"], nets.codec, b),
            "fake_score": lambda b: fake_score_loss(config, models["fake_score"], b),
            "discriminator": lambda b: discriminator_step_loss(config, r, models["discriminator"], nets.codec, b),
        }
