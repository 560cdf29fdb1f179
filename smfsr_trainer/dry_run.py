"""``train.py --dry-run``: every network of a stage built on the meta device, and what one GPU holds.

Nothing is read but headers and config files, nothing is allocated: a 2.7 B-parameter stage is
planned in seconds. Per network: parameters (total / trainable), where it comes from, and per
process the bytes of

    weights      trainable in float32, frozen in the mixed-precision dtype (``networks.freeze_in``)
    gradients    trainable x 4 B
    optimizer    AdamW: two float32 moments, trainable x 8 B (and, while it steps, about trainable x 4 B of
                 temporaries, counted against the activations, which are freed by then)
    EMA          the generator's trainable weights, float32 (``ema.py``)
    activations  the tensors autograd saves in the forward passes with gradient, counted by running
                 those passes on meta tensors at the configured batch and crop (attention counted as
                 a fused kernel saves it: q, k, v, output and the log-sum-exp, not the T x T scores)

Under FSDP (``--sharding fsdp`` or an accelerate FSDP config) the networks that train (and the
frozen weights inside them: a LoRA's base, refine's teacher that carries the fake score's
adapters) are split over the processes, plus two blocks gathered at a time; networks that never
train (the meanflow teacher, the VAE, the discriminator backbone) are replicated.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from .config import TrainConfig
from .networks import NEW_LAYERS, freeze_in, lora_spec, select_trainable, weight_dtype

GB = 1e9
FRAMEWORK_GB = 1.0  # per process, beside the tensors: CUDA context, kernels, allocator slack (1.0 measured on CPU)


@dataclass
class NetworkPlan:
    name: str
    source: str  # the file its shapes came from, or the preset used when the file is absent
    total: int
    trainable: int
    frozen_bytes: int  # bytes of its frozen parameters as stored
    sharded: bool = False  # prepared by accelerate (split under FSDP)
    averaged: bool = False  # followed by the EMA
    largest_block: int = 0  # parameters of its largest transformer block (FSDP gathers these)

    def per_process(self, processes: int, fsdp: bool) -> dict[str, float]:
        split = processes if (fsdp and self.sharded) else 1
        t = self.trainable
        return {"weights": (4 * t + self.frozen_bytes) / split, "gradients": 4 * t / split,
                "optimizer": 8 * t / split, "ema": 4 * t / split if self.averaged else 0.0}


@dataclass
class Plan:
    stage: str
    trainable: str
    processes: int
    sharding: str
    batch: int
    crop: int
    mixed_precision: str
    gradient_checkpointing: bool
    networks: list[NetworkPlan] = field(default_factory=list)
    activations: dict[str, float] = field(default_factory=dict)  # per turn of the step: bytes
    notes: list[str] = field(default_factory=list)

    @property
    def fsdp(self) -> bool:
        return self.sharding == "fsdp"

    def totals(self) -> dict[str, float]:
        sums = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "ema": 0.0}
        for net in self.networks:
            for k, v in net.per_process(self.processes, self.fsdp).items():
                sums[k] += v
        if self.fsdp:  # one block being used and the next prefetched, unsharded, in the compute dtype
            size = 2 if self.mixed_precision in ("bf16", "fp16") else 4
            sums["fsdp gather"] = 2 * size * max((n.largest_block for n in self.networks if n.sharded), default=0)
        # after the forward passes come the backward and the optimizer step: the saved activations are
        # freed by then, and AdamW's multi-tensor step allocates about one float32 copy of what it updates
        activations = max(self.activations.values(), default=0.0)  # the players take turns
        step = max((4 * n.trainable / (self.processes if self.fsdp and n.sharded else 1) for n in self.networks),
                   default=0.0)
        sums["activations or optimizer step"] = max(activations, step)
        sums["framework"] = FRAMEWORK_GB * GB
        sums["total"] = sum(sums.values())
        return sums

    def to_dict(self) -> dict:
        return {**asdict(self), "totals_gb": {k: v / GB for k, v in self.totals().items()}}

    def render(self) -> str:
        lines = [f"dry run: stage {self.stage}, trainable {self.trainable}, {self.processes} process(es), "
                 f"sharding {self.sharding}, batch {self.batch} x {self.crop} px per process, "
                 f"mixed precision {self.mixed_precision}, gradient checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}", "",
                 f"{'network':<22}{'parameters':>14}{'trainable':>14}  per process: weights / grads / optimizer / EMA (GB)"]
        for n in self.networks:
            p = n.per_process(self.processes, self.fsdp)
            lines.append(f"{n.name:<22}{n.total / 1e9:>12.3f} B{n.trainable / 1e9:>12.3f} B  "
                         f"{p['weights'] / GB:6.2f} / {p['gradients'] / GB:5.2f} / {p['optimizer'] / GB:5.2f} / "
                         f"{p['ema'] / GB:5.2f}   {n.source}")
        lines.append("")
        for turn, b in self.activations.items():
            lines.append(f"activations, {turn}: {b / GB:.2f} GB")
        totals = self.totals()
        lines.append("per process: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in totals.items() if k != "total")
                     + f" GB -> total {totals['total'] / GB:.1f} GB")
        fits = [f"{size} GB: {'fits' if totals['total'] <= 0.95 * size * GB else 'does not fit'}"
                for size in (24, 48, 80)]
        lines.append("on one GPU of " + "; ".join(fits) + " (5% kept free)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- counting -----------------------------------------------------------------------------------

class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting: it saves what a fused kernel
    keeps for backward (q, k, v, the output and a float32 log-sum-exp), through autograd, so
    gradient checkpointing sees these saves as it sees every other."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the passes are only counted
        raise NotImplementedError


class SavedTensors:
    """Bytes of the distinct tensors autograd saves for backward, parameters excluded. Meta tensors
    ignore autocast, so under mixed precision a float32 activation is counted at the bytes of the
    half-precision copy autocast would save (norm statistics, which stay float32, are small)."""

    def __init__(self, modules: list[torch.nn.Module], half: bool):
        self.exclude = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
        self.half = half
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            size = t.untyped_storage().nbytes()
            self.bytes += size // 2 if (self.half and t.dtype == torch.float32) else size
        return t

    @contextlib.contextmanager
    def counting(self):
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FusedAttention.apply(q, k, v)
        try:
            with saved_tensors_hooks(self.pack, lambda t: t):
                yield self
        finally:
            F.scaled_dot_product_attention = original


def saved_bytes(modules: list[torch.nn.Module], run: Callable[[], object], half: bool) -> int:
    counter = SavedTensors(modules, half)
    with counter.counting():
        run()
    return counter.bytes


# --- shapes of what the stage builds ----------------------------------------------------------------

def transformer_shape(path: str | None, preset: str, what: str) -> tuple[dict, str]:
    from smfsr.checkpoint.peek import peek_model
    from smfsr.models.presets import transformer_config

    if path and Path(path).exists():
        return dict(peek_model(path)[0]), str(path)
    missing = f"{path} not found: " if path else ""
    return transformer_config(preset), f"{missing}shapes of preset {preset}"


def vae_shape(config: TrainConfig, fallback: str | None) -> tuple[dict, str]:
    from smfsr.checkpoint.peek import read_bundle_info
    from smfsr.models.presets import vae_config

    if config.vae and Path(config.vae).is_dir() and (Path(config.vae) / "config.json").is_file():
        return json.loads((Path(config.vae) / "config.json").read_text()), config.vae
    if config.vae and Path(config.vae).is_file():
        info = read_bundle_info(config.vae)
        if info.vae_config:
            return dict(info.vae_config), config.vae
    if fallback and Path(fallback).is_file():
        info = read_bundle_info(fallback)
        if info.vae_config:
            return dict(info.vae_config), f"the VAE of {fallback}"
    preset = config.vae_preset or "sd35"
    missing = f"{config.vae} not found: " if config.vae else ""
    return vae_config(preset), f"{missing}shapes of VAE preset {preset}"


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build()


def count(name: str, model: torch.nn.Module, source: str, *, sharded: bool = False, averaged: bool = False
          ) -> NetworkPlan:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    blocks = [b for attr in ("transformer_blocks", "layer", "layers") for b in getattr(model, attr, [])]
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    return NetworkPlan(name, source, total, trainable, frozen, sharded, averaged, largest)


def latent_grid(vae_cfg: dict, crop: int) -> tuple[int, int]:
    """(channels, side) of the latent of a crop."""
    from smfsr.checkpoint.peek import is_space_to_depth

    factor = vae_cfg["factor"] if is_space_to_depth(vae_cfg) else 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return vae_cfg["latent_channels"], crop // factor


def prompt_tokens(path: str | None) -> int:
    from smfsr.checkpoint import read_header

    if path and Path(path).is_file():
        return read_header(path)[1]["embeds"][1][1]
    return 1  # the zero "null" prompt of caption-free training


def transformer_activations(model: torch.nn.Module, config: TrainConfig, vae_cfg: dict, *, interval: bool) -> int:
    channels, side = latent_grid(vae_cfg, config.crop)
    b, c = config.batch_size, model.config
    with torch.device("meta"):
        z = torch.empty(b, channels, side, side)
        lr = torch.empty(b, channels, side, side)
        text = torch.empty(b, prompt_tokens(config.prompt_embeds), c.joint_attention_dim)
        pooled = torch.empty(b, c.pooled_projection_dim)
        t = torch.empty(b)
    extra = (t,) if interval else ()

    def forward() -> int:
        return saved_bytes([model], lambda: model(z, lr, text, pooled, t, *extra), config.mixed_precision != "no")

    if not getattr(model, "gradient_checkpointing", False):
        return forward()
    # checkpointed: the blocks' inputs stay, and in backward one block at a time is recomputed in full
    kept = forward()
    model.gradient_checkpointing = False
    try:
        everything = forward()
    finally:
        model.gradient_checkpointing = True
    return kept + everything // c.num_layers


# --- the plan -----------------------------------------------------------------------------------------

def build_transformers(config: TrainConfig, stage_name: str) -> tuple[list[tuple[str, torch.nn.Module, str, bool]], str]:
    """(name, meta network, source, is the exported generator) per transformer, as the stage builds
    them, and the file a VAE would fall back to."""
    from smfsr.checkpoint import build_transformer
    from smfsr.models.presets import TEACHER_OF

    from .lora import LoraSpec, add_lora

    teacher_preset = TEACHER_OF.get(config.preset, config.preset)
    teacher_path = config.teacher or str(Path(config.output_dir) / "flow.safetensors")
    built = []
    if stage_name == "flow":
        cfg, source = transformer_shape(config.init, teacher_preset, "init")
        model = on_meta(lambda: build_transformer(cfg))
        select_trainable(model, config)
        built.append(("flow transformer", model, source, True))
        return built, config.init
    if stage_name == "meanflow":
        cfg, source = transformer_shape(teacher_path, teacher_preset, "teacher")
        teacher = on_meta(lambda: build_transformer(cfg)).requires_grad_(False)
        student = on_meta(lambda: build_transformer({**cfg, "interval_embedding": True}))
        select_trainable(student, config, NEW_LAYERS)
        built += [("student", student, f"from the teacher ({source})", True), ("teacher", teacher, source, False)]
        return built, teacher_path
    # refine
    init = config.init or str(Path(config.output_dir) / "meanflow.safetensors")
    cfg, source = transformer_shape(init, config.preset, "init")
    generator = on_meta(lambda: build_transformer(cfg))
    select_trainable(generator, config)
    built.append(("generator", generator, source, True))
    if config.weight_vsd:
        tcfg, tsource = transformer_shape(teacher_path, teacher_preset, "teacher")
        teacher = on_meta(lambda: build_transformer(tcfg)).requires_grad_(False)
        add_lora(teacher, LoraSpec(config.fake_lora_rank), seed=config.seed)
        if config.gradient_checkpointing:
            teacher.enable_gradient_checkpointing()
        built.append(("teacher + fake score", teacher, f"{tsource}; fake score: rank-{config.fake_lora_rank} "
                                                        "adapters on it", False))
    return built, init


def dry_run(config: TrainConfig, stage, processes: int, sharding: str) -> str:
    return plan(config, stage, processes, sharding).render()


def plan(config: TrainConfig, stage, processes: int, sharding: str) -> Plan:
    from smfsr.checkpoint import build_vae
    from smfsr.models.presets import vae_config

    result = Plan(stage.name, config.trainable, processes, sharding, config.batch_size, config.crop,
                  config.mixed_precision, config.gradient_checkpointing)
    dtype = weight_dtype(config)
    if stage.name == "vae":
        cfg = vae_config(config.vae_preset or "small")
        vae = on_meta(lambda: build_vae(cfg))
        result.networks.append(count("vae (trained)", vae, f"VAE preset {config.vae_preset or 'small'}",
                                     sharded=True, averaged=True))
        with torch.device("meta"):
            x = torch.empty(config.batch_size, 3, config.crop, config.crop)
        result.activations["codec"] = saved_bytes([vae], lambda: vae(x).sample, config.mixed_precision != "no")
        return result
    transformers, vae_fallback = build_transformers(config, stage.name)
    vae_cfg, vae_source = vae_shape(config, vae_fallback)
    vae = on_meta(lambda: build_vae(vae_cfg)).requires_grad_(False)
    generator = transformers[0][1]
    if config.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
    # activations first, while every weight is float32 (meta tensors know no autocast to mix dtypes)
    interval = bool(generator.config.get("interval_embedding"))
    step_act = transformer_activations(generator, config, vae_cfg, interval=interval)
    if stage.name == "refine":
        result.activations.update(refine_turns(config, result, transformers, vae, vae_cfg, step_act))
    else:
        result.activations[f"{transformers[0][0]} forward with gradient"] = step_act
    for name, model, source, exported in transformers:
        freeze_in(model, dtype)
        trained = exported or name.startswith("teacher + fake")
        result.networks.insert(len([n for n in result.networks if n.name in {t[0] for t in transformers}]),
                               count(name, model, source, sharded=trained, averaged=exported))
    freeze_in(vae, dtype)
    result.networks.append(count("vae", vae, vae_source))
    result.notes.append("text encoders: not loaded by any stage (prompts are precomputed embedding files, "
                        "`smfsr encode-prompt`)")
    if config.trainable == "lora":
        spec = lora_spec(config)
        new = f"; also trained in full: {', '.join(NEW_LAYERS)}" if stage.name == "meanflow" else ""
        result.notes.append(f"LoRA rank {spec.rank}, alpha {spec.alpha or spec.rank}, on {len(spec.targets)} layer "
                            f"kinds{new}")
    return result


def refine_turns(config, result: Plan, transformers, vae, vae_cfg, generator_act: int) -> dict[str, float]:
    """Activations of the three players' turns (they run one after another, so the peak is the largest)."""
    from .backbones import parse_depths
    from .stages.refine import parse_steps

    steps = max(parse_steps(config.refine_steps))
    generator_turn = steps * generator_act
    turns = {}
    if config.weight_gan or config.weight_perceptual:
        channels, side = latent_grid(vae_cfg, config.crop)
        with torch.device("meta"):
            latent = torch.empty(config.batch_size, channels, side, side, requires_grad=True)
        decode_act = saved_bytes([vae], lambda: vae.decode(latent).sample, config.mixed_precision != "no")
        generator_turn += decode_act
        if config.disc_backbone and Path(config.disc_backbone).is_file():  # a feature stack (VGG-16 of ST-LPIPS)
            from smfsr.checkpoint import read_header

            shapes = read_header(config.disc_backbone)[1]
            total = sum(torch.Size(s[1]).numel() for s in shapes.values())
            size = 2 if config.mixed_precision in ("bf16", "fp16") else 4
            result.networks.append(NetworkPlan("disc backbone", config.disc_backbone, total, 0, size * total))
            result.notes.append("the feature-stack backbone's activations are not counted (a VGG-16 at the crop "
                                "size: about 0.1 GB per 512 px image)")
            turns[f"generator ({steps} step(s) with gradient, decode)"] = generator_turn
            if config.weight_vsd:
                turns["fake score forward with gradient"] = transformer_activations(
                    transformers[1][1], config, vae_cfg, interval=False)
            return turns
        backbone, source = backbone_shape(config)
        depths = parse_depths(config.disc_layers, backbone.config.num_hidden_layers, "disc_layers")
        side_px = config.disc_resolution or config.crop
        with torch.device("meta"):
            image = torch.empty(config.batch_size, 3, side_px, side_px, requires_grad=True)
        generator_turn += saved_bytes([backbone], lambda: backbone(pixel_values=image, output_hidden_states=True),
                                      config.mixed_precision != "no")
        freeze_in(backbone, weight_dtype(config))
        result.networks.append(count("disc backbone", backbone, source))
        from .discriminator import DiscriminatorHeads

        width = backbone.config.hidden_size
        heads = on_meta(lambda: DiscriminatorHeads([width] * len(depths), config.disc_width, config.disc_conditioned))
        result.networks.append(count("disc heads", heads, f"{len(depths)} heads of width {config.disc_width}",
                                     sharded=True))
    turns[f"generator ({steps} step(s) with gradient{', decode and backbone' if config.weight_gan else ''})"] = \
        generator_turn
    if config.weight_vsd:
        fake = transformers[1][1]
        turns["fake score forward with gradient"] = transformer_activations(fake, config, vae_cfg, interval=False)
    return turns


def backbone_shape(config: TrainConfig) -> tuple[torch.nn.Module, str]:
    from transformers import AutoConfig, AutoModel, DINOv3ViTConfig

    path = config.disc_backbone
    if path and Path(path).is_dir() and (Path(path) / "config.json").is_file():
        cfg, source = AutoConfig.from_pretrained(path, local_files_only=True), path
    else:
        cfg = DINOv3ViTConfig()
        source = f"{path or 'disc_backbone unset'}: shapes of DINOv3 ViT-S/16 (transformers' default config)"
    model = on_meta(lambda: AutoModel.from_config(cfg))
    return model.requires_grad_(False), source
