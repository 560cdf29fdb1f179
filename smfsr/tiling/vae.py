"""Tiled VAE encode/decode that matches the untiled result, with memory set by the tile.

Why tiling a VAE is hard: every GroupNorm normalises with statistics of the *whole* feature map,
and the mid-block self-attention mixes all positions. Tiles that normalise themselves (diffusers'
``enable_tiling``, ComfyUI's 3-pass tiler) differ from the untiled result and need blending.

Exact mode (default):
- The encoder/decoder is walked as a list of local steps (convs, resnets, up/down-sampling) split
  at the global mid-block attention into segments. A segment runs over tiles; each tile carries a
  halo as wide as the segment's receptive field, so its core is computed exactly, and cores are
  stitched without blending.
- GroupNorm statistics are pooled over the tile cores exactly: per sample and group, count, sum and
  sum of squares in float64; mean = S1/n, var = S2/n - mean^2. A GroupNorm's statistics need every
  tile's activation at that layer, so the segment is run once per GroupNorm, each pass stopping at
  the first GroupNorm whose statistics are not yet known. That recomputation (about half a forward
  per GroupNorm) is the price of exactness with memory bounded by the tile: nothing of full size
  is kept but the segment inputs/outputs (the image and latent-resolution tensors).
- The attention runs once over the whole latent-resolution feature map (SDPA, queries chunked).

Fast mode (approximate, and says so): GroupNorm statistics come from one untiled pass over a
downscaled copy of the input, and the attention runs per tile (on the tile and its halo): one
tiled pass in all. Tone can drift from the untiled result and seams are possible.

Works on diffusers ``AutoencoderKL`` and on any VAE with the same structure and the ldm module
names ComfyUI uses (``down``/``up``/``mid.block_1``/``mid.attn_1``/``norm_out``...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SMFSRError
from ..options import VAETiling

Tensor = torch.Tensor
GroupNormFn = Callable[[nn.GroupNorm, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# GroupNorm with given statistics, and the statistics accumulator


def group_norm_with(norm: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """GroupNorm of x (B, C, H, W) using per-(sample, group) mean/var (B, G), in float32 or better."""
    b, c = x.shape[:2]
    g = norm.num_groups
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = x.to(compute).reshape(b, g, -1)
    y = (xg - mean.to(compute)[..., None]) * torch.rsqrt(var.to(compute)[..., None] + norm.eps)
    y = y.reshape(b, c, *x.shape[2:])
    if norm.affine:
        shape = (1, c) + (1,) * (x.ndim - 2)
        weight, bias = (p.to(x.device, compute).reshape(shape) for p in (norm.weight, norm.bias))
        y = y * weight + bias
    return y.to(x.dtype)


def group_moments(norm: nn.GroupNorm, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per (sample, group): sum and sum of squares (float64) and the element count."""
    b = x.shape[0]
    xg = x.reshape(b, norm.num_groups, -1).to(torch.float64)
    return xg.sum(-1), (xg * xg).sum(-1), xg.shape[-1]


class _StatsReady(Exception):
    """Raised to stop a tile's pass once the GroupNorm being collected has been accumulated."""


class _Pass:
    """The GroupNorm callable for one tile pass.

    Applies known statistics; at the first unknown GroupNorm it either accumulates that layer's
    moments over the tile core and stops the pass (exact mode), or computes and records the
    statistics of the tensor it sees (``record=True``: untiled preview / reference passes).
    """

    def __init__(self, known: list[tuple[Tensor, Tensor]], *, accumulator: list | None = None,
                 core: tuple[int, int, int, int] | None = None, input_hw: tuple[int, int] | None = None,
                 record: bool = False, start_index: int = 0):
        self.known, self.accumulator, self.core, self.input_hw, self.record = known, accumulator, core, input_hw, record
        self.index = start_index  # GroupNorms already passed (when resuming a tile mid-segment)

    def __call__(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        i = self.index
        self.index += 1
        if i < len(self.known):
            return group_norm_with(norm, x, *self.known[i])
        if self.record:
            s1, s2, n = group_moments(norm, x)
            mean = s1 / n
            self.known.append((mean, (s2 / n - mean * mean).clamp_min(0)))
            return group_norm_with(norm, x, *self.known[i])
        if self.accumulator is None:
            raise RuntimeError("tiled VAE: a GroupNorm without statistics in the final pass")
        # Map the tile core from segment-input coordinates to this activation's resolution.
        sy, sx = x.shape[-2] / self.input_hw[0], x.shape[-1] / self.input_hw[1]
        y0, y1, x0, x1 = self.core
        core = x[..., round(y0 * sy): round(y1 * sy), round(x0 * sx): round(x1 * sx)]
        s1, s2, n = group_moments(norm, core)
        if self.accumulator:
            self.accumulator[0] += s1
            self.accumulator[1] += s2
            self.accumulator[2] += n
        else:
            self.accumulator.extend([s1, s2, n])
        raise _StatsReady


# --------------------------------------------------------------------------------------------
# The VAE as steps: local functions of a tile, with their receptive radius and scale


@dataclass
class Step:
    run: Callable[[Tensor, GroupNormFn], Tensor]
    radius: float  # receptive radius added, in this step's input pixels
    scale: float = 1.0  # output resolution / input resolution
    is_global: bool = False  # needs the whole feature map (the mid-block attention)
    in_channels: int | None = None  # known for convs; used to check inputs


def _silu(x: Tensor) -> Tensor:
    return F.silu(x)


def _conv(conv: nn.Conv2d) -> Step:
    return Step(lambda x, gn: conv(x), radius=(conv.kernel_size[0] - 1) // 2 * conv.dilation[0],
                in_channels=conv.in_channels)


def _norm_act(norm: nn.GroupNorm) -> Step:
    return Step(lambda x, gn: _silu(gn(norm, x)), radius=0)


def _resnet(block: nn.Module) -> Step:
    """diffusers ResnetBlock2D / ldm ResnetBlock without time embedding."""
    conv_shortcut = getattr(block, "conv_shortcut", None) or getattr(block, "nin_shortcut", None)
    out_scale = getattr(block, "output_scale_factor", 1.0)

    def run(x: Tensor, gn: GroupNormFn) -> Tensor:
        h = block.conv1(_silu(gn(block.norm1, x)))
        h = block.conv2(_silu(gn(block.norm2, h)))
        skip = conv_shortcut(x) if conv_shortcut is not None else x
        return (skip + h) / out_scale

    return Step(run, radius=2)


def _upsample(conv: nn.Conv2d) -> Step:
    def run(x: Tensor, gn: GroupNormFn) -> Tensor:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    return Step(run, radius=1, scale=2.0)  # a 3x3 conv after x2 nearest reaches 1 input px


def _downsample(conv: nn.Conv2d) -> Step:
    def run(x: Tensor, gn: GroupNormFn) -> Tensor:
        return conv(F.pad(x, (0, 1, 0, 1)))  # stride-2 3x3 conv, padded right/bottom as SD does

    return Step(run, radius=2, scale=0.5)


def _attention(attn: nn.Module) -> Step:
    """Single-head spatial self-attention of the mid block (diffusers ``Attention`` or ldm ``AttnBlock``)."""
    diffusers_style = hasattr(attn, "to_q")

    def run(x: Tensor, gn: GroupNormFn) -> Tensor:
        b, c, h, w = x.shape
        norm = attn.group_norm if diffusers_style else attn.norm
        t = gn(norm, x)
        if diffusers_style:
            t = t.reshape(b, c, h * w).transpose(1, 2)
            q, k, v = attn.to_q(t), attn.to_k(t), attn.to_v(t)
        else:  # ldm: 1x1 convs
            q, k, v = (m(t).reshape(b, c, h * w).transpose(1, 2) for m in (attn.q, attn.k, attn.v))
        heads = getattr(attn, "heads", 1)
        q, k, v = (z.reshape(b, h * w, heads, -1).transpose(1, 2) for z in (q, k, v))
        out = chunked_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        if diffusers_style:
            out = attn.to_out[1](attn.to_out[0](out)).transpose(1, 2).reshape(b, c, h, w)
            if attn.residual_connection:
                out = out + x
            return out / attn.rescale_output_factor
        out = attn.proj_out(out.transpose(1, 2).reshape(b, c, h, w))
        return x + out

    return Step(run, radius=0, is_global=True)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, max_scores: int = 2**27) -> Tensor:
    """SDPA with the queries in chunks, so the score matrix never exceeds ``max_scores`` entries."""
    n = q.shape[-2]
    chunk = max(1, max_scores // max(1, k.shape[-2] * q.shape[0] * q.shape[1]))
    if chunk >= n:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + chunk, :], k, v) for i in range(0, n, chunk)], dim=-2)


def _first(*candidates):
    return next((c for c in candidates if c is not None), None)


def decoder_steps(vae: nn.Module) -> list[Step]:
    """post_quant_conv, decoder conv_in, mid block, up blocks, norm_out, conv_out."""
    ldm = not hasattr(vae.decoder, "mid_block")
    dec = vae.decoder
    steps = []
    pqc = getattr(vae, "post_quant_conv", None)
    if isinstance(pqc, nn.Conv2d):
        steps.append(_conv(pqc))
    steps.append(_conv(dec.conv_in))
    if ldm:
        steps += [_resnet(dec.mid.block_1), _attention(dec.mid.attn_1), _resnet(dec.mid.block_2)]
        for level in reversed(dec.up):
            steps += [_resnet(b) for b in level.block]
            if hasattr(level, "upsample"):
                steps.append(_upsample(level.upsample.conv))
        steps += [_norm_act(dec.norm_out), _conv(dec.conv_out)]
    else:
        mid = dec.mid_block
        steps.append(_resnet(mid.resnets[0]))
        for attn, res in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                steps.append(_attention(attn))
            steps.append(_resnet(res))
        for up in dec.up_blocks:
            steps += [_resnet(r) for r in up.resnets]
            if up.upsamplers:
                steps.append(_upsample(up.upsamplers[0].conv))
        steps += [_norm_act(dec.conv_norm_out), _conv(dec.conv_out)]
    return steps


def encoder_steps(vae: nn.Module) -> list[Step]:
    """encoder conv_in, down blocks, mid block, norm_out, conv_out, quant_conv (-> moments)."""
    ldm = not hasattr(vae.encoder, "mid_block")
    enc = vae.encoder
    steps = [_conv(enc.conv_in)]
    if ldm:
        for level in enc.down:
            steps += [_resnet(b) for b in level.block]
            if hasattr(level, "downsample"):
                steps.append(_downsample(level.downsample.conv))
        steps += [_resnet(enc.mid.block_1), _attention(enc.mid.attn_1), _resnet(enc.mid.block_2)]
        steps += [_norm_act(enc.norm_out), _conv(enc.conv_out)]
    else:
        for down in enc.down_blocks:
            steps += [_resnet(r) for r in down.resnets]
            if down.downsamplers:
                steps.append(_downsample(down.downsamplers[0].conv))
        mid = enc.mid_block
        steps.append(_resnet(mid.resnets[0]))
        for attn, res in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                steps.append(_attention(attn))
            steps.append(_resnet(res))
        steps += [_norm_act(enc.conv_norm_out), _conv(enc.conv_out)]
    qc = getattr(vae, "quant_conv", None)
    if isinstance(qc, nn.Conv2d):
        steps.append(_conv(qc))
    return steps


# --------------------------------------------------------------------------------------------
# running steps over tiles


@dataclass
class Segment:
    steps: list[Step]

    @property
    def scale(self) -> float:
        return math.prod(s.scale for s in self.steps)

    @property
    def align(self) -> int:
        """Tile edges must fall on multiples of this (input px) so down-sampled grids line up."""
        lowest, running = 1.0, 1.0
        for s in self.steps:
            running *= s.scale
            lowest = min(lowest, running)
        return round(1 / lowest)

    @property
    def halo(self) -> int:
        """Receptive radius in input px (rounded up, plus one for nearest-neighbour alignment)."""
        total, scale = 0.0, 1.0
        for s in self.steps:
            total += s.radius / scale
            scale *= s.scale
        return _round_up(math.ceil(total) + 1, self.align)

    def __call__(self, x: Tensor, gn: GroupNormFn) -> Tensor:
        for s in self.steps:
            x = s.run(x, gn)
        return x


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _split(steps: list[Step], mode: str) -> list[Segment | Step]:
    """Exact mode: global steps stand alone between local segments. Fast mode: all local."""
    plan: list[Segment | Step] = []
    for s in steps:
        if s.is_global and mode == "exact":
            plan.append(s)
        elif plan and isinstance(plan[-1], Segment):
            plan[-1].steps.append(s)
        else:
            plan.append(Segment([s]))
    return plan


def _tiles(h: int, w: int, core: int, halo: int) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """(core box, extended box) pairs; cores partition the input, boxes are (y0, y1, x0, x1)."""
    out = []
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            y1, x1 = min(y0 + core, h), min(x0 + core, w)
            out.append(((y0, y1, x0, x1), (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo))))
    return out


class _TileRun:
    """One tile's progress through a segment, resumable at step boundaries.

    A stats pass stops inside the step holding the next unknown GroupNorm; keeping that step's
    input (while the cache budget allows) lets the next pass resume there instead of recomputing
    the tile from the segment input.
    """

    def __init__(self, core: tuple[int, int, int, int], ext: tuple[int, int, int, int]):
        self.core, self.ext = core, ext
        self.step, self.gn_index, self.cached = 0, 0, None

    def local_core(self) -> tuple[int, int, int, int]:
        (cy0, cy1, cx0, cx1), (ey0, ey1, ex0, ex1) = self.core, self.ext
        return cy0 - ey0, cy1 - ey0, cx0 - ex0, cx1 - ex0

    def run(self, segment: Segment, x: Tensor, gn_args: dict) -> tuple[Tensor | None, tuple[int, int, Tensor] | None]:
        """Run from the resume point; returns (output, None) or (None, resume point) if stopped."""
        ey0, ey1, ex0, ex1 = self.ext
        h = self.cached if self.cached is not None else x[..., ey0:ey1, ex0:ex1]
        start = self.step if self.cached is not None else 0
        gn = _Pass(start_index=self.gn_index if self.cached is not None else 0, core=self.local_core(),
                   input_hw=(ey1 - ey0, ex1 - ex0), **gn_args)
        for j in range(start, len(segment.steps)):
            at_step = (j, gn.index, h)
            try:
                h = segment.steps[j].run(h, gn)
            except _StatsReady:
                return None, at_step
        return h, None


def run_segment(segment: Segment, x: Tensor, core: int, mode: str, cache_budget: int = 0,
                progress: Callable[[], None] | None = None) -> Tensor:
    """Run a local segment over tiles of x (B, C, H, W); exact or fast GroupNorm statistics."""
    h, w = x.shape[-2:]
    align, halo, scale = segment.align, segment.halo, segment.scale
    if h % align or w % align:
        raise SMFSRError(f"tiled VAE: input {h}x{w} must be a multiple of {align}")
    core = _round_up(max(core, align), align)
    if core >= h and core >= w:  # one tile: plain untiled run with its own statistics
        return segment(x, _Pass([], record=True))
    tiles = [_TileRun(c, e) for c, e in _tiles(h, w, core, halo)]

    if mode == "exact":
        known = pooled_statistics(segment, x, tiles, cache_budget, progress)
    else:
        known = preview_statistics(segment, x, core)

    out = None
    for tile in tiles:
        y, _ = tile.run(segment, x, dict(known=known))
        tile.cached = None
        (cy0, cy1, cx0, cx1), (ly0, _, lx0, _) = tile.core, tile.local_core()
        oy, ox, ch, cw = round(ly0 * scale), round(lx0 * scale), round((cy1 - cy0) * scale), round((cx1 - cx0) * scale)
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], round(h * scale), round(w * scale))
        out[..., round(cy0 * scale): round(cy0 * scale) + ch, round(cx0 * scale): round(cx0 * scale) + cw] = \
            y[..., oy: oy + ch, ox: ox + cw]
        if progress:
            progress()
    return out


def preview_statistics(segment: Segment, x: Tensor, core: int) -> list[tuple[Tensor, Tensor]]:
    """Fast mode: GroupNorm statistics of one untiled pass over x downscaled to about one tile.

    Area downscaling averages away fine detail and shrinks the spread of noise-like inputs, so
    the preview's per-channel mean and standard deviation are matched back to the full input's.
    """
    h, w = x.shape[-2:]
    factor = 1
    while max(h, w) / factor > core and min(h, w) / (2 * factor) >= 2 * segment.align:
        factor *= 2
    size = (_round_up(max(1, h // factor), segment.align), _round_up(max(1, w // factor), segment.align))
    full = x.float()
    preview = F.interpolate(full, size=size, mode="area")
    dims = (-2, -1)
    preview = (preview - preview.mean(dims, keepdim=True)) / (preview.std(dims, keepdim=True) + 1e-6)
    preview = preview * full.std(dims, keepdim=True) + full.mean(dims, keepdim=True)
    recorder = _Pass([], record=True)
    segment(preview.to(x.dtype), recorder)
    return recorder.known


def pooled_statistics(segment: Segment, x: Tensor, tiles: list[_TileRun], cache_budget: int = 0,
                      progress: Callable[[], None] | None = None) -> list[tuple[Tensor, Tensor]]:
    """Every GroupNorm's (mean, var), pooled exactly over the cores of ``tiles``: one pass per
    GroupNorm, each pass stopping at the first GroupNorm whose statistics are still unknown.
    Tiles resume from their cached step inputs while those fit in ``cache_budget`` bytes."""
    known: list[tuple[Tensor, Tensor]] = []
    cached_bytes = 0
    while True:
        accumulator: list = []
        for tile in tiles:
            _, resume = tile.run(segment, x, dict(known=known, accumulator=accumulator))
            if resume is None:
                return known  # a pass that met no unknown GroupNorm: all statistics are known
            step, gn_index, tensor = resume
            old = tile.cached.numel() * tile.cached.element_size() if tile.cached is not None else 0
            new = tensor.numel() * tensor.element_size()
            if cached_bytes - old + new <= cache_budget:
                tile.step, tile.gn_index, tile.cached = step, gn_index, tensor
                cached_bytes += new - old
        s1, s2, n = accumulator
        mean = s1 / n
        known.append((mean, (s2 / n - mean * mean).clamp_min(0)))
        if progress:
            progress()


# --------------------------------------------------------------------------------------------
# tile sizes and the public entry points


def _bytes_per_input_px(steps: list[Step], channels_at: list[int], itemsize: int) -> float:
    """Peak activation bytes per segment-input pixel: the widest feature map (channels x scale^2)
    times 6 live tensors in a resnet (input, norm, activation, conv out, shortcut, conv workspace)."""
    peak, scale = 0.0, 1.0
    for s, c in zip(steps, channels_at):
        scale *= s.scale
        peak = max(peak, c * scale * scale)
    return peak * itemsize * 6


def _bytes(device: torch.device, explicit: int | None, cuda_share: int, cpu_default: int) -> int:
    """An explicit budget, else 1/cuda_share of free CUDA memory, else a fixed CPU default."""
    if explicit is not None:
        return explicit
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // cuda_share
    return cpu_default


def _budget(device: torch.device, tiling: VAETiling) -> int:
    return _bytes(device, tiling.memory_budget, 2, 1 << 30)


def _cache_budget(device: torch.device, tiling: VAETiling) -> int:
    return _bytes(device, tiling.cache_budget, 4, 2 << 30)


def _channels(vae: nn.Module, steps: list[Step], x: Tensor) -> list[int]:
    """Output channels of each step, found by running the steps on a tiny input."""
    probe = x[:1, :, : min(x.shape[-2], 32), : min(x.shape[-1], 32)]
    channels, gn = [], _Pass([], record=True)
    with torch.no_grad():
        for s in steps:
            probe = s.run(probe, gn)
            channels.append(probe.shape[1])
    return channels


def auto_tile(vae: nn.Module, steps: list[Step], x: Tensor, tiling: VAETiling) -> int:
    """The largest square core (input px) whose extended tile fits the memory budget."""
    seg = Segment([s for s in steps if not s.is_global])
    per_px = _bytes_per_input_px(steps, _channels(vae, steps, x), x.element_size())
    side = int(math.sqrt(_budget(x.device, tiling) / per_px)) - 2 * seg.halo
    return max(_round_up(max(side, 1), seg.align), 2 * seg.halo, seg.align * 4)


def _run(steps: list[Step], x: Tensor, core: int, mode: str, cache_budget: int) -> Tensor:
    plan = _split(steps, mode)
    unit, scale = 1.0, 1.0  # the first segment's tile is in input px; later ones scale with the map
    for part in plan:
        if isinstance(part, Segment) and core * unit < part.halo:
            raise SMFSRError(
                f"VAE tile {core} is smaller than the halo this VAE needs ({math.ceil(part.halo / unit)} in the same "
                "units); use a larger tile"
            )
        if isinstance(part, Segment):
            unit *= part.scale
    with torch.no_grad():
        for part in plan:
            if isinstance(part, Segment):
                x = run_segment(part, x, max(1, round(core * scale)), mode, cache_budget)
                scale *= part.scale
            else:
                x = part.run(x, _Pass([], record=True))  # global attention on the whole map
    return x


def _check_input(x: Tensor, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise SMFSRError(f"tiled VAE {what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")


def tiled_decode(vae: nn.Module, z: Tensor, tiling: VAETiling | None = None) -> Tensor:
    """Raw VAE latent (B, C, h, w) -> image in [-1, 1], tiled. Tile core in latent px."""
    tiling = tiling or VAETiling()
    steps = decoder_steps(vae)
    _check_input(z, steps[0].in_channels, "decode")
    core = tiling.tile or auto_tile(vae, steps, z, tiling)
    return _run(steps, z, core, tiling.mode, _cache_budget(z.device, tiling))


def tiled_encode_moments(vae: nn.Module, x: Tensor, tiling: VAETiling | None = None) -> Tensor:
    """Image in [-1, 1] (B, 3, H, W) -> posterior moments (B, 2C, H/f, W/f), tiled. The tile core
    is ``tiling.tile`` latent px, i.e. that times the encoder's downscale factor f in image px."""
    tiling = tiling or VAETiling()
    steps = encoder_steps(vae)
    _check_input(x, steps[0].in_channels, "encode")
    factor = round(1 / Segment(steps).scale)
    core = tiling.tile * factor if tiling.tile else auto_tile(vae, steps, x, tiling)
    return _run(steps, x, core, tiling.mode, _cache_budget(x.device, tiling))
