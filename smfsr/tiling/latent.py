"""Latent tiles for the velocity net: overlapping tiles blended with Gaussian weights.

Official settings (method.md 3, step 6): 64x64 latent tiles, overlap 24, weights
exp(-(i - (T-1)/2)^2 / (2 T^2 var)) with var = 0.01 per axis. Here any tile shape works, tiles are
centred symmetrically on both axes (the official y-axis uses T/2, an inherited slip), and the last
row and column are anchored to the edge so every tile is full size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

GAUSSIAN_VAR = 0.01
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Tile:
    y0: int
    y1: int
    x0: int
    x1: int

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.y0 : self.y1, self.x0 : self.x1]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of ``tile``, the last one flush with the edge."""
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be >= 0 and smaller than the tile ({tile})")
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def tile_grid(height: int, width: int, tile: tuple[int, int], overlap: int) -> list[Tile]:
    th, tw = min(tile[0], height), min(tile[1], width)
    return [
        Tile(y, y + th, x, x + tw)
        for y in tile_starts(height, th, overlap)
        for x in tile_starts(width, tw, overlap)
    ]


def gaussian_weights(height: int, width: int, var: float = GAUSSIAN_VAR) -> torch.Tensor:
    """Separable Gaussian blending weights of shape (height, width), peak 1 at the centre."""

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        return torch.exp(-((i - (n - 1) / 2) ** 2) / (n * n * 2 * var))

    return axis(height)[:, None] * axis(width)[None, :]


def tiled_apply(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tile: tuple[int, int],
    overlap: int,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Run ``fn`` on aligned crops of ``inputs`` (B, C, H, W) and blend the outputs.

    With one tile covering everything this is exactly ``fn(*inputs)``. ``progress(done, total)`` is
    called after each tile; an exception raised there (an interrupt) stops the loop.
    """
    height, width = inputs[0].shape[-2:]
    tiles = tile_grid(height, width, tile, overlap)
    if len(tiles) == 1:
        out = fn(*inputs)
        if progress:
            progress(1, 1)
        return out

    out = weight_sum = None
    weights = gaussian_weights(tiles[0].y1 - tiles[0].y0, tiles[0].x1 - tiles[0].x0)
    for done, t in enumerate(tiles, 1):
        pred = fn(*(t.crop(x) for x in inputs)).float()
        if out is None:
            out = torch.zeros(*pred.shape[:-2], height, width, device=pred.device)
            weight_sum = torch.zeros(height, width, device=pred.device)
            weights = weights.to(pred.device)
        t.crop(out).add_(pred * weights)
        t.crop(weight_sum).add_(weights)
        if progress:
            progress(done, len(tiles))
    return (out / weight_sum).to(inputs[0].dtype)
