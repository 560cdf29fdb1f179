"""Training configuration: plain values in one dataclass, read from YAML or TOML, every value
overridable on the command line (``--max-steps 100 --lr 3e-4``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

# learning-rate schedules after the warmup: our name -> diffusers.optimization.get_scheduler's
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainConfig:
    stage: str = "flow"  # vae (a codec) | flow (the LR-conditioned teacher) | meanflow (ISC) | refine (GAN + VSD)
    output_dir: str = "runs/tiny"
    seed: int = 0

    # --- networks ---------------------------------------------------------------------------
    preset: str = "tiny"  # student preset; the teacher is its TEACHER_OF preset
    init: str | None = None  # flow: start from this bundle/official folder; refine: the student (default: <output_dir>/meanflow.safetensors)
    teacher: str | None = None  # meanflow, refine: the frozen teacher (default: <output_dir>/flow.safetensors)
    vae: str | None = None  # bundle with a VAE, or a diffusers VAE folder/file
    vae_preset: str | None = None  # a VAE preset: a fixed codec (space-to-depth-x4) or a random VAE (tests)
    trainable: str = "all"  # all | control (only the LR-stream *_control layers) | lora (adapters, peft)
    lora_rank: int = 32  # trainable lora: the adapters' rank
    lora_alpha: float = 0.0  # their alpha (0: = rank, i.e. scaling 1)
    lora_targets: str = ""  # comma-separated layer names to adapt (empty: every attention and MLP projection)
    export_adapter: bool = False  # trainable lora: also write <stage>-lora.safetensors, the adapters alone
    gradient_checkpointing: bool = False
    prompt_embeds: str | None = None  # .safetensors with 'embeds'/'pooled'; None: a zero "null" prompt
    null_prompt_embeds: str | None = None  # the empty-prompt embedding for dropout/CFG; None: zeros

    # --- data ------------------------------------------------------------------------------------
    train_dir: str = ""  # folder of HR images (searched recursively)
    lr_dir: str | None = None  # pre-made LR images matching train_dir by name (instead of degrading)
    val_dir: str | None = None  # held-out HR images for validation
    crop: int = 64  # HR crop size (px)
    scale: int = 4
    degradation: str = "realesrgan"  # realesrgan | bicubic | mixed (each crop: bicubic or realesrgan, 50/50)
    num_workers: int = 0

    # --- optimisation ----------------------------------------------------------------------------
    batch_size: int = 4
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine | linear (diffusers' get_scheduler), after the warmup
    lr_warmup_steps: int = 0  # steps of linear warmup from 0
    weight_decay: float = 0.01
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999

    # --- flow stage (DiT4SR recipe, method.md 2.4) -----------------------------------------------
    null_text_prob: float = 0.2
    precondition: bool = True  # loss on x0 = z_t - t v (DiT4SR) instead of on v
    time_mu: float = 0.0
    time_sigma: float = 1.0

    # --- vae stage -------------------------------------------------------------------------------
    kl_weight: float = 1e-6

    # --- meanflow stage (SplitMeanFlow, method.md 1.3) -------------------------------------------
    boundary_fraction: float = 0.5  # share of r = t samples trained on the teacher's velocity
    fixed_interval_fraction: float = 0.1  # share on [0, 1], [0, .5], [.5, 1]
    teacher_cfg: float = 1.0  # classifier-free guidance inside the teacher target (1 = off)

    # --- refine stage (DINOv3 GAN + VSD, method.md 2.5; README "Choices") -------------------------
    fake_lora_rank: int = 16  # the VSD fake score: LoRA adapters of this rank on the teacher itself
    fake_learning_rate: float = 1e-4
    refine_steps: str = "1"  # generator step counts trained, drawn per micro-batch ("1,2,4": multi-step stays good)
    disc_backbone: str | None = None  # the discriminator's frozen backbone: a transformers folder (DINOv3, the
    # paper's; DINOv2, SigLIP, ...) or a feature-stack file (recipes/quality/convert_stlpips.py: VGG-16)
    disc_layers: str = "3,6,9,12"  # its depths the heads read (a ViT's blocks; VGG: 1..5 = relu1_2 .. relu5_3)
    disc_resolution: int = 224  # short side images are resized to for a transformers backbone (0: as they are)
    weight_perceptual: float = 0.0  # LPIPS-style distance to the HR image (the generator's)
    perceptual_net: str | None = None  # its network (default: disc_backbone); a file with LPIPS weights uses them
    disc_width: int = 128
    disc_conditioned: bool = True  # the heads also see the LR image
    disc_learning_rate: float = 1e-4
    gan_loss: str = "hinge"  # hinge | nonsaturating
    r1_gamma: float = 0.0  # R1 penalty on real images (0: off)
    weight_l2: float = 1.0  # reconstruction against the HR latent
    weight_l1: float = 0.0
    weight_grid: float = 0.0  # the error's phase pattern on the codec's cell (grid.grid_loss; a 4-px grid)
    weight_gan: float = 0.1
    weight_vsd: float = 1.0
    vsd_t_min: float = 0.02
    vsd_t_max: float = 0.98
    vsd_cfg: float = 1.0  # classifier-free guidance on the real score (1: off)

    # --- bookkeeping -----------------------------------------------------------------------------
    log_every: int = 10
    val_every: int = 200
    val_steps: int = 0  # sampling steps at validation (0: 1 for meanflow, 25 for flow)
    val_count: int = 4
    val_crop: int = 128
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    export_steps: int = 0  # default sampling steps stored in the bundle (0: 1 for meanflow, 25 for flow)
    process_size: int = 0  # stored in the bundle (0: 4 x crop / scale... i.e. the training crop)

    def validate(self) -> None:
        if self.stage not in ("vae", "flow", "meanflow", "refine"):
            raise SystemExit(f"config: stage must be 'vae', 'flow', 'meanflow' or 'refine', not {self.stage!r}")
        if self.gan_loss not in ("hinge", "nonsaturating"):
            raise SystemExit(f"config: gan_loss must be 'hinge' or 'nonsaturating', not {self.gan_loss!r}")
        if self.stage == "refine" and (self.weight_gan or self.weight_perceptual) and not (
                self.disc_backbone or self.perceptual_net):
            raise SystemExit("config: the GAN and perceptual terms need a frozen network: set disc_backbone "
                             "(a DINOv3 folder, or the VGG-16 file of recipes/quality/convert_stlpips.py), "
                             "or weight_gan 0 and weight_perceptual 0")
        if self.stage == "refine" and self.weight_vsd and self.fake_lora_rank < 1:
            raise SystemExit("config: VSD needs a fake score: set fake_lora_rank >= 1 (or weight_vsd 0)")
        if not 0 <= self.vsd_t_min < self.vsd_t_max <= 1:
            raise SystemExit("config: need 0 <= vsd_t_min < vsd_t_max <= 1")
        if self.trainable not in ("all", "control", "lora"):
            raise SystemExit(f"config: trainable must be 'all', 'control' or 'lora', not {self.trainable!r}")
        if self.trainable == "lora" and self.stage == "vae":
            raise SystemExit("config: stage vae trains a codec from scratch; trainable lora is for the transformer "
                             "stages (flow, meanflow, refine)")
        if self.trainable == "lora" and self.lora_rank < 1:
            raise SystemExit(f"config: lora_rank {self.lora_rank}: a LoRA needs rank >= 1 (16-64 is usual); "
                             "or set trainable all/control")
        if self.lora_alpha < 0:
            raise SystemExit(f"config: lora_alpha {self.lora_alpha} must be >= 0 (0: the rank)")
        if self.degradation not in ("realesrgan", "bicubic", "mixed"):
            raise SystemExit(f"config: degradation must be 'realesrgan', 'bicubic' or 'mixed', not {self.degradation!r}")
        if self.crop % (8 * self.scale):
            raise SystemExit(f"config: crop ({self.crop}) must be a multiple of 8 x scale ({8 * self.scale})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SystemExit(f"config: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if not 0 <= self.lr_warmup_steps <= self.max_steps:
            raise SystemExit(f"config: lr_warmup_steps ({self.lr_warmup_steps}) must be between 0 and max_steps "
                             f"({self.max_steps})")
        if not self.train_dir:
            raise SystemExit("config: train_dir (a folder of HR images) is required")
        if not 0 <= self.boundary_fraction + self.fixed_interval_fraction <= 1:
            raise SystemExit("config: boundary_fraction + fixed_interval_fraction must be in [0, 1]")


def _parse_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


RENAMED = {"generator_lora_rank": "trainable: lora with lora_rank (every stage can train as a LoRA now)",
           "cache_latents": "nothing (latents are computed per batch)", "cache_size": "nothing"}


def _unknown_keys(keys: set[str], source: str) -> SystemExit:
    import difflib

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    lines = []
    for key in sorted(keys):
        if key in RENAMED:
            lines.append(f"  {key}: replaced by {RENAMED[key]}")
        else:
            close = difflib.get_close_matches(key, names, n=1)
            lines.append(f"  {key}: " + (f"did you mean {close[0]}?" if close else "not a setting"))
    return SystemExit(f"{source}: unknown settings\n" + "\n".join(lines) +
                      "\n(every setting: smfsr_trainer/config.py, TrainConfig)")


def _check_type(key: str, value: Any, kind: Any, source: str) -> Any:
    """A value from a file against its field's type (YAML gives ints for floats, strings for None)."""
    text = str(kind)
    if value is None and "None" in text:
        return None
    if "bool" in text:
        ok = isinstance(value, bool)
    elif "float" in text:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif "int" in text:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # str: a number is accepted as its text ("refine_steps: 1")
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        wanted = "true/false" if "bool" in text else "a number" if "float" in text else \
            "a whole number" if "int" in text else "text"
        raise SystemExit(f"{source}: {key} must be {wanted}, not {value!r} ({type(value).__name__})")
    return value


def _cast(kind: Any, value: str) -> Any:
    text = str(kind)
    if value.lower() in ("none", "null") and "None" in text:
        return None
    if "bool" in text:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
    if "int" in text and "float" not in text:
        return int(value)
    if "float" in text:
        return float(value)
    return value


def load_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """``--config FILE`` then ``--<field> VALUE`` overrides; returns the config and extra args."""
    parser = argparse.ArgumentParser(description="SMFSR trainer (run it with accelerate launch)")
    parser.add_argument("--config", help="YAML or TOML file")
    parser.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA weights and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the stage's networks on the meta device (no weights read) and print parameters "
                             "and memory per GPU, then exit")
    parser.add_argument("--processes", type=int, default=None,
                        help="dry run: the number of processes (GPUs) to plan for (default: as launched)")
    parser.add_argument("--sharding", choices=("none", "fsdp"), default=None,
                        help="dry run: plan for FSDP sharding (default: as launched, i.e. accelerate's config)")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                                help="resume from the latest checkpoint")
            continue
        # SUPPRESS: an option given is in args even when its value is None ("--vae none" clears the file's)
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=lambda v, k=hints[f.name]: _cast(k, v))
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values = _parse_file(Path(args.config))
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise _unknown_keys(unknown, args.config)
        values = {k: _check_type(k, v, hints[k], args.config) for k, v in values.items()}
    for f in dataclasses.fields(TrainConfig):
        if f.name in vars(args):
            values[f.name] = getattr(args, f.name)
    config = TrainConfig(**values)
    config.validate()
    return config, args


def launch_plan(args: argparse.Namespace) -> tuple[int, str]:
    """(processes, sharding) the run has: as ``accelerate launch`` set them (its environment), or
    the dry run's --processes/--sharding."""
    import os

    processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
    sharding = args.sharding or ("fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "none")
    if processes < 1:
        raise SystemExit(f"--processes {processes}: need at least 1")
    if sharding == "fsdp" and processes == 1:
        raise SystemExit("FSDP with one process shards nothing (and accelerate would silently train unsharded): "
                         "launch with --num_processes 2 or more (configs/accelerate_fsdp.yaml sets 8), or drop "
                         "the FSDP config for a single GPU")
    return processes, sharding


def dump(config: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)


__all__ = ["TrainConfig", "load_config", "dump", "field"]
