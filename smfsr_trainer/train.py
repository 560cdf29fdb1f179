"""SMFSR trainer: ``python smfsr_trainer/train.py --config CONFIG [--<setting> VALUE ...]``
(or ``accelerate launch`` it, for several GPUs).

One loop for every stage; a stage (``stages/``) builds its networks and names their losses:
  vae       a small AutoencoderKL, for models trained from scratch            -> vae_model/ (diffusers)
  flow      an LR-conditioned flow-matching teacher (DiT4SR recipe)           -> flow.safetensors
  meanflow  the SMFSR student, distilled from the frozen teacher with ISC     -> meanflow.safetensors
  refine    the student sharpened by a GAN and VSD under the teacher          -> refine.safetensors
This file is the loop: data, the players' updates, EMA, logging, validation, checkpoints
(``<output_dir>/<stage>/checkpoint-<step>/``; ``--resume`` continues exactly, Ctrl-C saves one)
and the export every door loads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python smfsr_trainer/train.py, accelerate launch)
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from smfsr_trainer.checkpoints import checkpoints, load_checkpoint, save_checkpoint  # noqa: E402
from smfsr_trainer.config import LR_SCHEDULES, TrainConfig, dump, launch_plan, load_config  # noqa: E402
from smfsr_trainer.data import EpochSampler, SRPairs  # noqa: E402
from smfsr_trainer.ema import EMA  # noqa: E402
from smfsr_trainer.networks import Networks, averaged_weights, freeze_in, weight_dtype  # noqa: E402
from smfsr_trainer.stages import Stage, get_stage  # noqa: E402

log = logging.getLogger("smfsr.trainer")


@dataclass
class Player:
    """One trained network with its optimizer and the loss it descends; a step runs every player
    in turn, each seeing the networks the earlier ones just updated."""

    name: str
    model: torch.nn.Module  # as prepared by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: Any  # its learning-rate schedule (saved and restored with the checkpoints)
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def make_accelerator(config: TrainConfig) -> Accelerator:
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    cpu = not torch.cuda.is_available()
    # the schedulers step once per optimisation step, whatever the number of processes (the loop steps them)
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps, log_with=log_with,
                              project_dir=str(Path(config.output_dir) / config.stage), cpu=cpu,
                              step_scheduler_with_optimizer=False)
    if cpu:
        shard_on_cpu(accelerator)
    return accelerator


def shard_on_cpu(accelerator: Accelerator) -> None:
    """FSDP on CPU processes (gloo), as ``accelerate launch --use_fsdp`` asks: accelerate 1.x turns a
    CPU launch into plain DDP and drops the FSDP settings, but torch's FSDP2 runs on gloo, so a
    sharded run (its checkpoints, resume and export) can be rehearsed without GPUs. On GPUs
    accelerate sets this up itself and this does nothing."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or \
            accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise SystemExit("FSDP on CPU needs fsdp_version 2 (torch's fully_shard); FSDP1 needs GPUs")
    # AcceleratorState copies PartialState's shared fields whenever it is built: set both
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def step_generator(config: TrainConfig, micro: int, rank: int) -> torch.Generator:
    """The randomness of one micro-batch (times, noise, dropout): a function of the step alone."""
    return torch.Generator().manual_seed(((config.seed * 1_000_003 + micro) * 1_009 + rank) % (2**63))


def adamw(model: torch.nn.Module, lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """Linear warmup over lr_warmup_steps, then constant, cosine or linear decay to max_steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(LR_SCHEDULES[config.lr_schedule], optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps)


def at_step(scheduler, step: int) -> None:
    """The learning rates of this run's schedule at ``step``: a resumed run may have a larger
    max_steps than the one that saved the checkpoint, and its rates follow its own schedule."""
    rates = [base * rule(step) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler.last_epoch, scheduler._last_lr = step, rates


def prepare_players(stage: Stage, config: TrainConfig, nets: Networks, accelerator: Accelerator) -> list[Player]:
    """Each trained network prepared with its own optimizer and schedule, one ``prepare`` call per
    network (accelerate's FSDP2 shards one model per call)."""
    chosen = stage.trained(config, nets)
    models, parts = {}, []
    for name, model, lr in chosen:
        optimizer = adamw(model, lr, config)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, lr_schedule(optimizer, config))
        models[name] = model
        parts.append((name, optimizer, scheduler))
    losses = stage.losses(config, nets, models)
    return [Player(name, models[name], optimizer, scheduler, losses[name]) for name, optimizer, scheduler in parts]


def mean_over_processes(accelerator: Accelerator, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Each value (a float or a 0-d tensor) averaged over all processes (every process logs at the
    same steps), as floats: the one device sync of a logging interval."""
    if not values:
        return {}
    local = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(accelerator.device) for v in values.values()])
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="mean")
    return dict(zip(values, local.tolist()))


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when it is true on one: a Ctrl-C reaches the processes at different
    moments, and ranks that stopped at different steps would hang, one at the checkpoint's barrier
    and another in the next step's all-reduce."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


def weights_digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class StopRequest:
    """Ctrl-C asks the loop to stop at the end of the current step (so the checkpoint it saves
    resumes exactly); a second Ctrl-C stops at once."""

    def __init__(self):
        self.asked = False

    def __enter__(self):
        import signal

        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step (Ctrl-C again to stop at once, without a checkpoint)", file=sys.stderr)

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGINT, self.previous)


def _tensorboard(accelerator: Accelerator):
    try:
        return accelerator.get_tracker("tensorboard", unwrap=False)
    except Exception:
        return None


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())  # significant digits: small losses stay readable


def main(argv: list[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    config, args = load_config(argv)
    stage = get_stage(config.stage)
    processes, sharding = launch_plan(args)
    if args.dry_run:
        from smfsr_trainer.dry_run import dry_run

        if int(os.environ.get("RANK", "0")) == 0:  # launched on N processes: one report
            print(dry_run(config, stage, processes, sharding))
        return None
    stage.check(config)
    out = Path(config.output_dir) / config.stage  # checkpoints and logs of this stage
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    nets = stage.build(config)
    device = accelerator.device
    for frozen in nets.frozen_modules():  # in the mixed-precision dtype: autocast computes in it anyway
        freeze_in(frozen.to(device), weight_dtype(config))
    dataset = SRPairs(config.train_dir, crop=config.crop, scale=config.scale, degradation=stage.degradation(config),
                      lr_dir=config.lr_dir, seed=config.seed)
    if len(dataset) < config.batch_size * accelerator.num_processes:
        raise SystemExit(f"data: {len(dataset)} images cannot fill one batch of {config.batch_size} on each of "
                         f"{accelerator.num_processes} processes; add images or lower batch_size")
    sampler = EpochSampler(len(dataset), config.seed)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=config.batch_size, drop_last=True, sampler=sampler,
                                            num_workers=config.num_workers))
    players = prepare_players(stage, config, nets, accelerator)
    generator = players[0].model  # the network the EMA follows and the stage exports
    ema = EMA(accelerator.unwrap_model(generator), config.ema_decay)  # after prepare: sharded like it under FSDP

    step = micro = 0
    if config.resume or args.export_only:
        found = checkpoints(out)
        if found:
            step, micro = load_checkpoint(accelerator, found[-1], ema, accelerator.unwrap_model(generator))
            for player in players:
                at_step(player.scheduler.scheduler, step)
            accelerator.print(f"resumed from {found[-1]} at step {step}")
        elif args.export_only:
            raise SystemExit(f"no checkpoint in {out} to export")
    if args.export_only:
        return export(accelerator, stage, config, nets, generator, ema)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(dump(config))
        accelerator.init_trackers("smfsr", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                   for k, v in json.loads(dump(config)).items()})
    per_epoch = max(1, len(loader))
    first_step, started, logged, stopping = step, time.time(), [], False
    with StopRequest() as stop:
        while step < config.max_steps and not stopping:
            epoch, skip = divmod(micro, per_epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            # The epoch decides the sampler's order and the dataset's crops and degradations. accelerate's
            # loaders keep their own counter and push it only so deep: a multi-process loader never
            # reached the dataset (every epoch cropped as epoch 0) and a resumed one never reached the
            # sampler. So the loop tells both itself, and the loader too (its counter must agree).
            batches.set_epoch(epoch)
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            for batch in batches:
                with accelerator.accumulate(*(p.model for p in players)):
                    state = stage.batch(config, nets, batch, step_generator(config, micro, accelerator.process_index),
                                        device)
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
                logged.append(loss.detach())  # read at the logging interval: no device sync per step
                if not accelerator.sync_gradients:
                    continue
                step += 1
                stopping = any_process(accelerator, stop.asked)
                ema.update(accelerator.unwrap_model(generator))
                if step % config.log_every == 0 or step == config.max_steps:
                    values = mean_over_processes(accelerator, {"loss": torch.stack(logged).mean(), **parts})
                    lr = players[0].scheduler.get_last_lr()[0]  # the rate this step used
                    accelerator.log({f"train/{k}": v for k, v in {**values, "lr": lr}.items()}, step=step)
                    accelerator.print(f"step {step}/{config.max_steps} {_format(values)} "
                                      f"({(time.time() - started) / (step - first_step):.2f} s/step)")
                    logged = []
                for player in players:  # before a checkpoint, so a resumed run continues the schedule
                    player.scheduler.step()
                if config.val_dir and config.val_every and step % config.val_every == 0:
                    validate(accelerator, stage, config, nets, averaged_weights(accelerator, generator, ema), step)
                if step % config.checkpoint_every == 0 and step < config.max_steps:
                    save_checkpoint(accelerator, out, step, micro, ema, config.keep_checkpoints)
                if step >= config.max_steps or stopping:
                    break
    saved = save_checkpoint(accelerator, out, step, micro, ema, config.keep_checkpoints)
    if stopping:
        accelerator.print(f"interrupted at step {step}/{config.max_steps}; saved {saved}\n"
                          "resume with the same command plus --resume")
        raise SystemExit(130)
    if os.environ.get("SMFSR_RANK_DIGESTS"):  # diagnostic: each rank's weights, to check DDP kept them in sync
        (out / f"weights-rank{accelerator.process_index}.sha256").write_text(
            weights_digest(accelerator.unwrap_model(generator)))
    path = export(accelerator, stage, config, nets, generator, ema)
    accelerator.end_training()
    return path


def validate(accelerator: Accelerator, stage: Stage, config: TrainConfig, nets: Networks, weights, step: int) -> None:
    """Metrics and an image strip of the averaged weights, on the main process (``weights`` is None
    on the others)."""
    if not accelerator.is_main_process:
        return
    metrics, strip = stage.validate(config, nets, weights, accelerator.device)
    accelerator.log(metrics, step=step)
    tracker = _tensorboard(accelerator)
    if tracker is not None:
        tracker.writer.add_images("val/images", strip, step)
    accelerator.print(f"step {step} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def export(accelerator: Accelerator, stage: Stage, config: TrainConfig, nets: Networks, generator, ema: EMA
           ) -> Path | None:
    """The stage's file from the averaged weights: gathered on every process, written by the main one."""
    weights = averaged_weights(accelerator, generator, ema)
    path = stage.export(config, nets, weights) if accelerator.is_main_process else None
    accelerator.print(f"exported {path}")
    accelerator.wait_for_everyone()
    return path


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the second Ctrl-C
        print("stopped without saving; resume from the last checkpoint with --resume", file=sys.stderr)
        sys.exit(130)
