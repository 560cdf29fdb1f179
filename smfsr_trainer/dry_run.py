"""``train.py --dry-run``: every network of a stage built on the meta device, and what one GPU holds.

The stage builds its networks itself (``Stage.build``, as training does) with every file read for
its header only (``safe_read.planning``): nothing is read but headers and config files, nothing is
allocated, a 2.7 B-parameter stage is planned in seconds, and a new stage needs nothing here. A file
that does not exist yet (the teacher a stage before exports) is planned with its preset's shapes. Per network: parameters (total / trainable), where it comes from, and per
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
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from smfsr.checkpoint.safe_read import plan_note, planning

from .config import TrainConfig
from .networks import Networks, freeze_in, lora_spec, weight_dtype

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
                         f"{p['ema'] / GB:5.2f}   {n.source}".rstrip())
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


def count(name: str, model: torch.nn.Module, source: str, *, sharded: bool = False, averaged: bool = False
          ) -> NetworkPlan:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    blocks = [b for attr in ("transformer_blocks", "layer", "layers") for b in getattr(model, attr, [])]
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    return NetworkPlan(name, source, total, trainable, frozen, sharded, averaged, largest)


# --- what a step's forward passes save ------------------------------------------------------------

def latent_grid(vae_cfg: dict, crop: int) -> tuple[int, int]:
    """(channels, side) of the latent of a crop."""
    from smfsr.checkpoint.peek import is_space_to_depth

    factor = vae_cfg["factor"] if is_space_to_depth(vae_cfg) else 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return vae_cfg["latent_channels"], crop // factor


def transformer_activations(model: torch.nn.Module, config: TrainConfig, vae_cfg: dict, tokens: int, *,
                            interval: bool) -> int:
    """What one forward of ``model`` with gradient saves, at the configured batch and crop, with a
    prompt of ``tokens`` tokens."""
    channels, side = latent_grid(vae_cfg, config.crop)
    b, c = config.batch_size, model.config
    with torch.device("meta"):
        z = torch.empty(b, channels, side, side)
        lr = torch.empty(b, channels, side, side)
        text = torch.empty(b, tokens, c.joint_attention_dim)
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


def network_turn(config: TrainConfig, nets: Networks, name: str) -> dict[str, float]:
    """A stage's one turn: the forward of the network it trains with gradient (a transformer on the
    latents, or a VAE on the crops)."""
    model = nets.trained
    if nets.codec is None:  # the network is the codec itself
        with torch.device("meta"):
            x = torch.empty(config.batch_size, 3, config.crop, config.crop)
        return {"codec": saved_bytes([model], lambda: model(x).sample, config.mixed_precision != "no")}
    interval = bool(model.config.get("interval_embedding"))
    return {f"{name} forward with gradient": transformer_activations(
        model, config, dict(nets.codec.vae.config), prompt_tokens(nets), interval=interval)}


def prompt_tokens(nets: Networks) -> int:
    return nets.prompt[0].shape[1] if nets.prompt is not None else 1


def refine_turns(config: TrainConfig, nets: Networks) -> dict[str, float]:
    """The three players' turns of a refine step (one after another, so the peak is the largest):
    the generator's (its steps with gradient, the decode and the feature network the losses read),
    the fake score's, the discriminator's (small beside them: heads on the generator's features)."""
    from .stages.refine import parse_steps

    extra, half = nets.extra, config.mixed_precision != "no"
    vae_cfg = dict(nets.codec.vae.config)
    steps = max(parse_steps(config.refine_steps))
    generator = steps * network_turn(config, nets, "generator").popitem()[1]
    reads = ""
    features = extra.backbone or extra.perceptual
    if features is not None:  # the losses read pixels: the decode, then the feature network
        channels, side = latent_grid(vae_cfg, config.crop)
        with torch.device("meta"):
            latent = torch.empty(config.batch_size, channels, side, side, requires_grad=True)
        generator += saved_bytes([nets.codec.vae], lambda: nets.codec.decode(latent, grad=True), half)
        reads = ", decode"
        if hasattr(features, "model"):  # a transformers backbone (DINOv3)
            side_px = config.disc_resolution or config.crop
            with torch.device("meta"):
                image = torch.empty(config.batch_size, 3, side_px, side_px, requires_grad=True)
            generator += saved_bytes([features.model], lambda: features.model(pixel_values=image,
                                                                               output_hidden_states=True), half)
            reads = ", decode and backbone"
        else:
            plan_note("the feature-stack backbone's activations are not counted (a VGG-16 at the crop size: about "
                      "0.1 GB per 512 px image)")
    turns = {f"generator ({steps} step(s) with gradient{reads})": generator}
    if extra.fake is not None:
        turns["fake score forward with gradient"] = transformer_activations(
            extra.fake, config, vae_cfg, prompt_tokens(nets), interval=False)
    return turns


# --- the plan -----------------------------------------------------------------------------------------

def dry_run(config: TrainConfig, stage, processes: int, sharding: str) -> str:
    return plan(config, stage, processes, sharding).render()


def plan(config: TrainConfig, stage, processes: int, sharding: str) -> Plan:
    """The stage's networks as its own ``build`` makes them, on the meta device with every file read
    for its header only (``planning``): what trains, what each process holds, what a step saves."""
    result = Plan(stage.name, config.trainable, processes, sharding, config.batch_size, config.crop,
                  config.mixed_precision, config.gradient_checkpointing)
    dtype = weight_dtype(config)
    with torch.device("meta"), planning() as notes:
        nets = stage.build(config)
        trained = stage.trained(config, nets)
        exported = trained[0][1]
        named = []
        for i, (name, module, _) in enumerate(trained):
            if module is nets.teacher:  # adapters on the frozen teacher (refine's fake score)
                name = f"teacher + {name.replace('_', ' ')}"
            named.append((stage.exported_name if i == 0 else name, module))
        named += [(name, m) for name, m in nets.named_frozen() if all(m is not other for _, other in named)]
        sharded = [module for _, module, _ in trained]
        for name, module in named:
            freeze_in(module, dtype)  # as the loop keeps them (train.py)
            result.networks.append(count(name, module, "", sharded=any(module is m for m in sharded),
                                         averaged=module is exported))
        # activations with every weight in float32 (meta tensors know no autocast to mix dtypes)
        for _, module in named:
            for p in module.parameters():
                p.data = p.data.float()
        result.activations.update(stage.activation_turns(config, nets))
    result.notes += notes
    result.notes.append("text encoders: not loaded by any stage (prompts are precomputed embedding files, "
                        "`smfsr encode-prompt`)")
    if config.trainable == "lora":
        spec = lora_spec(config)
        full = sorted({n.split(".")[0] for n, p in exported.named_parameters() if p.requires_grad and "lora_" not in n})
        also = f"; also trained in full: {', '.join(full)}" if full else ""
        result.notes.append(f"LoRA rank {spec.rank}, alpha {spec.alpha or spec.rank}, on {len(spec.targets)} layer "
                            f"kinds{also}")
    return result
