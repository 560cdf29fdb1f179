"""Stage ``refine``: the distilled generator sharpened by a GAN on frozen features and kept on the
teacher's image distribution by VSD (method.md 2.5). Three networks train, in this order every step:

  1. generator (the SMFSR student, fully or as a LoRA), N steps from noise, N drawn from
     ``refine_steps`` (one step: x_hat = e - u(e, 0, 1 | LR)), differentiable through every step:
        L_G = w_l2 |x_hat - x|^2 + w_l1 |x_hat - x| + w_perceptual d(decode(x_hat), HR)
              + w_gan L_adv(D(decode(x_hat))) + w_vsd L_vsd(x_hat)
  2. fake score (LoRA adapters on the frozen teacher itself: no second copy of its weights; the real
     score is the same network with the adapters switched off), flow matching on sg(x_hat):
        L_fake = flow-matching loss of v_fake at logit-normal t
  3. discriminator heads on frozen backbone features, real = the HR crop, fake = sg(decode(x_hat)):
        L_D = hinge or non-saturating loss (+ r1_gamma / 2 * R1 on the real images)

Training the generator at every step count it will be run with keeps multi-step sampling at least
as good as one step: the GAN and reconstruction terms see the 2- and 4-step samples too, so the
sub-intervals of the mean-flow field are refined with the whole one (an L2-only refinement of the
[0, 1] jump alone left 2 and 4 steps grainy).

While one network trains the others are frozen for that loss (their parameters get no gradient);
the backbones, the real-score teacher and the VAE never train. The fake score and the
discriminator see the sample the generator produced before its update (as in DMD2), and the
discriminator reuses the backbone features the generator's turn computed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smfsr import meanflow

from ..backbones import FeatureBackbone, load_backbone, parse_depths, perceptual_distance
from ..conditioning import Condition, average_velocity_fn, guided, velocity_fn
from ..discriminator import DiscriminatorHeads, discriminator_loss, generator_adversarial_loss, r1_penalty
from ..grid import grid_loss
from ..lora import LoraSpec, add_lora, adapters_disabled
from ..networks import Networks, encode, load_bundle_of_kind, null_condition, select_trainable, with_frozen_parts
from ..vsd import vsd_loss, vsd_times
from .base import Stage
from .flow import flow_matching_loss
from .meanflow import teacher_bundle


@dataclass
class RefineNets:
    """What the refine stage adds to the generator: ``fake`` and ``heads`` train, the rest is frozen."""

    teacher: torch.nn.Module | None = None  # real score: ``fake`` with its adapters off (None: VSD off)
    fake: torch.nn.Module | None = None  # fake score: the teacher with LoRA adapters (None: VSD off)
    backbone: FeatureBackbone | None = None  # the discriminator's (None: GAN off)
    heads: torch.nn.Module | None = None  # DiscriminatorHeads (None: GAN off)
    disc_depths: list[int] = field(default_factory=list)
    perceptual: FeatureBackbone | None = None  # the perceptual loss's network (may be ``backbone``)

    def named_frozen(self) -> list[tuple[str, torch.nn.Module]]:
        return [(name, m) for name, m in (("teacher", self.teacher), ("disc backbone", self.backbone),
                                          ("perceptual net", self.perceptual)) if m is not None]

    def depths(self, net: FeatureBackbone) -> list[int]:
        """The depths of ``net`` the losses read: the heads' and, for the perceptual net, all."""
        wanted = set(self.disc_depths) if net is self.backbone else set()
        if net is self.perceptual:
            wanted |= set(range(1, net.depth + 1))
        return sorted(wanted)


@dataclass
class RefineBatch:
    """One micro-batch and what the generator's turn leaves for the other two."""

    x: torch.Tensor  # HR latent
    cond: Condition
    null: Condition
    hr: torch.Tensor  # HR image in [0, 1]
    lr: torch.Tensor  # LR image in [0, 1]
    g: torch.Generator
    steps: int = 1  # generator steps this micro-batch
    sample: torch.Tensor | None = None  # sg(x_hat)
    image: torch.Tensor | None = None  # sg(decode(x_hat)), when a feature loss decoded it
    fake_features: dict[int, torch.Tensor] = field(default_factory=dict)  # sg, of the discriminator's backbone
    real_features: dict[int, torch.Tensor] = field(default_factory=dict)


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


def generate(generator: torch.nn.Module, noise: torch.Tensor, cond: Condition, steps: int = 1) -> torch.Tensor:
    """The SMFSR sampler, differentiable: ``steps`` mean-flow steps on the cosine schedule; one step is
    x_hat = z_1 - (1 - 0) u(z_1, r=0, t=1)."""
    u = average_velocity_fn(generator)
    return meanflow.sample_average_velocity(lambda z, r, t: u(z, r, t, cond), noise, steps)


def features(net: FeatureBackbone, images: torch.Tensor, depths: list[int]) -> dict[int, torch.Tensor]:
    return dict(zip(depths, net(images, depths)))


def generator_loss(config, nets: RefineNets, generator: torch.nn.Module, codec, b: RefineBatch
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    noise = torch.randn(b.x.shape, generator=b.g).to(b.x)
    x_hat = generate(generator, noise, b.cond, b.steps)
    b.sample = x_hat.detach()
    loss = x_hat.new_zeros(())
    logs: dict[str, float] = {}
    if config.weight_l2:
        l2 = F.mse_loss(x_hat, b.x)
        loss = loss + config.weight_l2 * l2
        logs["loss_l2"] = l2.detach()
    if config.weight_l1:
        l1 = F.l1_loss(x_hat, b.x)
        loss = loss + config.weight_l1 * l1
        logs["loss_l1"] = l1.detach()
    if config.weight_gan or config.weight_perceptual or config.weight_grid:
        image = codec.decode(x_hat, grad=True)
        b.image = image.detach()
        if config.weight_grid:
            grid = grid_loss(image, b.hr, codec.downscale)
            loss = loss + config.weight_grid * grid
            logs["loss_grid"] = grid.detach()
        fake = {}  # each frozen network runs once on the sample, for every loss that reads it
        for net in {id(n): n for n in (nets.backbone, nets.perceptual) if n is not None}.values():
            fake[id(net)] = features(net, image, nets.depths(net))
            if net is nets.backbone:
                b.fake_features = {d: f.detach() for d, f in fake[id(net)].items()}
        if config.weight_perceptual:
            net = nets.perceptual
            with torch.no_grad():
                real = features(net, b.hr, nets.depths(net))
            if net is nets.backbone:
                b.real_features = real
            depths = nets.depths(net)
            distance = perceptual_distance(net, [fake[id(net)][d] for d in depths], [real[d] for d in depths]).mean()
            loss = loss + config.weight_perceptual * distance
            logs["loss_perceptual"] = distance.detach()
        if config.weight_gan:
            with frozen(nets.heads) as heads:
                maps = [fake[id(nets.backbone)][d] for d in nets.disc_depths]
                adv = generator_adversarial_loss(heads(maps, b.lr), config.gan_loss)
            loss = loss + config.weight_gan * adv
            logs["loss_gan"] = adv.detach()
    if config.weight_vsd:
        t = vsd_times(len(b.cond), config.vsd_t_min, config.vsd_t_max, b.g).to(b.x)
        vsd_noise = torch.randn(b.x.shape, generator=b.g).to(b.x)
        real_score = guided(real_score_fn(nets.teacher), config.vsd_cfg, b.null.embeds[:1], b.null.pooled[:1])
        surrogate, mismatch = vsd_loss(x_hat, real_score, velocity_fn(nets.fake), vsd_noise, t, b.cond)
        loss = loss + config.weight_vsd * surrogate
        logs["vsd_mismatch"] = mismatch.mean().detach()
    logs["loss_generator"] = loss.detach()
    return loss, logs


def real_score_fn(teacher: torch.nn.Module):
    """v_real: the teacher without the fake score's adapters (they live in the same layers)."""
    v = velocity_fn(teacher)

    def real(z, t, cond):
        with adapters_disabled(teacher):
            return v(z, t, cond)

    return real


def fake_score_loss(config, fake: torch.nn.Module, b: RefineBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow matching of the fake score on the generator's detached samples."""
    if b.sample is None:
        raise RuntimeError("the fake score trains on the generator's samples: run generator_loss first")
    n = b.sample.shape[0]
    t = meanflow.logit_normal(n, config.time_mu, config.time_sigma, generator=b.g).to(b.sample)
    noise = torch.randn(b.sample.shape, generator=b.g).to(b.sample)
    loss = flow_matching_loss(velocity_fn(fake), b.sample, noise, t, b.cond, precondition=config.precondition)
    return loss, {"loss_fake_score": loss.detach()}


def discriminator_step_loss(config, nets: RefineNets, heads: torch.nn.Module, codec, b: RefineBatch
                            ) -> tuple[torch.Tensor, dict[str, float]]:
    if b.sample is None:
        raise RuntimeError("the discriminator needs the generator's samples: run generator_loss first")
    depths = nets.disc_depths
    fake = b.fake_features or features(nets.backbone, b.image if b.image is not None else codec.decode(b.sample),
                                       depths)
    if config.r1_gamma > 0:  # R1 differentiates through the backbone: its real features need a graph
        real_images = b.hr.detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # the only attention kernel with a double backward
            real = features(nets.backbone, real_images, depths)
    else:
        real = b.real_features or features(nets.backbone, b.hr, depths)
    real_logits = heads([real[d] for d in depths], b.lr)
    fake_logits = heads([fake[d].detach() for d in depths], b.lr)
    loss = discriminator_loss(real_logits, fake_logits, config.gan_loss)
    logs = {"loss_discriminator": loss.detach(),
            "d_real": torch.stack([lg.mean() for lg in real_logits]).mean().detach(),
            "d_fake": torch.stack([lg.mean() for lg in fake_logits]).mean().detach()}
    if config.r1_gamma > 0:
        r1 = r1_penalty(real_logits, real_images)
        loss = loss + 0.5 * config.r1_gamma * r1
        logs["r1"] = r1.detach()
    return loss, logs


def refine_networks(config, teacher: torch.nn.Module) -> RefineNets:
    """The frozen backbone with new heads (when the GAN term is on), the perceptual network (when
    that term is on; the same object when it is the same file), and the fake score: LoRA adapters
    injected into the teacher (when the VSD term is on), as the one-step SR papers do: a 2.7 B
    teacher is not copied, its frozen weights serve both scores."""
    nets = RefineNets(teacher=teacher)
    if config.weight_gan:
        nets.backbone = load_backbone(config.disc_backbone, config.disc_resolution, what="disc_backbone")
        nets.disc_depths = parse_depths(config.disc_layers, nets.backbone.depth, "disc_layers")
        torch.manual_seed(config.seed)
        channels = [nets.backbone.channels[d - 1] for d in nets.disc_depths]
        nets.heads = DiscriminatorHeads(channels, config.disc_width, config.disc_conditioned).train()
    if config.weight_perceptual:
        path = config.perceptual_net or config.disc_backbone
        same = nets.backbone is not None and Path(path) == Path(config.disc_backbone)
        nets.perceptual = nets.backbone if same else load_backbone(path, config.disc_resolution, what="perceptual_net")
    if config.weight_vsd:
        nets.fake = add_lora(teacher, LoraSpec(config.fake_lora_rank), seed=config.seed).train()
        if config.gradient_checkpointing:  # its flow-matching turn backpropagates through all of it
            nets.fake.enable_gradient_checkpointing()
    return nets


def parse_steps(spec: str) -> list[int]:
    try:
        steps = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"config: refine_steps must be comma-separated step counts, not {spec!r}") from None
    if not steps or min(steps) < 1:
        raise SystemExit(f"config: refine_steps {spec!r}: each must be at least 1")
    return steps


class RefineStage(Stage):
    name = "refine"
    exported_name = "generator"
    default_steps = 1
    summary_keys = ("refine_steps", "weight_l2", "weight_perceptual", "weight_gan", "weight_vsd", "weight_grid")

    def needs_teacher(self, config) -> bool:
        return bool(config.weight_vsd)  # only VSD reads the teacher (the real score and the fake score's start)

    def max_steps(self, config) -> int:
        """Refined at one step only, the rest of its interval field drifted from the distilled one
        (2 and 4 steps come out grainy): its bundle says so, and doors refuse more."""
        return 1 if parse_steps(config.refine_steps) == [1] else 0

    def build(self, config) -> Networks:
        # only VSD reads the teacher (the real score and the fake score's start)
        teacher = teacher_bundle(config).transformer.eval().requires_grad_(False) if config.weight_vsd else None
        path = config.init or str(Path(config.output_dir) / "meanflow.safetensors")
        source = load_bundle_of_kind(path, "a student to refine (init)", average_velocity=True, preset=config.preset)
        trained = source.transformer
        select_trainable(trained, config)
        nets = with_frozen_parts(config, trained, teacher, source)
        nets.extra = refine_networks(config, teacher)
        return nets

    def activation_turns(self, config, nets):
        from ..dry_run import refine_turns

        return refine_turns(config, nets)

    def trained(self, config, nets):
        chosen = [("generator", nets.trained, config.learning_rate)]
        if config.weight_vsd:
            chosen.append(("fake_score", nets.extra.fake, config.fake_learning_rate))
        if config.weight_gan:
            chosen.append(("discriminator", nets.extra.heads, config.disc_learning_rate))
        return chosen

    def batch(self, config, nets, batch, g, device) -> RefineBatch:
        x, cond = encode(nets, batch, device, g)
        choices = parse_steps(config.refine_steps)
        steps = choices[int(torch.randint(len(choices), (), generator=g))] if len(choices) > 1 else choices[0]
        return RefineBatch(x, cond, null_condition(nets, cond), batch["hr"].to(device), batch["lr"].to(device), g,
                           steps)

    def losses(self, config, nets, models):
        r = nets.extra
        return {
            "generator": lambda b: generator_loss(config, r, models["generator"], nets.codec, b),
            "fake_score": lambda b: fake_score_loss(config, models["fake_score"], b),
            "discriminator": lambda b: discriminator_step_loss(config, r, models["discriminator"], nets.codec, b),
        }
