"""Will a model fit? Said before its weights load, from the file's header and the machine's free
memory, instead of the OS killing the process halfway through a 10 GB load.

The estimate of the process's peak (``Estimate``) is what it holds before the load, plus the larger
of the load's peak (the networks in their compute dtype plus the largest stored tensor, each being
cast as it is read; for fp8 weights, one byte for the blocks' linear layers, the stored tensors
beside the quantized network) and what stays loaded plus the working memory of one image at the
model's process size (``working_bytes``: one latent tile through the transformer, or the VAE's
decode, whichever is larger). Measured against each door: ``python -m bench memory``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import SMFSRError

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}
FP8_SHARE = 0.99  # the share of a transformer's weights in its blocks' linears (fp8 with --weights fp8; README)
GiB = 2**30


class Stored(NamedTuple):
    transformer: bool  # part of the transformer (else the VAE or the prompt)
    values: int
    dtype: str  # as safetensors names it
    block: int | None = None  # the transformer block it belongs to (block swap moves whole blocks)


def block_of(name: str) -> int | None:
    """The block index of a transformer tensor name ("[transformer.]transformer_blocks.N. ...")."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "transformer_blocks" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def stored_tensors(path: str | os.PathLike) -> list[Stored]:
    """Every tensor of a bundle or an official folder, as its header describes it."""
    from .checkpoint.peek import find_weights, transformer_folder
    from .checkpoint.safe_read import read_header

    path = Path(path)
    if path.is_file():
        metadata, header = read_header(path)
        found = [Stored(name.startswith("transformer."), math.prod(shape), dtype, block_of(name))
                 for name, (shape, dtype) in header.items()]
        return found + rebuilt_position_table(metadata, header)
    found = [Stored(True, math.prod(s), d, block_of(name))
             for name, (s, d) in read_header(find_weights(transformer_folder(path)))[1].items()]
    if (path / "vae").is_dir():
        found += [Stored(False, math.prod(s), d) for s, d in read_header(find_weights(path / "vae"))[1].values()]
    return found


def rebuilt_position_table(metadata: dict[str, str], header: dict) -> list[Stored]:
    """The sin-cos position table a bundle leaves out and the load rebuilds in the network's dtype
    (SD3.5-medium's: 384^2 x 1536 values, 0.84 GiB in fp32), as a transformer tensor of the file."""
    import json

    if "transformer.pos_embed.pos_embed" in header or "transformer.pos_embed.proj.weight" not in header:
        return []
    try:
        size = json.loads(metadata.get("smfsr_transformer_config", "{}")).get("pos_embed_max_size")
    except ValueError:  # a damaged header: the loader reports it, with its reason
        return []
    dim = header["transformer.pos_embed.proj.weight"][0][0]
    return [Stored(True, int(size) ** 2 * dim, "F32")] if size else []


def per_value_bytes(compute: torch.dtype, fp8: bool) -> float:
    """Bytes per transformer value as it runs (fp8: one byte in the blocks' linears)."""
    size = torch.empty((), dtype=compute).element_size()
    return FP8_SHARE + (1 - FP8_SHARE) * size if fp8 else size


def needed_bytes(tensors: list[Stored], compute: torch.dtype, fp8: bool) -> tuple[int, int]:
    """(host bytes at the load's peak, bytes of the networks as they run) for these tensors."""
    size = torch.empty((), dtype=compute).element_size()
    stored = sum(t.values * BYTES.get(t.dtype, 4) for t in tensors)
    transformer = sum(t.values for t in tensors if t.transformer)
    other = sum(t.values for t in tensors if not t.transformer)
    running = int(transformer * per_value_bytes(compute, fp8)) + other * size
    if fp8:  # quantized from the stored tensors: both exist while it runs
        return stored + running, running
    # cast tensor by tensor as read (checkpoint.safe_read.load_tensors): the network plus the largest
    # tensor being cast (one already in the compute dtype is adopted, not copied)
    largest = max((t.values * BYTES.get(t.dtype, 4) for t in tensors if BYTES.get(t.dtype, 4) != size), default=0)
    return running + largest, running


def gpu_bytes(tensors: list[Stored], compute: torch.dtype, fp8: bool, swapped: int | str, working: int) -> int:
    """Bytes on the GPU as the model runs with ``swapped`` blocks in system memory (block swap; "auto":
    as many as it takes, so the least it can need): the rest of the networks, the two swapped blocks
    on the GPU at a time (the one running and the next, being copied) and the working memory."""
    size = torch.empty((), dtype=compute).element_size()
    per_value = per_value_bytes(compute, fp8)
    blocks: dict[int, int] = {}
    for t in tensors:
        if t.transformer and t.block is not None:
            blocks[t.block] = blocks.get(t.block, 0) + t.values
    running = sum(t.values * (per_value if t.transformer else size) for t in tensors)
    order = sorted(blocks)  # BlockSwap swaps the first N blocks
    n = len(order) if swapped == "auto" else min(int(swapped or 0), len(order))
    away = [blocks[i] * per_value for i in order[:n]]
    in_flight = sum(sorted(away)[-2:])
    return int(running - sum(away) + in_flight + working)


def free_host_bytes() -> int | None:
    """What this process can still allocate without swapping or being killed: the machine's
    available memory (psutil where it is installed, on any OS; else /proc/meminfo's MemAvailable),
    capped by the container's limit (cgroup v2 or v1: Docker, Kubernetes, CI runners, Colab), whose
    OOM killer acts on the cgroup's usage, not the machine's. None where nothing can be read."""
    available = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        except (OSError, StopIteration, ValueError):
            pass
    headroom = cgroup_headroom()
    if headroom is None:
        return available
    return headroom if available is None else min(available, headroom)


CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
                 "inactive_file"),  # v2
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                 "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))  # v1


def cgroup_headroom(files=None) -> int | None:
    """The cgroup's limit less its usage (reclaimable page cache not counted as used), or None
    without a limit."""
    for limit_file, usage_file, stat_file, inactive_key in files or CGROUP_FILES:
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 2**60:  # v1 "unlimited"
            return None
        try:
            stat = dict(line.split() for line in Path(stat_file).read_text().splitlines() if line.count(" ") == 1)
            usage -= int(stat.get(inactive_key, 0))
        except (OSError, ValueError):
            pass
        return max(0, int(limit_text) - usage)
    return None


def release_freed_memory() -> None:
    """Collect what is only held in reference cycles (a transformers model is full of them: freed by
    ``del`` alone only at the collector's next pass) and hand glibc's freed heap back to the OS, so
    that the next free-memory check sees the memory as free."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# Working memory, measured on this CPU in float32 (VmHWM over one call; 2026-12-07):
TRANSFORMER_LIVE = 28  # values per token per width live in one block's forward: 22-29 on the SD3.5-sized block
# (noisy, LR and text streams, dual attention) at 845-8525 tokens
DECODER_LIVE = 3  # maps per (input + output channels) of the VAE decoder's widest level: 2.6 on SD3.5's VAE
# at a 64x64 latent (1.04 GiB), as the exact tiled decode's budget counts them (tiling/vae.py)
IMAGE_COPIES = 8  # float32 RGB copies of the output image alive at once (decoded, colour-fixed, clamped, out)
FIRST_RUN = 48 << 20  # what the first run allocates for good (kernel scratch, thread pools): 32 MiB measured


def working_bytes(transformer: dict, vae: dict | None, defaults, prompt_tokens: int, compute: torch.dtype) -> int:
    """Working memory of one image at the model's process size (the smallest it works at; larger
    images are tiled): one latent tile through the transformer (``transformer`` is its config) or
    the VAE's decode (``vae``: its config; None: SD3.5's), whichever is larger, plus the image."""
    from .checkpoint.peek import is_space_to_depth
    from .models.presets import vae_config

    size = torch.empty((), dtype=compute).element_size()
    side = defaults.process_size
    vae = vae or vae_config("sd35")
    if is_space_to_depth(vae):
        down, decode = vae["factor"], 0
    else:  # diffusers' decoder: level i runs at 2^i x the latent, its first resnet reads level i-1's channels
        channels = list(vae["block_out_channels"])[::-1]
        down = 2 ** (len(channels) - 1)
        widest = max((channels[max(i - 1, 0)] + c) * 4**i for i, c in enumerate(channels))
        decode = DECODER_LIVE * widest * (side // down) ** 2 * size
    latent = side // down
    tile = min(defaults.latent_tile or latent, latent)
    tokens = 2 * (tile // transformer.get("patch_size", 2)) ** 2 + prompt_tokens  # noisy + LR streams + text
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    sampling = TRANSFORMER_LIVE * tokens * width * size
    return max(sampling, decode) + IMAGE_COPIES * 3 * side * side * 4 + FIRST_RUN


def model_working_bytes(path: str | os.PathLike, compute: torch.dtype) -> int:
    """``working_bytes`` of a bundle or official folder, from its header and config files."""
    from .checkpoint.peek import peek_model, read_bundle_info, read_json

    path = Path(path)
    if path.is_file():  # one header read: configs, defaults and the stored prompt's length
        info = read_bundle_info(path)
        embeds = info.header.get("prompt.embeds")
        tokens = embeds[0][1] if embeds else OFFICIAL_PROMPT_TOKENS
        return working_bytes(info.transformer_config, info.vae_config, info.defaults, tokens, compute)
    config, defaults = peek_model(path)
    vae = read_json(path / "vae" / "config.json") if (path / "vae" / "config.json").is_file() else None
    return working_bytes(config, vae, defaults, OFFICIAL_PROMPT_TOKENS, compute)


OFFICIAL_PROMPT_TOKENS = 333  # 77 CLIP + 256 T5 tokens, as official inference encodes the prompt


def process_bytes() -> int:
    """This process's resident memory now."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


@dataclass(frozen=True)
class Estimate:
    """A model's memory in this process, bytes: what the process holds before the load
    (``in_use``), the load's peak above that (``load``), what stays loaded (``resident``) and the
    working memory of an image at the model's process size (``working``)."""

    name: str
    in_use: int
    load: int
    resident: int
    working: int
    free: int | None

    @property
    def peak(self) -> int:
        return self.in_use + max(self.load, self.resident + self.working)

    def describe(self) -> str:
        free = f"; {self.free / GiB:.1f} GiB free" if self.free is not None else ""
        return (f"memory: {self.name} peaks at about {self.peak / GiB:.2f} GiB in this process "
                f"({self.in_use / GiB:.2f} in use + {self.load / GiB:.2f} to load, "
                f"{self.working / GiB:.2f} working at its process size){free}")


def estimate(path: str | os.PathLike, compute: torch.dtype, fp8: bool, *, runs: bool = True) -> Estimate:
    """The ``Estimate`` of loading the model at ``path`` here and (``runs``) running it."""
    tensors = stored_tensors(path)
    load, running = needed_bytes(tensors, compute, fp8)
    return Estimate(Path(path).name, process_bytes(), load, load if fp8 else running,
                    model_working_bytes(path, compute) if runs else 0, free_host_bytes())


def check_host_fits(path: str | os.PathLike, compute: torch.dtype, fp8: bool, lower: list[str] = (),
                    doing: str = "to load", *, runs: bool = True) -> Estimate:
    """Refuse, with the numbers and ``lower`` (the settings that need less), a model that would not
    fit in free host memory, loaded and (``runs``) running; its ``Estimate`` otherwise."""
    found = estimate(path, compute, fp8, runs=runs)
    needed = found.peak - found.in_use
    if found.free is not None and needed > found.free:
        values = sum(t.values for t in stored_tensors(path))
        raise SMFSRError(f"{found.name} needs about {needed / GiB:.1f} GiB of memory {doing} "
                         f"({values / 1e9:.2f} B values), and {found.free / GiB:.1f} GiB are free: "
                         + ("; ".join(lower) or "close other programs") + ", or free memory")
    return found


def check_fits(path: str | os.PathLike, runtime, *, gpu: bool = True) -> Estimate:
    """Refuse, with the numbers and the settings that lower them, a model that cannot load here;
    its ``Estimate`` otherwise. ``runtime`` is a resolved ``runtime.Runtime``; ``gpu=False`` checks
    host memory only (a host whose memory manager frees the GPU for the model, ComfyUI's, decides
    there)."""
    lower = []
    fp8 = runtime.weights == "fp8"
    if not fp8:
        lower.append("set ${weights} to fp8_e4m3fn (about half of bf16)")
    if runtime.dtype == torch.float32:
        lower.append("set ${dtype} to bf16" + (" (half of fp32)" if runtime.device.type != "cpu" else
                                               " (half of fp32; slower on some CPUs)"))
    found = check_host_fits(path, runtime.dtype, fp8, lower)
    if gpu and runtime.device.type == "cuda":
        free_gpu, _ = torch.cuda.mem_get_info(runtime.device)
        check_gpu_fits(path, runtime, found.working, free_gpu, lower)
    return found


def check_gpu_fits(path: str | os.PathLike, runtime, working: int, free_gpu: int, lower: list[str]) -> None:
    """Refuse a model whose networks and working memory do not fit in ``free_gpu``, with block swap
    as asked (swapped blocks wait in system memory, two at a time on the GPU)."""
    tensors = stored_tensors(path)
    fp8 = runtime.weights == "fp8"
    swap = runtime.block_swap if runtime.block_swap not in (None, "off") else 0
    needed = gpu_bytes(tensors, runtime.dtype, fp8, swap, working)
    if needed <= free_gpu:
        return
    name, device = Path(path).name, runtime.device
    if swap in (0, "0"):
        raise SMFSRError(f"{name} needs about {needed / GiB:.1f} GiB on {device} and {free_gpu / GiB:.1f} GiB are "
                         "free: set ${block_swap} to auto (blocks streamed from system memory)"
                         + ("; " + "; ".join(lower) if lower else ""))
    if swap == "auto":
        raise SMFSRError(f"{name} needs at least {needed / GiB:.1f} GiB on {device} with every block swapped to system "
                         f"memory, and {free_gpu / GiB:.1f} GiB are free: " + ("; ".join(lower) or "free GPU memory"))
    least = gpu_bytes(tensors, runtime.dtype, fp8, "auto", working)
    advice = "set ${block_swap} to auto" if least <= free_gpu else "; ".join(lower) or "free GPU memory"
    raise SMFSRError(f"{name} needs about {needed / GiB:.1f} GiB on {device} with {swap} block(s) swapped, and "
                     f"{free_gpu / GiB:.1f} GiB are free: {advice}")
