"""LoRA adapters (peft) on SMFSR transformers: training any stage as a low-rank update
(``trainable: lora``), the VSD fake score as adapters on the frozen teacher itself, and folding the
adapters back into plain weights for export.

peft names an adapted layer's tensors ``<layer>.base_layer.weight`` and
``<layer>.lora_{A,B}.<adapter>.weight``; every function below that reads a state dict reads those.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

ADAPTER = "default"  # peft's name for the one adapter we inject

# Every projection of the joint attention (image, text and LR streams) and of the feed-forwards.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "to_q_control", "to_k_control", "to_v_control", "to_out_control", "ff.net.0.proj", "ff.net.2",
                  "ff_context.net.0.proj", "ff_context.net.2", "ff_control.net.0.proj", "ff_control.net.2")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = 0.0  # 0: alpha = rank (scaling 1)
    targets: tuple[str, ...] = TARGET_MODULES

    @property
    def scaling(self) -> float:
        return (self.alpha or self.rank) / self.rank


def parse_targets(spec: str) -> tuple[str, ...]:
    """``lora_targets`` of the config: comma-separated layer names (empty: every projection)."""
    names = tuple(t.strip() for t in str(spec or "").split(",") if t.strip())
    return names or TARGET_MODULES


def present_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def add_lora(model: torch.nn.Module, spec: LoraSpec, seed: int = 0, also_train: tuple[str, ...] = ()
             ) -> torch.nn.Module:
    """Inject rank-``spec.rank`` adapters (B = 0: the model is unchanged at first) and make only
    them trainable, plus the parameters whose names contain one of ``also_train`` (layers that
    are new, which a low-rank update of nothing cannot learn)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = present_targets(model, spec.targets)
    if not targets:
        raise SystemExit(f"config: lora_targets {','.join(spec.targets)} name no layer of this network; "
                         f"choose from {','.join(TARGET_MODULES)}")
    torch.manual_seed(seed)  # lora_A's initialisation
    inject_adapter_in_model(LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=targets,
                                       lora_dropout=0.0), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or any(part in name for part in also_train))
        if p.requires_grad:
            p.data = p.data.float()  # peft gives adapters the base layer's dtype; they train in float32
    return model


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The model without its adapters inside the block: the frozen base network (the VSD real score
    is the teacher whose adapters are the fake score). Gradient flags are kept as they were."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:  # peft's enable_adapters also sets requires_grad on the adapters
            p.requires_grad_(flag)


def _adapted_layers(state: dict[str, torch.Tensor]) -> list[str]:
    suffix = f".lora_A.{ADAPTER}.weight"
    return [k[: -len(suffix)] for k in state if k.endswith(suffix)]


@torch.no_grad()
def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A plain model's state dict from an adapted one: W + scaling * B A folded into every adapted
    layer, the adapter tensors dropped and peft's ``base_layer`` names restored."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for layer in _adapted_layers(state):
        a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
        weight = merged[f"{layer}.base_layer.weight"]
        merged[f"{layer}.base_layer.weight"] = weight + scaling * (b.float() @ a.float()).to(weight.dtype)
    return {k.replace(".base_layer.", "."): v for k, v in merged.items()}


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, under the plain model's layer names (``<layer>.lora_A.weight``),
    the layout diffusers' and ComfyUI's LoRA loaders read."""
    return {k.replace(f".{ADAPTER}.", "."): v for k, v in state.items() if ".lora_" in k}

