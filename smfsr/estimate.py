"""What a job will cost, said before it starts: output size, latent tiles, and a time measured on
this machine by a short warm-up (one network evaluation on one tile, and the codec on a small
image), so a 24-megapixel job on a CPU is announced instead of starting without a word.

The estimate is linear: the network's time per tile x tiles x steps, plus the codec's time per
pixel x pixels (the exact tiled VAE is linear in pixels outside its small global attention). A
warm-up tile is capped at ``WARMUP_TOKENS`` tokens and its time scaled up by the token count,
which slightly underestimates large tiles (attention grows with the square; for SD3.5-medium at
1024 tokens it is about a tenth of the work).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .tiling.latent import tile_grid

WARMUP_TOKENS = 256  # the largest warm-up tile, in transformer tokens
WARMUP_PIXELS = 128 * 128  # the codec's warm-up image
WARMUP_SECONDS = 0.5  # fast warm-ups are repeated this long
ESTIMATE_FROM_PIXELS = 1_000_000  # smaller outputs are not worth a warm-up: seconds at most on any device
ANNOUNCE_SECONDS = 30.0  # jobs estimated longer than this are announced ...
ANNOUNCE_PIXELS = 8_000_000  # ... and so is every output this large, whatever the estimate


@dataclass(frozen=True)
class JobPlan:
    """The shape of one image's upscale."""

    output: tuple[int, int]  # (height, width) of the result
    working: tuple[int, int]  # the image size the network works at
    latent: tuple[int, int]
    tile: tuple[int, int]  # latent px per tile
    tiles: int
    steps: int

    @property
    def output_pixels(self) -> int:
        return self.output[0] * self.output[1]

    @property
    def evaluations(self) -> int:
        return self.tiles * self.steps

    def describe(self, seconds: float | None = None) -> str:
        h, w = self.output
        text = (f"{w}x{h} output ({self.output_pixels / 1e6:.1f} MP), {self.tiles} latent tile(s) x "
                f"{self.steps} step(s)")
        return text if seconds is None else f"{text}: about {format_duration(seconds)}"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_job(upscaler, height: int, width: int, settings) -> JobPlan:
    """The plan of an upscale of one (height x width) image with ``upscaler`` at ``settings``."""
    from .pipeline import output_size

    working = upscaler.working_size(height, width)
    down = upscaler.codec.downscale if upscaler.codec is not None else 1
    latent = (working[0] // down, working[1] // down)
    tile = (settings.tile, settings.tile) if settings.tile else latent
    tiles = len(tile_grid(*latent, tile, settings.overlap))
    return JobPlan(output_size(height, width, settings.scale), working, latent,
                   (min(tile[0], latent[0]), min(tile[1], latent[1])), tiles, settings.steps)


class Estimator:
    """Seconds for a plan on the upscaler's device, from warm-ups measured once per tile shape."""

    def __init__(self, upscaler):
        self.upscaler = upscaler
        self.per_tile: dict[tuple[int, int], float] = {}
        self.per_pixel: float | None = None

    def seconds(self, plan: JobPlan) -> float:
        if plan.tile not in self.per_tile:
            self.per_tile[plan.tile] = self._time_network(plan.tile)
        if self.per_pixel is None:
            self.per_pixel = self._time_codec()
        working_pixels = plan.working[0] * plan.working[1]
        return self.per_tile[plan.tile] * plan.evaluations + self.per_pixel * working_pixels

    def _time_network(self, tile: tuple[int, int]) -> float:
        """One evaluation of the network on one tile (or on a smaller one, scaled by tokens)."""
        up = self.upscaler
        patch = up.patch_size
        tokens = (tile[0] // patch) * (tile[1] // patch)
        shrink = min(1.0, math.sqrt(WARMUP_TOKENS / max(tokens, 1)))
        size = [max(patch, int(side * shrink) // patch * patch) for side in tile]
        z = torch.zeros(1, up.transformer.config.in_channels, *size, device=up.device, dtype=up.dtype)
        embeds, pooled = up.text(1)
        t = torch.ones(1, device=up.device)
        r = torch.zeros(1, device=up.device) if up.transformer.is_average_velocity else None
        with torch.no_grad():
            elapsed = _time_of(lambda: up.transformer(z, z, embeds, pooled, t, r), up.device)
        return elapsed * tokens / ((size[0] // patch) * (size[1] // patch))

    def _time_codec(self) -> float:
        """Seconds per working-size pixel to encode the LR image and decode the result."""
        codec = self.upscaler.codec
        if codec is None or codec.lossless:
            return 0.0
        side = int(math.sqrt(WARMUP_PIXELS)) // codec.downscale * codec.downscale
        image = torch.zeros(1, 3, side, side, device=self.upscaler.device)

        def run():
            mean, _ = codec.moments(image)
            codec.decode_raw(mean)

        with torch.no_grad():
            return _time_of(run, self.upscaler.device) / (side * side)


def _time_of(run, device: torch.device) -> float:
    """The time of one ``run()``, never taken from a first call: that one sets up (allocations, CUDA
    kernels and their autotuning, block swap's first transfers) and can be many times slower. After
    it, a slow call (over 1 s) is timed once; fast ones (milliseconds, so noisy) are repeated for
    about WARMUP_SECONDS and the median kept."""
    def timed_call() -> float:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed_call()  # the first call, untimed
    times = [timed_call()]
    while times[0] <= 1.0 and len(times) < 25 and sum(times) <= WARMUP_SECONDS:
        times.append(timed_call())
    times.sort()
    return times[len(times) // 2]


def announcement(upscaler, height: int, width: int, settings) -> str | None:
    """A line for a job worth announcing (long by the estimate, or a large output), else None."""
    plan = plan_job(upscaler, height, width, settings)
    if plan.output_pixels < ESTIMATE_FROM_PIXELS:
        return None
    if getattr(upscaler, "compiled", False):
        # a warm-up would compile its own tile shape, and the job's first call compiles the job's:
        # no time measured now says what the job will take
        return plan.describe() + f" on {upscaler.device.type}: compiling (torch.compile), no estimate"
    seconds = upscaler.estimator.seconds(plan)
    if seconds < ANNOUNCE_SECONDS and plan.output_pixels < ANNOUNCE_PIXELS:
        return None
    return plan.describe(seconds) + f" on {upscaler.device.type} (estimated from a warm-up)"
