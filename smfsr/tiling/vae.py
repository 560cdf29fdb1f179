"""Exact tiled VAE, segment by segment: tiled == untiled, at about untiled speed.

Why tiling a VAE is hard: every GroupNorm normalises with statistics of the *whole* feature map,
and the mid-block self-attention mixes all positions. Tiles that normalise themselves (diffusers'
``enable_tiling``, ComfyUI's tiled VAE) differ from the untiled result and need blending.

Here the network is cut at its GroupNorm statistics points into segments: between two such
points an SD-style VAE has only a GroupNorm + SiLU + one 3x3 conv (or an up/down-sampling conv),
so a segment needs a halo of a pixel or two, not the receptive field of a whole chain. Each segment
runs over all tiles in turn: a tile's input (core + halo) goes to the device, is normalised with
the statistics its map was given when it was written, convolved, and its core is written into the
segment's full-size output map, whose per-channel moments (count, mean, sum of squared deviations,
merged over the tiles in float64: ``Moments``) it adds to as it goes, so the next GroupNorm,
whatever its grouping, gets the exact statistics of the untiled map. The full-size maps between
segments live outside the tile's device memory (pinned host memory on a GPU, plain RAM on a CPU):
device memory is set by the tile; the host holds about two maps (a resnet's input, which its
output overwrites in place, even where it has fewer channels, and its middle). The mid-block
attention is global and exact: it runs once over the whole (latent-resolution) map, queries chunked.

Works on diffusers ``AutoencoderKL`` and on the ldm-named VAE ComfyUI holds (``first_stage_model``:
``down``/``up``/``mid.block_1``/``mid.attn_1``/``norm_out``...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SMFSRError
from ..options import VAETiling

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# statistics: per-channel sums, any grouping later


@dataclass
class Moments:
    """Running per-(sample, channel) count, mean and sum of squared deviations of a map's values.

    A tile's core is summed along its rows in its own dtype (sums of at most a tile's width of
    values, and of their squares), everything above that in float64, so the tile costs two fast
    reductions and no float64 copy. Tiles merge with Chan et al.'s pairwise update:

        n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n

    Within a tile, M2 = S2 - S1^2 / n: the variance's relative error grows with (mean / std)^2,
    about 4e-7 at a mean of 5 standard deviations (float32 rows of 512; float32 var_mean: 6e-8).
    """

    mean: Tensor | None = None
    m2: Tensor | None = None
    n: int = 0

    def add(self, core: Tensor) -> None:
        x = core.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        n_b = x.shape[-2] * x.shape[-1]
        s1 = x.sum(-1).sum(-1, dtype=torch.float64)
        s2 = torch.linalg.vector_norm(x, dim=-1).to(torch.float64).pow(2).sum(-1)
        mean = (s1 / n_b).cpu()
        m2 = (s2 - s1 * (s1 / n_b)).clamp_min(0).cpu()
        if self.mean is None:
            self.mean, self.m2, self.n = mean, m2, n_b
            return
        n = self.n + n_b
        delta = mean - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n_b / n)
        self.n = n

    def group_stats(self, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
        """(mean, var) per (sample, group) for ``norm``'s grouping: the channels' moments merged
        the same way (each channel holds ``n`` values)."""
        b, c = self.mean.shape
        means, m2 = self.mean.reshape(b, norm.num_groups, -1), self.m2.reshape(b, norm.num_groups, -1)
        mean = means.mean(-1)
        spread = m2.sum(-1) + self.n * (means - mean[..., None]).pow(2).sum(-1)
        return mean, spread / (self.n * means.shape[-1])


def group_norm_with(norm: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """GroupNorm of x (B, C, H, W) with given per-(sample, group) statistics, computed in float32.

    One fused pass: inference-mode batch norm over (1, B*C, H, W) with each channel given its
    group's statistics (scale = weight / sqrt(var + eps), shift = bias - mean * scale, as torch's
    own GroupNorm kernel applies them)."""
    b, c = x.shape[:2]
    per_group = c // norm.num_groups
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32

    def per_channel(stat: Tensor) -> Tensor:
        return stat.repeat_interleave(per_group, dim=1).reshape(b * c).to(x.device, compute)

    weight = norm.weight.to(x.device, compute).repeat(b) if norm.affine else None
    bias = norm.bias.to(x.device, compute).repeat(b) if norm.affine else None
    y = F.batch_norm(x.to(compute).reshape(1, b * c, *x.shape[2:]), per_channel(mean), per_channel(var),
                     weight, bias, training=False, eps=norm.eps)
    return y.reshape(x.shape).to(x.dtype)


@dataclass
class Map:
    """A full-size activation map between segments, kept in host memory, and its moments."""

    data: Tensor
    moments: Moments = field(default_factory=Moments)


# --------------------------------------------------------------------------------------------
# segments: the VAE cut at its GroupNorm statistics points


@dataclass
class Segment:
    """out = combine(body(norm(primary crop)), skip core), tile by tile.

    ``scale`` is output / primary resolution (1, 2: nearest upsampling, 0.5: stride-2 downsampling);
    ``halo`` the primary pixels a core needs on each side; ``skip`` a map at the output resolution
    read at the core only (a resnet's shortcut), which the output may overwrite in place."""

    primary: str
    output: str
    body: Callable[[Tensor], Tensor]
    out_channels: int
    halo: int = 1
    scale: float = 1.0
    norm: nn.GroupNorm | None = None
    skip: str | None = None
    combine: Callable[[Tensor, Tensor], Tensor] | None = None
    is_global: bool = False  # the attention: the whole map at once


def _resnet(block: nn.Module, x: str, out: str, tag: str) -> list[Segment]:
    """A ResnetBlock2D (diffusers) / ResnetBlock (ldm) without time embedding: two segments."""
    shortcut = getattr(block, "conv_shortcut", None) or getattr(block, "nin_shortcut", None)
    out_scale = getattr(block, "output_scale_factor", 1.0)
    middle = f"{tag}.h"

    def combine(body: Tensor, skip: Tensor) -> Tensor:  # body is the tile's own conv output: added to in place
        body = body.add_(shortcut(skip) if shortcut is not None else skip)
        return body.div_(out_scale) if out_scale != 1.0 else body

    # in place: a segment with a norm hands its body a fresh tensor (the normalised tile)
    return [
        Segment(x, middle, lambda t: block.conv1(F.silu(t, inplace=True)), block.conv1.out_channels, norm=block.norm1),
        Segment(middle, out, lambda t: block.conv2(F.silu(t, inplace=True)), block.conv2.out_channels,
                norm=block.norm2, skip=x, combine=combine),
    ]


def _attention(attn: nn.Module, x: str, out: str) -> Segment:
    """The mid block's single-head spatial self-attention (diffusers ``Attention`` / ldm ``AttnBlock``)."""
    diffusers_style = hasattr(attn, "to_q")
    norm = attn.group_norm if diffusers_style else attn.norm

    def run(normed: Tensor, residual: Tensor) -> Tensor:
        b, c, h, w = normed.shape
        if diffusers_style:
            t = normed.reshape(b, c, h * w).transpose(1, 2)
            q, k, v = attn.to_q(t), attn.to_k(t), attn.to_v(t)
        else:  # ldm: 1x1 convs
            q, k, v = (m(normed).reshape(b, c, h * w).transpose(1, 2) for m in (attn.q, attn.k, attn.v))
        heads = getattr(attn, "heads", 1)
        q, k, v = (z.reshape(b, h * w, heads, -1).transpose(1, 2) for z in (q, k, v))
        o = chunked_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        if diffusers_style:
            o = attn.to_out[1](attn.to_out[0](o)).transpose(1, 2).reshape(b, c, h, w)
            if attn.residual_connection:
                o = o + residual
            return o / attn.rescale_output_factor
        return residual + attn.proj_out(o.transpose(1, 2).reshape(b, c, h, w))

    return Segment(x, out, run, c_out(norm), halo=0, norm=norm, is_global=True)


def c_out(norm: nn.GroupNorm) -> int:
    return norm.num_channels


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, max_scores: int = 2**27) -> Tensor:
    """SDPA with the queries in chunks, so the score matrix never exceeds ``max_scores`` entries."""
    n = q.shape[-2]
    chunk = max(1, max_scores // max(1, k.shape[-2] * q.shape[0] * q.shape[1]))
    if chunk >= n:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + chunk, :], k, v) for i in range(0, n, chunk)], dim=-2)


def _upsample(conv: nn.Conv2d, x: str, out: str) -> Segment:
    return Segment(x, out, lambda t: conv(F.interpolate(t, scale_factor=2.0, mode="nearest")), conv.out_channels,
                   scale=2.0)


def _downsample(conv: nn.Conv2d, x: str, out: str) -> Segment:
    # SD pads right and bottom by one, then a stride-2 3x3 conv: out[j] reads in[2j .. 2j+2]
    return Segment(x, out, lambda t: conv(F.pad(t, (0, 1, 0, 1))), conv.out_channels, halo=0, scale=0.5)


class _Chain:
    """Builds the segment list, naming maps m0, m1, ... as the network goes."""

    def __init__(self, first: str):
        self.segments: list[Segment] = []
        self.current, self.count = first, 0

    def new(self) -> str:
        self.count += 1
        return f"m{self.count}"

    def add_resnet(self, block: nn.Module) -> None:
        out = self.new()
        self.segments += _resnet(block, self.current, out, out)
        self.current = out

    def add(self, make: Callable[[str, str], Segment]) -> None:
        out = self.new()
        self.segments.append(make(self.current, out))
        self.current = out


def _is_ldm(part: nn.Module) -> bool:
    return not hasattr(part, "mid_block")


def _mid(chain: _Chain, part: nn.Module) -> None:
    if _is_ldm(part):
        chain.add_resnet(part.mid.block_1)
        chain.add(lambda x, o: _attention(part.mid.attn_1, x, o))
        chain.add_resnet(part.mid.block_2)
        return
    mid = part.mid_block
    chain.add_resnet(mid.resnets[0])
    for attn, res in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            chain.add(lambda x, o, attn=attn: _attention(attn, x, o))
        chain.add_resnet(res)


def _levels(part: nn.Module, down: bool) -> list[tuple[list[nn.Module], nn.Conv2d | None]]:
    """(resnets, the resampling conv or None) of each level, in the order the network runs them."""
    if _is_ldm(part):  # ldm indexes the decoder's levels from the highest resolution
        levels = part.down if down else list(reversed(part.up))
        resample = [getattr(lvl, "downsample" if down else "upsample", None) for lvl in levels]
        return [(lvl.block, r.conv if r is not None else None) for lvl, r in zip(levels, resample)]
    blocks = part.down_blocks if down else part.up_blocks
    resample = [b.downsamplers if down else b.upsamplers for b in blocks]
    return [(b.resnets, r[0].conv if r else None) for b, r in zip(blocks, resample)]


def decoder_segments(vae: nn.Module) -> list[Segment]:
    """[post_quant_conv +] conv_in, mid block, up blocks, norm_out + SiLU + conv_out -> "image"."""
    dec = vae.decoder
    pqc = getattr(vae, "post_quant_conv", None)
    first = (lambda t: dec.conv_in(pqc(t))) if isinstance(pqc, nn.Conv2d) else dec.conv_in
    chain = _Chain("input")
    chain.add(lambda x, o: Segment(x, o, first, dec.conv_in.out_channels))
    _mid(chain, dec)
    for resnets, conv in _levels(dec, down=False):
        for r in resnets:
            chain.add_resnet(r)
        if conv is not None:
            chain.add(lambda x, o, conv=conv: _upsample(conv, x, o))
    norm = dec.norm_out if _is_ldm(dec) else dec.conv_norm_out
    chain.segments.append(Segment(chain.current, "output", lambda t: dec.conv_out(F.silu(t, inplace=True)), dec.conv_out.out_channels,
                                  norm=norm))
    return chain.segments


def encoder_segments(vae: nn.Module) -> list[Segment]:
    """conv_in, down blocks, mid block, norm_out + SiLU + conv_out [+ quant_conv] -> "output" (moments)."""
    enc = vae.encoder
    chain = _Chain("input")
    chain.add(lambda x, o: Segment(x, o, enc.conv_in, enc.conv_in.out_channels))
    for resnets, conv in _levels(enc, down=True):
        for r in resnets:
            chain.add_resnet(r)
        if conv is not None:
            chain.add(lambda x, o, conv=conv: _downsample(conv, x, o))
    _mid(chain, enc)
    qc = getattr(vae, "quant_conv", None)
    last = (lambda t: qc(enc.conv_out(F.silu(t, inplace=True)))) if isinstance(qc, nn.Conv2d) \
        else (lambda t: enc.conv_out(F.silu(t, inplace=True)))
    norm = enc.norm_out if _is_ldm(enc) else enc.conv_norm_out
    out_channels = qc.out_channels if isinstance(qc, nn.Conv2d) else enc.conv_out.out_channels
    chain.segments.append(Segment(chain.current, "output", last, out_channels, norm=norm))
    return chain.segments


def decoder_factor(vae: nn.Module) -> int:
    return 2 ** sum(1 for s in decoder_segments(vae) if s.scale == 2.0)


def latent_channels(vae: nn.Module) -> int:
    return int(vae.decoder.conv_in.in_channels if not isinstance(getattr(vae, "post_quant_conv", None), nn.Conv2d)
               else vae.post_quant_conv.in_channels)


# --------------------------------------------------------------------------------------------
# running the segments over tiles


def _boxes(size: int, core: int) -> list[tuple[int, int]]:
    return [(o, min(o + core, size)) for o in range(0, size, core)]


def _input_span(o0: int, o1: int, seg: Segment, size: int) -> tuple[int, int]:
    """The primary-input span a core [o0, o1) of the output needs (clamped to the map)."""
    if seg.scale == 2.0:
        return max(0, o0 // 2 - seg.halo), min(size, -(-o1 // 2) + seg.halo)
    if seg.scale == 0.5:
        return 2 * o0, min(size, 2 * o1 + 1)
    return max(0, o0 - seg.halo), min(size, o1 + seg.halo)


def _new_map(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host memory for a full map: pinned when tiles go to a GPU, so copies can overlap."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def run_segments(segments: list[Segment], x: Tensor, core: int, device: torch.device,
                 progress: Callable[[], None] | None = None) -> Tensor:
    """Run ``segments`` on ``x`` (host tensor), output tiles of ``core`` px at the input's resolution
    (scaled with each map's resolution)."""
    last_use = {}
    for i, seg in enumerate(segments):
        for name in (seg.primary, seg.skip):
            if name is not None:
                last_use[name] = i
    maps: dict[str, Map] = {"input": Map(x)}  # the first segment (a conv) needs no statistics of it
    resolution = {"input": 1.0}  # each map's resolution relative to the input
    for i, seg in enumerate(segments):
        src = maps[seg.primary]
        stats = src.moments.group_stats(seg.norm) if seg.norm is not None else None
        out_res = resolution[seg.primary] * seg.scale
        b, _, h, w = src.data.shape
        oh, ow = round(h * seg.scale), round(w * seg.scale)
        # A resnet's output overwrites its shortcut's input (the first channels, when it has more):
        # each tile reads its core of that map before writing the same core, and nothing reads it later.
        skip = maps[seg.skip].data if seg.skip is not None else None
        in_place = skip is not None and last_use.get(seg.skip) == i and skip.shape[1] >= seg.out_channels
        out = skip[:, :seg.out_channels] if in_place else _new_map((b, seg.out_channels, oh, ow), src.data.dtype, device)
        moments = Moments()
        if seg.is_global:
            t = src.data.to(device)
            result = seg.body(group_norm_with(seg.norm, t, *stats), t)
            out.copy_(result.to(out.device))
            moments.add(result)
        else:
            c = max(1, round(core * out_res))
            for y0, y1 in _boxes(oh, c):
                iy0, iy1 = _input_span(y0, y1, seg, h)
                for x0, x1 in _boxes(ow, c):
                    ix0, ix1 = _input_span(x0, x1, seg, w)
                    crop = src.data[..., iy0:iy1, ix0:ix1].to(device, non_blocking=True)
                    if seg.norm is not None:
                        crop = group_norm_with(seg.norm, crop, *stats)
                    y = seg.body(crop)
                    oy, ox = y0 - round(iy0 * seg.scale), x0 - round(ix0 * seg.scale)
                    result = y[..., oy:oy + (y1 - y0), ox:ox + (x1 - x0)]
                    if seg.skip is not None:
                        result = seg.combine(result, maps[seg.skip].data[..., y0:y1, x0:x1].to(device))
                    moments.add(result)
                    out[..., y0:y1, x0:x1] = result.to(out.device)  # blocking: the host map is read next
        maps[seg.output] = Map(out, moments)
        resolution[seg.output] = out_res
        for name in [n for n, last in last_use.items() if last == i and n != seg.output]:
            maps.pop(name, None)  # (an in-place output keeps the tensor alive under its new name)
        if progress:
            progress()
    return maps["output"].data


# --------------------------------------------------------------------------------------------
# tile sizes and the public entry points


def _bytes(device: torch.device, explicit: int | None) -> int:
    """An explicit budget, else half of free CUDA memory, else 1 GiB on the CPU."""
    if explicit is not None:
        return explicit
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return 1 << 30


def auto_tile(segments: list[Segment], x: Tensor, tiling: VAETiling, device: torch.device) -> int:
    """The largest square core (input px) whose working set fits the memory budget: the widest
    segment's input and output tiles, times 4 for its temporaries (normalised input, activation,
    conv output, result)."""
    resolution, peak = {"input": 1.0}, 0.0
    channels = {"input": x.shape[1]}
    for seg in segments:
        r_in = resolution[seg.primary]
        r_out = r_in * seg.scale
        resolution[seg.output], channels[seg.output] = r_out, seg.out_channels
        if not seg.is_global:
            peak = max(peak, (channels[seg.primary] * r_in**2 + seg.out_channels * r_out**2) * 4)
    per_px = peak * x.element_size() * x.shape[0]
    side = int(math.sqrt(_bytes(device, tiling.memory_budget) / per_px))
    return max(8, side // 8 * 8)


def _check_input(x: Tensor, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise SMFSRError(f"tiled VAE {what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")


def _device_of(vae: nn.Module, x: Tensor) -> torch.device:
    first = next(vae.parameters(), None)
    return first.device if first is not None else x.device


def tiled_decode(vae: nn.Module, z: Tensor, tiling: VAETiling | None = None,
                 progress: Callable[[], None] | None = None) -> Tensor:
    """Raw VAE latent (B, C, h, w) -> image in [-1, 1] (on the latent's device), tiled. Tile core in latent px."""
    tiling = tiling or VAETiling()
    segments = decoder_segments(vae)
    _check_input(z, latent_channels(vae), "decode")
    device = _device_of(vae, z)
    core = tiling.tile or auto_tile(segments, z, tiling, device)
    with torch.no_grad():
        out = run_segments(segments, z.detach().cpu(), core, device, progress)
    return out.to(z.device)


def tiled_encode_moments(vae: nn.Module, x: Tensor, tiling: VAETiling | None = None,
                         progress: Callable[[], None] | None = None) -> Tensor:
    """Image in [-1, 1] (B, 3, H, W) -> posterior moments (B, 2C, H/f, W/f), tiled. The tile core
    is ``tiling.tile`` latent px, i.e. that times the encoder's downscale factor f in image px."""
    tiling = tiling or VAETiling()
    segments = encoder_segments(vae)
    _check_input(x, vae.encoder.conv_in.in_channels, "encode")
    factor = 2 ** sum(1 for s in segments if s.scale == 0.5)
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise SMFSRError(f"tiled VAE encode: the image ({x.shape[-2]}x{x.shape[-1]}) must be a multiple of {factor}")
    device = _device_of(vae, x)
    core = tiling.tile * factor if tiling.tile else auto_tile(segments, x, tiling, device) // factor * factor
    with torch.no_grad():
        out = run_segments(segments, x.detach().cpu(), max(core, factor), device, progress)
    return out.to(x.device)
