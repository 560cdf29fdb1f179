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
    trainable: str = "all"  # all | control (only *_control layers: fine-tuning a pretrained SD3.5 DiT)
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
    generator_lora_rank: int = 0  # 0: the generator trains fully (its `trainable` layers); > 0: as a LoRA
    fake_lora_rank: int = 16  # the VSD fake score: a LoRA of this rank on a copy of the teacher
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
        if self.trainable not in ("all", "control"):
            raise SystemExit(f"config: trainable must be 'all' or 'control', not {self.trainable!r}")
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
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            parser.add_argument(flag, action="store_true", default=None, help="resume from the latest checkpoint")
            continue
        parser.add_argument(flag, dest=f.name, default=None, type=lambda v, k=hints[f.name]: _cast(k, v))
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values = _parse_file(Path(args.config))
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise SystemExit(f"{args.config}: unknown settings {sorted(unknown)}")
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    config = TrainConfig(**values)
    config.validate()
    return config, args


def dump(config: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)


__all__ = ["TrainConfig", "load_config", "dump", "field"]
