"""Training stages, each the networks and losses it adds to the one loop (``train.py``):
``vae`` (a codec for small models), ``flow`` (the teacher), ``meanflow`` (ISC distillation) and
``refine`` (GAN + VSD). ``get_stage(name)`` looks one up."""

from ..conditioning import Condition, average_velocity_fn, guided, velocity_fn
from .base import Stage
from .flow import FlowStage, drop_text, flow_matching_loss
from .meanflow import MeanFlowStage, meanflow_loss, student_from_teacher
from .refine import RefineStage
from .vae import VAEStage, latent_statistics, vae_loss

STAGES: dict[str, Stage] = {s.name: s for s in (VAEStage(), FlowStage(), MeanFlowStage(), RefineStage())}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise SystemExit(f"config: stage must be one of {', '.join(STAGES)}, not {name!r}")
    return STAGES[name]


__all__ = ["STAGES", "Condition", "Stage", "average_velocity_fn", "drop_text", "flow_matching_loss", "get_stage",
           "guided", "latent_statistics", "meanflow_loss", "student_from_teacher", "vae_loss", "velocity_fn"]
