"""LoRA adapters (peft) on SMFSR transformers, and merging them back for export.

Used twice by the refinement stage: the generator may train as a LoRA instead of fully, and the
VSD fake score is always a LoRA on a copy of the frozen teacher.
"""

from __future__ import annotations

import torch

# Every projection of the joint attention (image, text and LR streams) and of the feed-forwards.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "to_q_control", "to_k_control", "to_v_control", "to_out_control", "ff.net.0.proj", "ff.net.2",
                  "ff_context.net.0.proj", "ff_context.net.2", "ff_control.net.0.proj", "ff_control.net.2"]


def add_lora(model: torch.nn.Module, rank: int, seed: int = 0) -> torch.nn.Module:
    """Inject rank-``rank`` adapters (alpha = rank, B = 0: the model is unchanged at first) and make
    only them trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.split(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in TARGET_MODULES if any(n == t or n.endswith("." + t) for n in present)]
    torch.manual_seed(seed)  # lora_A's initialisation
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model: W + (alpha / r) B A folded into every adapted layer."""
    from peft.tuners.lora import LoraLayer

    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            state[f"{name}.base_layer.weight"] += module.scaling[adapter] * (b @ a).to(state[f"{name}.base_layer.weight"])
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}
