"""What every stage builds from: the frozen VAE and prompt, bundles of the right kind, and the
exported bundle (``to_bundle``). Stage-specific networks are built by the stages themselves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smfsr.checkpoint import Bundle, PipelineDefaults, build_transformer, build_vae, import_vae, load_model, \
    read_header, read_prompt_file
from smfsr.checkpoint.safe_read import is_planning, plan_note
from smfsr.codec import LatentCodec
from smfsr.models.presets import transformer_config, vae_config

from .conditioning import Condition
from .config import TrainConfig
from .ema import EMA
from .lora import LoraSpec, add_lora, merge_lora, parse_targets


@dataclass
class Networks:
    trained: torch.nn.Module  # the network this stage trains and exports
    teacher: torch.nn.Module | None = None  # frozen (meanflow, refine)
    codec: LatentCodec | None = None  # frozen VAE + latent normalisation (None in stage vae)
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # (embeds, pooled) used for every sample
    null: tuple[torch.Tensor, torch.Tensor] | None = None  # the empty prompt, for text dropout and CFG
    extra: Any = None  # what a stage adds (refine: fake score, discriminator)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Networks that only run forward: moved to the device by the loop, never prepared."""
        return [m for _, m in self.named_frozen()]

    def named_frozen(self) -> list[tuple[str, torch.nn.Module]]:
        """(role, network) of each network that only runs forward, each once."""
        found = [("teacher", self.teacher), ("vae", self.codec.vae if self.codec is not None else None)]
        found += list(getattr(self.extra, "named_frozen", list)())
        unique = []
        for name, module in found:
            if module is not None and all(module is not m for _, m in unique):
                unique.append((name, module))
        return unique


def load_vae(config: TrainConfig, fallback: Bundle | None) -> tuple[torch.nn.Module, float, float]:
    """The VAE (and its latent scale/shift): ``config.vae``, else the fallback bundle's, else a preset
    (a dry run plans with ``vae_preset``, or SD3.5's, while ``config.vae`` does not exist yet)."""
    if config.vae and is_planning() and not Path(config.vae).exists():
        preset = config.vae_preset or "sd35"
        plan_note(f"{config.vae} not found: shapes of VAE preset {preset}")
        cfg = vae_config(preset)
        return build_vae(cfg), float(cfg["scaling_factor"]), float(cfg["shift_factor"])
    if config.vae:
        metadata, _ = read_header(config.vae) if Path(config.vae).is_file() else ({}, {})
        if "smfsr_format" in metadata:
            bundle = load_model(config.vae)
            if bundle.vae is None:
                raise SystemExit(f"{config.vae} has no VAE")
            return bundle.vae, bundle.defaults.vae_scaling_factor, bundle.defaults.vae_shift_factor
        vae = import_vae(config.vae)
        d = PipelineDefaults().use_vae(vae)
        return vae, d.vae_scaling_factor, d.vae_shift_factor
    if fallback is not None and fallback.vae is not None:
        return fallback.vae, fallback.defaults.vae_scaling_factor, fallback.defaults.vae_shift_factor
    if config.vae_preset:
        cfg = vae_config(config.vae_preset)
        torch.manual_seed(config.seed)
        return build_vae(cfg), float(cfg["scaling_factor"]), float(cfg["shift_factor"])
    raise SystemExit("config: set vae (a bundle or diffusers VAE) or vae_preset")


def text(path: str | None, joint: int, pooled: int) -> tuple[torch.Tensor, torch.Tensor]:
    if path and is_planning() and not Path(path).exists():
        plan_note(f"{path} not found: a one-token prompt")
        path = None
    if path:
        return read_prompt_file(path)
    return torch.zeros(1, 1, joint), torch.zeros(1, pooled)  # a "null" prompt for caption-free training


def load_bundle_of_kind(path: str, what: str, *, average_velocity: bool, dtype: torch.dtype = torch.float32,
                        preset: str | None = None) -> Bundle:
    """A bundle whose transformer is (``average_velocity``) a mean-flow student or a flow teacher, in
    ``dtype`` whatever the file stores: float32 for a network that trains, the mixed-precision dtype
    for a frozen teacher (so a 2.7 B teacher never exists in float32). A dry run plans with the
    shapes of ``preset`` while the file does not exist yet (the stage before has not run)."""
    if not Path(path).exists():
        if is_planning() and preset:
            plan_note(f"{path} not found: shapes of preset {preset}")
            return Bundle(build_transformer(transformer_config(preset)))  # frozen ones are cast by freeze_in
        raise SystemExit(f"stage needs {what}: {path} does not exist (run the stage that exports it, or set it)")
    bundle = load_model(path, dtype=dtype)
    if bundle.transformer.is_average_velocity != average_velocity:
        kind = "a mean-flow (one-step) student" if average_velocity else "a flow teacher"
        raise SystemExit(f"{path} is not {kind}, as {what} must be")
    return bundle


def lora_spec(config: TrainConfig) -> LoraSpec:
    return LoraSpec(config.lora_rank, config.lora_alpha, parse_targets(config.lora_targets))


# What a student initialised from a teacher has that the teacher had not (meanflow stage): the
# interval embedding, trained in every mode, since a low-rank update of a fresh layer cannot learn it.
NEW_LAYERS = ("interval_embedder",)


def select_trainable(model: torch.nn.Module, config: TrainConfig, new_layers: tuple[str, ...] = ()) -> None:
    """``trainable``: ``all``; ``control``: only the DiT4SR LR-stream layers (and the interval
    embedding); ``lora``: adapters on every projection (``lora_rank``, ``lora_alpha``,
    ``lora_targets``) plus ``new_layers`` in full."""
    if config.trainable == "lora":
        add_lora(model, lora_spec(config), seed=config.seed, also_train=new_layers)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(config.trainable == "all" or "control" in name or "interval_embedder" in name)
    # what the forward never runs gets no gradient: frozen, or DDP stops at the second step
    unused = tuple(f"{m}." for m in getattr(model, "unused_modules", list)())
    for name, p in model.named_parameters():
        if name.startswith(unused):
            p.requires_grad_(False)


def weight_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype frozen weights are kept in: the mixed-precision one (trained weights stay float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


def freeze_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters that do not train, stored in ``dtype``: half the memory of a frozen teacher or of a
    LoRA run's base weights under bf16, where autocast computes in bf16 anyway."""
    for p in module.parameters():
        if not p.requires_grad and p.dtype.is_floating_point:
            p.data = p.data.to(dtype)


def with_frozen_parts(config: TrainConfig, trained: torch.nn.Module, teacher: torch.nn.Module | None,
                      source: Bundle | None) -> Networks:
    """The trained network plus the frozen VAE and the prompts (from ``source`` unless configured)."""
    if config.gradient_checkpointing:
        trained.enable_gradient_checkpointing()
    vae, scale, shift = load_vae(config, source)
    vae.eval().requires_grad_(False)
    c = trained.config
    prompt = text(config.prompt_embeds, c.joint_attention_dim, c.pooled_projection_dim)
    if source is not None and source.prompt_embeds is not None and not config.prompt_embeds:
        prompt = (source.prompt_embeds, source.prompt_pooled)
    null = text(config.null_prompt_embeds, c.joint_attention_dim, c.pooled_projection_dim)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    for module in (trained, teacher, vae):
        if module is not None:
            freeze_in(module, weight_dtype(config))
    return Networks(trained, teacher, LatentCodec(scale, shift, vae), prompt, null)


LR_LATENT = "sample"  # how the LR condition is drawn in training; exported bundles record the same rule


def encode(nets: Networks, batch: dict, device: torch.device, g: torch.Generator) -> tuple[torch.Tensor, Condition]:
    """HR latents (posterior means: the targets) and the condition: the LR latent exactly as the
    pipeline makes it (``smfsr.pipeline.lr_condition``: bicubic to the HR size, the posterior sample
    from a per-image seed drawn from ``g``) + the prompt."""
    from smfsr.pipeline import lr_condition

    hr, lr = batch["hr"].to(device), batch["lr"].to(device)
    n = hr.shape[0]
    seeds = torch.randint(2**62, (n,), generator=g).tolist()
    with torch.no_grad():
        x = nets.codec.encode(hr).float()
        lr_latent = lr_condition(nets.codec, lr, tuple(hr.shape[-2:]), seeds, LR_LATENT).float()
    embeds, pooled = (t.to(device).expand(n, *t.shape[1:]) for t in nets.prompt)
    return x, Condition(lr_latent, embeds, pooled)


def null_condition(nets: Networks, cond: Condition) -> Condition:
    """The same condition with the null prompt (text dropout, classifier-free guidance)."""
    device = cond.embeds.device
    return Condition(cond.lr_latent, nets.null[0].to(device).expand_as(cond.embeds),
                     nets.null[1].to(device).expand_as(cond.pooled))


def averaged_weights(accelerator, model: torch.nn.Module, ema: EMA) -> dict[str, torch.Tensor] | None:
    """What a stage exports and validates: the model's weights with the EMA average in place of
    those that train. Every process calls it (FSDP gathers the shards); the main process gets the
    full state dict, the others None."""
    current = accelerator.get_state_dict(model)
    average = ema.full()
    if not accelerator.is_main_process:
        return None
    return {**{k: v.detach().cpu() for k, v in current.items()}, **average}


def plain_model(nets: Networks, weights: dict[str, torch.Tensor], config: TrainConfig) -> torch.nn.Module:
    """``weights`` (from ``averaged_weights``) as a plain transformer, LoRA adapters merged in. The
    tensors are adopted as they are (trained ones float32, frozen ones in the dtype they were kept
    in), so exporting a 2.7 B LoRA run adds only its merged layers to memory, not a float32 copy."""
    if config.trainable == "lora":
        weights = merge_lora(weights, lora_spec(config).scaling)
    with torch.device("meta"):
        model = build_transformer(dict(nets.trained.config))
    model.load_state_dict(weights, assign=True)
    return model.eval().requires_grad_(False)


def to_bundle(config: TrainConfig, nets: Networks, model: torch.nn.Module, stage) -> Bundle:
    """``model`` as a bundle every door loads, with the defaults ``stage`` (a ``stages.Stage``) sets."""
    tile = max(16, 2 * config.crop // 8)
    defaults = PipelineDefaults(
        upscale=config.scale, steps=stage.steps(config.export_steps),
        process_size=config.process_size or config.crop, vae_scaling_factor=nets.codec.scaling_factor,
        vae_shift_factor=nets.codec.shift_factor, latent_tile=tile, latent_overlap=tile // 4, flow_shift=1.0,
        lr_latent=LR_LATENT,
        max_steps=stage.max_steps(config),
    )
    return Bundle(transformer=model, vae=nets.codec.vae, prompt_embeds=nets.prompt[0], prompt_pooled=nets.prompt[1],
                  defaults=defaults, license="Apache-2.0 (weights trained with the SMFSR trainer)",
                  provenance=f"smfsr_trainer stage {config.stage}, config: "
                             f"{json.dumps(config_summary(config, stage.summary_keys))}")


def config_summary(config: TrainConfig, stage_keys: tuple[str, ...] = ()) -> dict:
    """What a bundle's provenance records of the run that made it (the network: its preset, or the
    bundle it started from, and the keys its stage names)."""
    keys = ["stage", "init" if config.init else "preset", "crop", "scale", "degradation", "batch_size",
            "learning_rate", "max_steps", "seed", *stage_keys]
    return {k: getattr(config, k) for k in keys}
