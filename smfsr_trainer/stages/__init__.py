"""Training stages, each the loss it adds: ``vae`` (a codec for small models), ``flow`` (the teacher)
and ``meanflow`` (ISC distillation)."""

from .common import Condition, average_velocity_fn, guided, velocity_fn
from .flow import drop_text, flow_matching_loss
from .meanflow import meanflow_loss, student_from_teacher
from .vae import latent_statistics, vae_loss

__all__ = ["Condition", "average_velocity_fn", "drop_text", "flow_matching_loss", "guided", "meanflow_loss",
           "student_from_teacher", "latent_statistics", "vae_loss", "velocity_fn"]
