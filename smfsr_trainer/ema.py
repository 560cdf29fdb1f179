"""Exponential moving average of the weights that train, kept in float32.

Only trainable parameters are averaged: frozen ones never change, and for a LoRA or a control-only
run of a 2.7 B network a float32 copy of everything would cost 11 GB for nothing. Under FSDP the
parameters are sharded (DTensors) and so is the average; ``full()`` gathers it (every process
must call it) and ``load()`` lays a full average out like the model's parameters.

A LoRA's A and B are averaged separately, so its export is W + s EMA(B) EMA(A), not the average of
the trained weights, W + s EMA(B A): the two differ by the covariance of B and A within the
averaging window. Averaging B A itself would keep a float32 matrix of every adapted layer's full
size (about 9 GB for SD3.5-medium), the memory a LoRA exists to save. Measured by
``python -m bench.ema_lora`` (the tiny model, rank 4, lr 3e-3, decay 0.9, its first 40 steps, where
the adapters move fastest): the difference is 5 % of the averaged delta (7.7 % in the worst
layer) and 1.2 % of the base weight; it shrinks as the adapters settle and as the window grows.
"""

from __future__ import annotations

import torch


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")  # a torch.distributed DTensor


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out as ``param`` is: the same shard when it is sharded."""
    value = value.detach().float()
    if _is_sharded(param) and not _is_sharded(value):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(param.device)


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights."""
        for k, p in model.named_parameters():
            if k in self.shadow:
                if _is_sharded(p) and not _is_sharded(self.shadow[k]):  # built before the model was sharded
                    self.shadow[k] = _like(self.shadow[k], p)
                self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def full(self) -> dict[str, torch.Tensor]:
        """The whole average as plain CPU tensors (collective under FSDP: call it on every process)."""
        return {k: (v.full_tensor() if _is_sharded(v) else v).detach().cpu() for k, v in self.shadow.items()}

    def load(self, values: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        """Restore a full average (from ``full()``) onto ``model``'s parameter layout. Entries for
        weights that do not train here (older checkpoints averaged everything) are ignored."""
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(values))
        if missing:
            raise SystemExit(f"checkpoint EMA lacks weights this run trains ({', '.join(missing[:3])}...): it was "
                             "saved with other settings (trainable, lora_*); resume with the settings that wrote it")
        self.shadow = {k: _like(values[k], p) for k, p in params.items()}

