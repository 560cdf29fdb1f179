"""SMFSR trainer. ``accelerate launch smfsr_trainer/train.py --config CONFIG [--<setting> VALUE ...]``

One loop for every stage; a stage is the loss it adds:
  vae       a small AutoencoderKL, for models trained from scratch            -> vae_model/ (diffusers)
  flow      an LR-conditioned flow-matching teacher (DiT4SR recipe)           -> flow.safetensors
  meanflow  the SMFSR student, distilled from the frozen teacher with ISC     -> meanflow.safetensors
  refine    the student sharpened by a DINOv3 GAN and VSD under the teacher   -> refine.safetensors
Checkpoints (``<output_dir>/<stage>/checkpoint-<step>/``, written atomically) hold the accelerate
state plus the EMA weights (safetensors) and the step; ``--resume`` continues from the stage's latest. Every stage
exports its EMA weights as a bundle that ``smfsr upscale`` and the doors load.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script by accelerate launch
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from smfsr import meanflow  # noqa: E402
from smfsr.checkpoint import (  # noqa: E402
    Bundle, PipelineDefaults, build_transformer, build_vae, import_vae, load_model, read_header, read_prompt_file,
    save_bundle,
)
from smfsr.codec import LatentCodec  # noqa: E402
from smfsr.models.presets import TEACHER_OF, transformer_config, vae_config  # noqa: E402
from smfsr_trainer.config import TrainConfig, dump, load_config  # noqa: E402
from smfsr_trainer.data import EpochSampler, SRPairs  # noqa: E402
from smfsr_trainer.discriminator import DiscriminatorHeads, load_dinov3, parse_layers  # noqa: E402
from smfsr_trainer.ema import EMA  # noqa: E402
from smfsr_trainer.lora import add_lora, has_lora, merged_state_dict  # noqa: E402
from smfsr_trainer.stages import (  # noqa: E402
    Condition, average_velocity_fn, drop_text, flow_matching_loss, guided, latent_statistics, meanflow_loss,
    student_from_teacher, vae_loss, velocity_fn,
)
from smfsr_trainer.stages.refine import (  # noqa: E402
    RefineBatch, RefineNets, discriminator_step_loss, fake_score_loss, generator_loss,
)

log = logging.getLogger("smfsr.trainer")


# ----------------------------------------------------------------------------------------------
# networks


@dataclass
class Networks:
    trained: torch.nn.Module  # the network this stage trains and exports
    teacher: torch.nn.Module | None  # frozen (meanflow, refine)
    codec: LatentCodec | None  # frozen VAE + latent normalisation (None in stage vae)
    prompt: tuple[torch.Tensor, torch.Tensor]  # (embeds, pooled) used for every sample
    null: tuple[torch.Tensor, torch.Tensor]  # the empty prompt, for text dropout and CFG
    refine: RefineNets | None = None  # fake score and discriminator (refine)


def load_vae(config: TrainConfig, fallback: Bundle | None) -> tuple[torch.nn.Module, float, float]:
    if config.vae:
        metadata, _ = read_header(config.vae) if Path(config.vae).is_file() else ({}, {})
        if "smfsr_format" in metadata:
            bundle = load_model(config.vae)
            if bundle.vae is None:
                raise SystemExit(f"{config.vae} has no VAE")
            return bundle.vae, bundle.defaults.vae_scaling_factor, bundle.defaults.vae_shift_factor
        vae = import_vae(config.vae)
        return vae, float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    if fallback is not None and fallback.vae is not None:
        return fallback.vae, fallback.defaults.vae_scaling_factor, fallback.defaults.vae_shift_factor
    if config.vae_preset:
        cfg = vae_config(config.vae_preset)
        torch.manual_seed(config.seed)
        return build_vae(cfg), float(cfg["scaling_factor"]), float(cfg["shift_factor"])
    raise SystemExit("config: set vae (a bundle or diffusers VAE) or vae_preset")


def text(config: TrainConfig, path: str | None, joint: int, pooled: int) -> tuple[torch.Tensor, torch.Tensor]:
    if path:
        return read_prompt_file(path)
    return torch.zeros(1, 1, joint), torch.zeros(1, pooled)  # a "null" prompt for caption-free training


def load_bundle_of_kind(path: str, what: str, *, average_velocity: bool) -> Bundle:
    """A bundle whose transformer is (``average_velocity``) a mean-flow student or a flow teacher."""
    if not Path(path).exists():
        raise SystemExit(f"stage needs {what}: {path} does not exist (run the stage that exports it, or set it)")
    bundle = load_model(path)
    if bundle.transformer.is_average_velocity != average_velocity:
        kind = "a mean-flow (one-step) student" if average_velocity else "a flow teacher"
        raise SystemExit(f"{path} is not {kind}, as {what} must be")
    return bundle


def build_networks(config: TrainConfig) -> Networks:
    teacher_bundle = None  # the bundle whose VAE and prompt this stage reuses
    if config.stage == "vae":
        torch.manual_seed(config.seed)
        vae = import_vae(config.init) if config.init else build_vae(vae_config(config.vae_preset or "small"))
        if getattr(vae, "lossless", False):
            raise SystemExit(f"vae_preset {config.vae_preset!r} is a fixed lossless codec: there is no VAE to train. "
                             "Skip stage vae and set vae_preset in the flow stage instead.")
        empty = (torch.zeros(0), torch.zeros(0))
        return Networks(vae.train(), None, None, empty, empty)
    if config.stage == "flow":
        if config.init:
            teacher_bundle = load_model(config.init)
            trained = teacher_bundle.transformer
        else:
            torch.manual_seed(config.seed)
            trained = build_transformer(transformer_config(TEACHER_OF.get(config.preset, config.preset)))
        if trained.is_average_velocity:
            raise SystemExit("stage flow trains a flow teacher; the init model is an average-velocity (mean-flow) model")
        teacher = None
    else:
        path = config.teacher or str(Path(config.output_dir) / "flow.safetensors")
        teacher_bundle = load_bundle_of_kind(path, "a teacher", average_velocity=False)
        teacher = teacher_bundle.transformer.eval().requires_grad_(False)
        if config.stage == "meanflow":
            trained = student_from_teacher(teacher)
        else:  # refine: the distilled student
            path = config.init or str(Path(config.output_dir) / "meanflow.safetensors")
            teacher_bundle = load_bundle_of_kind(path, "a student to refine (init)", average_velocity=True)
            trained = teacher_bundle.transformer
    if config.gradient_checkpointing:
        trained.enable_gradient_checkpointing()
    if config.stage == "refine" and config.generator_lora_rank > 0:
        add_lora(trained, config.generator_lora_rank, seed=config.seed)
    else:
        select_trainable(trained, config.trainable)

    vae, scale, shift = load_vae(config, teacher_bundle)
    vae.eval().requires_grad_(False)
    c = trained.config
    prompt = text(config, config.prompt_embeds, c.joint_attention_dim, c.pooled_projection_dim)
    if teacher_bundle is not None and teacher_bundle.prompt_embeds is not None and not config.prompt_embeds:
        prompt = (teacher_bundle.prompt_embeds, teacher_bundle.prompt_pooled)
    null = text(config, config.null_prompt_embeds, c.joint_attention_dim, c.pooled_projection_dim)
    refine = refine_networks(config, teacher) if config.stage == "refine" else None
    return Networks(trained, teacher, LatentCodec(vae, scale, shift, tiling=None), prompt, null, refine)


def refine_networks(config: TrainConfig, teacher: torch.nn.Module) -> RefineNets:
    """The frozen DINOv3 backbone with new heads (when the GAN term is on), and the fake score: a
    LoRA on a teacher copy (when the VSD term is on)."""
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


def select_trainable(model: torch.nn.Module, mode: str) -> None:
    """``all``, or ``control``: only the DiT4SR LR-stream layers (+ the interval embedding, which a
    student initialised from a teacher must learn)."""
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "all" or "control" in name or "interval_embedder" in name)


# ----------------------------------------------------------------------------------------------
# checkpoints


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir())


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, micro: int, ema: EMA, keep: int) -> Path:
    """accelerate state + EMA (safetensors) + step, written to a temporary folder then renamed."""
    final, tmp = out / f"checkpoint-{step:08d}", out / f".checkpoint-{step:08d}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"),
                  metadata={"decay": str(ema.decay)})
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "micro": micro}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMA) -> tuple[int, int]:
    accelerator.load_state(str(path))
    ema.shadow = {k: v.float() for k, v in load_file(str(path / "ema.safetensors")).items()}
    state = json.loads((path / "trainer_state.json").read_text())
    return int(state["step"]), int(state["micro"])


# ----------------------------------------------------------------------------------------------
# export and validation


def stage_steps(config: TrainConfig, value: int) -> int:
    return value or (1 if config.stage in ("meanflow", "refine") else 25)


def ema_model(nets: Networks, ema: EMA) -> torch.nn.Module:
    """The EMA weights as a plain transformer (a LoRA generator's adapters merged in)."""
    model = build_transformer(dict(nets.trained.config))
    if has_lora(nets.trained):
        adapted = copy.deepcopy(nets.trained)
        ema.copy_to(adapted)
        model.load_state_dict(merged_state_dict(adapted))
    else:
        ema.copy_to(model)
    return model.eval().requires_grad_(False)


def to_bundle(config: TrainConfig, nets: Networks, model: torch.nn.Module) -> Bundle:
    tile = max(16, 2 * config.crop // 8)
    defaults = PipelineDefaults(
        upscale=config.scale, steps=stage_steps(config, config.export_steps),
        process_size=config.process_size or config.crop, vae_scaling_factor=nets.codec.scaling_factor,
        vae_shift_factor=nets.codec.shift_factor, latent_tile=tile, latent_overlap=tile // 4, flow_shift=1.0,
    )
    return Bundle(transformer=model, vae=nets.codec.vae, prompt_embeds=nets.prompt[0], prompt_pooled=nets.prompt[1],
                  defaults=defaults, license="Apache-2.0 (weights trained with the SMFSR trainer)",
                  provenance=f"smfsr_trainer stage {config.stage}, config: {json.dumps(dump_short(config))}")


def dump_short(config: TrainConfig) -> dict:
    keys = ("stage", "preset", "crop", "scale", "degradation", "batch_size", "learning_rate", "max_steps",
            "boundary_fraction", "fixed_interval_fraction", "seed")
    return {k: getattr(config, k) for k in keys}


def export(config: TrainConfig, nets: Networks, ema: EMA) -> Path:
    if config.stage == "vae":
        return export_vae(config, nets, ema)
    path = Path(config.output_dir) / f"{config.stage}.safetensors"
    return save_bundle(path, to_bundle(config, nets, ema_model(nets, ema)), overwrite=True)


def export_vae(config: TrainConfig, nets: Networks, ema: EMA) -> Path:
    """The EMA VAE as a diffusers folder, its latent scale/shift measured on training crops."""
    vae = build_vae(dict(nets.trained.config))
    ema.copy_to(vae)
    data = SRPairs(config.train_dir, crop=config.crop, scale=config.scale, degradation="bicubic", seed=config.seed + 1)
    images = torch.stack([data[i]["hr"] for i in range(min(len(data), 32))])
    scale, shift = latent_statistics(vae.eval(), images)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    path = Path(config.output_dir) / "vae_model"
    vae.save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def validate(config: TrainConfig, nets: Networks, ema: EMA, accelerator: Accelerator, step: int) -> dict[str, float]:
    from kornia.metrics import psnr, ssim

    from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions

    data = SRPairs(config.val_dir, crop=config.val_crop, scale=config.scale, degradation=config.degradation,
                   seed=config.seed, train=False)
    items = [data[i] for i in range(min(config.val_count, len(data)))]
    hr = torch.stack([it["hr"] for it in items])
    lr = torch.stack([it["lr"] for it in items])
    if config.stage == "vae":
        vae = build_vae(dict(nets.trained.config))
        ema.copy_to(vae)
        codec = LatentCodec(vae.eval(), 1.0, 0.0)
        recon = codec.decode(codec.encode(hr))
        return {"val/psnr": psnr(recon, hr, 1.0).mean().item(), "val/ssim": ssim(recon, hr, 11).mean().item()}
    upscaler = SMFSRUpscaler(to_bundle(config, nets, ema_model(nets, ema).to(accelerator.device)))
    upscaler.codec.tiling = None
    sr = upscaler(lr, UpscaleOptions(steps=stage_steps(config, config.val_steps), seed=0), seeds=list(range(len(lr))))
    metrics = {"val/psnr": psnr(sr, hr, 1.0).mean().item(), "val/ssim": ssim(sr, hr, 11).mean().item()}
    tracker = _tensorboard(accelerator)
    if tracker is not None:
        bicubic = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic").clamp(0, 1)
        tracker.writer.add_images("val/bicubic|sr|hr", torch.cat([bicubic, sr, hr], -1), step)
    return metrics


def _tensorboard(accelerator: Accelerator):
    try:
        return accelerator.get_tracker("tensorboard", unwrap=False)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# the loop


def weights_digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def make_accelerator(config: TrainConfig) -> Accelerator:
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=str(Path(config.output_dir) / config.stage),
        cpu=not torch.cuda.is_available(),
    )


def step_generator(config: TrainConfig, micro: int, rank: int) -> torch.Generator:
    """The randomness of one micro-batch (times, noise, dropout): a function of the step alone."""
    return torch.Generator().manual_seed(((config.seed * 1_000_003 + micro) * 1_009 + rank) % (2**63))


def encode(nets: Networks, batch: dict, device: torch.device) -> tuple[torch.Tensor, Condition]:
    hr, lr = batch["hr"].to(device), batch["lr"].to(device)
    control = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        x = nets.codec.encode(hr).float()  # posterior means: the training targets
        lr_latent = nets.codec.encode(control).float()
    n = hr.shape[0]
    embeds, pooled = (t.to(device).expand(n, *t.shape[1:]) for t in nets.prompt)
    return x, Condition(lr_latent, embeds, pooled)


def compute_loss(config: TrainConfig, nets: Networks, model, batch: dict, g: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    if config.stage == "vae":
        return vae_loss(model, batch["hr"].to(device), g, config.kl_weight)
    x, cond = encode(nets, batch, device)
    n = x.shape[0]
    noise = torch.randn(x.shape, generator=g).to(device)
    null = Condition(cond.lr_latent, nets.null[0].to(device).expand_as(cond.embeds), nets.null[1].to(device).expand_as(cond.pooled))
    if config.stage == "flow":
        t = meanflow.logit_normal(n, config.time_mu, config.time_sigma, generator=g).to(device)
        cond = drop_text(cond, null, config.null_text_prob, g)
        loss = flow_matching_loss(velocity_fn(model), x, noise, t, cond, precondition=config.precondition)
        return loss, {}
    r, t = meanflow.sample_time_pairs(n, boundary_fraction=config.boundary_fraction,
                                      fixed_interval_fraction=config.fixed_interval_fraction,
                                      mu=config.time_mu, sigma=config.time_sigma, generator=g)
    lam = torch.rand(n, generator=g)
    teacher_v = guided(velocity_fn(nets.teacher), config.teacher_cfg, null.embeds[:1], null.pooled[:1])
    unwrapped = model.module if hasattr(model, "module") else model
    return meanflow_loss(average_velocity_fn(model), average_velocity_fn(unwrapped), teacher_v, x, noise,
                         r.to(device), t.to(device), lam.to(device), cond)


@dataclass
class Player:
    """One network with its optimizer and the loss it descends; a step runs every player in turn."""

    name: str
    model: torch.nn.Module  # as prepared by accelerate
    optimizer: torch.optim.Optimizer
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class Step:
    batch: dict
    g: torch.Generator


def adamw(model: torch.nn.Module, lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)


def prepare_players(config: TrainConfig, nets: Networks, accelerator: Accelerator, loader: DataLoader
                    ) -> tuple[list[Player], DataLoader, Callable[[dict, torch.Generator], Any]]:
    """The stage's players (prepared by accelerate, in update order), its loader, and how a
    micro-batch becomes what the players' losses read."""
    device = accelerator.device
    if config.stage != "refine":
        model, optimizer, loader = accelerator.prepare(nets.trained, adamw(nets.trained, config.learning_rate, config),
                                                       loader)
        player = Player("model", model, optimizer,
                        lambda step: compute_loss(config, nets, model, step.batch, step.g, device))
        return [player], loader, Step
    r = nets.refine
    chosen = [("generator", nets.trained, config.learning_rate)]
    if config.weight_vsd:
        chosen.append(("fake_score", r.fake, config.fake_learning_rate))
    if config.weight_gan:
        chosen.append(("discriminator", r.heads, config.disc_learning_rate))
    models = [m for _, m, _ in chosen]
    prepared = accelerator.prepare(*models, *[adamw(m, lr, config) for _, m, lr in chosen], loader)
    wrapped, optimizers, loader = prepared[: len(chosen)], prepared[len(chosen): 2 * len(chosen)], prepared[-1]
    by_name = dict(zip((name for name, _, _ in chosen), wrapped))
    losses = {
        "generator": lambda b: generator_loss(config, r, by_name["generator"], nets.codec, b),
        "fake_score": lambda b: fake_score_loss(config, by_name["fake_score"], b),
        "discriminator": lambda b: discriminator_step_loss(config, r, by_name["discriminator"], nets.codec, b),
    }
    players = [Player(name, model, opt, losses[name]) for (name, _, _), model, opt in zip(chosen, wrapped, optimizers)]
    return players, loader, lambda batch, g: refine_batch(nets, batch, g, device)


def refine_batch(nets: Networks, batch: dict, g: torch.Generator, device: torch.device) -> RefineBatch:
    x, cond = encode(nets, batch, device)
    null = Condition(cond.lr_latent, nets.null[0].to(device).expand_as(cond.embeds),
                     nets.null[1].to(device).expand_as(cond.pooled))
    return RefineBatch(x, cond, null, batch["hr"].to(device), batch["lr"].to(device), g)


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    config, args = load_config(argv)
    out = Path(config.output_dir) / config.stage  # checkpoints and logs of this stage
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    nets = build_networks(config)
    device = accelerator.device
    if nets.codec is not None:
        nets.codec.vae.to(device)
    if nets.teacher is not None:
        nets.teacher.to(device)

    if nets.refine is not None:
        for frozen in (m for m in (nets.refine.teacher, nets.refine.backbone) if m is not None):
            frozen.to(device)
    ema = EMA(nets.trained, config.ema_decay)
    # the vae stage uses only HR crops: skip the costly degradation
    degradation = "bicubic" if config.stage == "vae" else config.degradation
    dataset = SRPairs(config.train_dir, crop=config.crop, scale=config.scale, degradation=degradation,
                      lr_dir=config.lr_dir, seed=config.seed)
    if len(dataset) < config.batch_size * accelerator.num_processes:
        raise SystemExit(f"data: {len(dataset)} images cannot fill one batch of {config.batch_size} on each of "
                         f"{accelerator.num_processes} processes; add images or lower batch_size")
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=EpochSampler(len(dataset), config.seed),
                        num_workers=config.num_workers, drop_last=True)
    players, loader, begin = prepare_players(config, nets, accelerator, loader)
    generator = players[0].model  # the network the EMA follows and the stage exports

    step = micro = 0
    if config.resume or args.export_only:
        found = checkpoints(out)
        if found:
            step, micro = load_checkpoint(accelerator, found[-1], ema)
            accelerator.print(f"resumed from {found[-1]} at step {step}")
        elif args.export_only:
            raise SystemExit(f"no checkpoint in {out} to export")
    if args.export_only:
        path = export(config, nets, ema) if accelerator.is_main_process else None
        accelerator.print(f"exported {path}")
        return path

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(dump(config))
        accelerator.init_trackers("smfsr", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                   for k, v in json.loads(dump(config)).items()})
    per_epoch = max(1, len(loader))
    started, logged = time.time(), []
    while step < config.max_steps:
        epoch, skip = divmod(micro, per_epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        # accelerate's loaders keep their own epoch counter (restarting at 0 after a resume) and
        # push it into the sampler on every pass: set ours on the loader we iterate.
        batches.set_epoch(epoch)
        for batch in batches:
            with accelerator.accumulate(*(p.model for p in players)):
                state = begin(batch, step_generator(config, micro, accelerator.process_index))
                parts = {}
                for player in players:  # in turn: each sees the networks the earlier ones just updated
                    with accelerator.autocast():
                        player_loss, player_parts = player.loss(state)
                    accelerator.backward(player_loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(player.params, config.max_grad_norm)
                    player.optimizer.step()
                    player.optimizer.zero_grad(set_to_none=True)
                    parts.update(player_parts)
                    if player is players[0]:
                        loss = player_loss
            micro += 1
            logged.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            ema.update(accelerator.unwrap_model(generator))
            if step % config.log_every == 0 or step == config.max_steps:
                values = {"loss": sum(logged) / len(logged), **parts, "lr": config.learning_rate}
                accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)
                accelerator.print(f"step {step}/{config.max_steps} loss {values['loss']:.4f} "
                                  + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                                  + f" ({(time.time() - started) / step:.2f} s/step)")
                logged = []
            if config.val_dir and config.val_every and step % config.val_every == 0 and accelerator.is_main_process:
                metrics = validate(config, nets, ema, accelerator, step)
                accelerator.log(metrics, step=step)
                accelerator.print(f"step {step} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            if step % config.checkpoint_every == 0 and step < config.max_steps:
                save_checkpoint(accelerator, out, step, micro, ema, config.keep_checkpoints)
            if step >= config.max_steps:
                break
    save_checkpoint(accelerator, out, step, micro, ema, config.keep_checkpoints)
    if os.environ.get("SMFSR_RANK_DIGESTS"):  # diagnostic: each rank's weights, to check DDP kept them in sync
        (out / f"weights-rank{accelerator.process_index}.sha256").write_text(
            weights_digest(accelerator.unwrap_model(generator)))
    path = None
    if accelerator.is_main_process:
        path = export(config, nets, ema)
        accelerator.print(f"exported {path}")
    accelerator.end_training()
    return path


if __name__ == "__main__":
    main()
