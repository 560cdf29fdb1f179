"""The one interface every stage has, so ``train.py`` is only the loop.

A stage builds its networks, names the networks that train (in update order, the first being the
one the EMA follows and the stage exports), turns a data batch into what its losses read, gives
each trained network its loss, and exports and validates its result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TrainConfig
from ..networks import Networks, plain_model, to_bundle

LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


class Stage(ABC):
    """A stage's facts live here, not in ``config.stage ==`` tests elsewhere."""

    name: str = ""
    default_steps: int = 25  # inference steps of its exported model, unless export_steps / val_steps say
    summary_keys: tuple[str, ...] = ()  # config keys its bundles' provenance records beyond the common ones
    exported_name: str = "model"  # what the dry run calls the network it trains and exports

    def degradation(self, config: TrainConfig) -> str:
        """The LR degradation its data needs."""
        return config.degradation

    def needs_teacher(self, config: TrainConfig) -> bool:
        """Whether it trains against a frozen flow teacher (``config.teacher``)."""
        return False

    def check(self, config: TrainConfig) -> None:
        """What it needs, said before any network is built."""
        if self.needs_teacher(config):
            teacher = Path(config.teacher or Path(config.output_dir) / "flow.safetensors")
            if not teacher.exists():
                raise SystemExit(f"config: stage {self.name} needs a flow teacher and {teacher} does not exist; set "
                                 "teacher: PATH (a flow-stage bundle), or train stage flow first (it exports "
                                 f"{Path(config.output_dir) / 'flow.safetensors'})")

    def max_steps(self, config: TrainConfig) -> int:
        """The most steps its exported model may run (0: any); doors refuse more."""
        return 0

    def steps(self, value: int) -> int:
        return value or self.default_steps

    @abstractmethod
    def build(self, config: TrainConfig) -> Networks:
        """The networks: the one that trains, and whatever it trains against."""

    def activation_turns(self, config: TrainConfig, nets: Networks) -> dict[str, float]:
        """For the dry run, on its meta networks: the bytes autograd saves in each turn of a step (the
        turns run one after another). One turn: the trained network's forward with gradient."""
        from ..dry_run import network_turn

        return network_turn(config, nets, self.exported_name)

    def trained(self, config: TrainConfig, nets: Networks) -> list[tuple[str, torch.nn.Module, float]]:
        """(name, network, learning rate) of each network that trains, in update order."""
        return [("model", nets.trained, config.learning_rate)]

    @abstractmethod
    def batch(self, config: TrainConfig, nets: Networks, batch: dict, g: torch.Generator, device: torch.device) -> Any:
        """What the losses read, from a data batch and the micro-batch's random generator."""

    @abstractmethod
    def losses(self, config: TrainConfig, nets: Networks, models: dict[str, torch.nn.Module]) -> dict[str, LossFn]:
        """The loss of each trained network; ``models`` are those networks as accelerate prepared them."""

    def export(self, config: TrainConfig, nets: Networks, weights: dict[str, torch.Tensor]) -> Path:
        """The averaged weights (``networks.averaged_weights``) as a bundle every door loads:
        ``<output_dir>/<stage>.safetensors`` (a LoRA run's adapters merged in); with
        ``export_adapter`` also the adapters alone, ``<stage>-lora.safetensors``."""
        from smfsr.checkpoint import save_bundle

        out = Path(config.output_dir)
        if config.export_adapter and config.trainable == "lora":
            save_adapter(out / f"{config.stage}-lora.safetensors", config, weights)
        bundle = to_bundle(config, nets, plain_model(nets, weights, config), self)
        return save_bundle(out / f"{config.stage}.safetensors", bundle, overwrite=True)

    @torch.no_grad()
    def validate(self, config: TrainConfig, nets: Networks, weights: dict[str, torch.Tensor], device: torch.device
                 ) -> tuple[dict[str, float], torch.Tensor]:
        """PSNR/SSIM of the averaged weights on the validation crops through the real pipeline; returns
        the metrics and a (bicubic | result | ground truth) strip for the log."""
        from kornia.metrics import psnr, ssim

        from smfsr.options import UpscaleOptions, VAETiling
        from smfsr.pipeline import SMFSRUpscaler

        from ..data import SRPairs

        data = SRPairs(config.val_dir, crop=config.val_crop, scale=config.scale, degradation=config.degradation,
                       seed=config.seed, train=False)
        items = [data[i] for i in range(min(config.val_count, len(data)))]
        hr = torch.stack([it["hr"] for it in items])
        lr = torch.stack([it["lr"] for it in items])
        upscaler = SMFSRUpscaler(to_bundle(config, nets, plain_model(nets, weights, config).to(device), self))
        options = UpscaleOptions(steps=self.steps(config.val_steps), vae_tiling=VAETiling.off())
        sr = upscaler(lr, options, seeds=list(range(len(lr))))
        bicubic = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic").clamp(0, 1)
        metrics = {"val/psnr": psnr(sr, hr, 1.0).mean().item(), "val/ssim": ssim(sr, hr, 11).mean().item()}
        return metrics, torch.cat([bicubic, sr, hr], -1)


def save_adapter(path: Path, config: TrainConfig, weights: dict[str, torch.Tensor]) -> Path:
    """The LoRA adapters alone (``<layer>.lora_A.weight`` / ``lora_B``, float32), with their rank, alpha
    and the run that made them in the metadata; the merged bundle is what the doors load."""
    import json

    from safetensors.torch import save_file

    from smfsr.atomic import write_atomically

    from ..lora import adapter_state
    from ..networks import config_summary, lora_spec

    spec = lora_spec(config)
    tensors = {k: v.float().contiguous() for k, v in adapter_state(weights).items()}
    metadata = {"smfsr_format": "lora", "rank": str(spec.rank), "alpha": str(spec.alpha or spec.rank),
                "targets": ",".join(spec.targets), "provenance": json.dumps(config_summary(config))}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
