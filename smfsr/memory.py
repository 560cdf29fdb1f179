"""Will a model fit? Said before its weights load, from the file's header and the machine's free
memory, instead of the OS killing the process halfway through a 10 GB load.

The estimate is of the load's peak: the network in its compute dtype plus the largest stored tensor
(each is cast as it is read), or, for fp8 weights (one byte for the blocks' linear layers), the
stored tensors beside the quantized network. A bundle's VAE and
prompt are small and counted as stored.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import SMFSRError

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}
FP8_SHARE = 0.99  # the share of a transformer's weights in its blocks' linears (fp8 with --weights fp8; README)


def stored_tensors(path: str | os.PathLike) -> list[tuple[bool, int, str]]:
    """(part of the transformer?, elements, dtype) of every tensor of a bundle or an official folder."""
    from .checkpoint.peek import find_weights, transformer_folder
    from .checkpoint.safe_read import read_header

    path = Path(path)
    if path.is_file():
        metadata, header = read_header(path)
        found = [(name.startswith("transformer."), math.prod(shape), dtype) for name, (shape, dtype) in header.items()]
        return found + rebuilt_position_table(metadata, header)
    found = [(True, math.prod(s), d) for s, d in read_header(find_weights(transformer_folder(path)))[1].values()]
    if (path / "vae").is_dir():
        found += [(False, math.prod(s), d) for s, d in read_header(find_weights(path / "vae"))[1].values()]
    return found


def rebuilt_position_table(metadata: dict[str, str], header: dict) -> list[tuple[bool, int, str]]:
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
    return [(True, int(size) ** 2 * dim, "F32")] if size else []


def needed_bytes(tensors: list[tuple[bool, int, str]], compute: torch.dtype, fp8: bool) -> tuple[int, int]:
    """(host bytes at the load's peak, bytes of the networks as they run) for these tensors."""
    size = torch.empty((), dtype=compute).element_size()
    stored = sum(n * BYTES.get(d, 4) for _, n, d in tensors)
    transformer = sum(n for is_transformer, n, _ in tensors if is_transformer)
    other = sum(n for is_transformer, n, _ in tensors if not is_transformer)
    per_value = FP8_SHARE + (1 - FP8_SHARE) * size if fp8 else size
    running = int(transformer * per_value) + other * size
    if fp8:  # quantized from the stored tensors: both exist while it runs
        return stored + running, running
    # cast tensor by tensor as read (checkpoint.safe_read.load_tensors): the network plus the largest
    # tensor being cast (one already in the compute dtype is adopted, not copied)
    largest = max((n * BYTES.get(d, 4) for _, n, d in tensors if BYTES.get(d, 4) != size), default=0)
    return running + largest, running


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


def check_host_fits(path: str | os.PathLike, compute: torch.dtype, fp8: bool, lower: list[str] = (),
                    doing: str = "to load") -> int:
    """Refuse, with the numbers and ``lower`` (the settings that need less), a model whose load
    would not fit in free host memory; the bytes of the networks as they run otherwise."""
    tensors = stored_tensors(path)
    host, running = needed_bytes(tensors, compute, fp8)
    free = free_host_bytes()
    if free is not None and host > free:
        raise SMFSRError(f"{Path(path).name} needs about {host / 2**30:.1f} GiB of memory {doing} "
                         f"({sum(n for _, n, _ in tensors) / 1e9:.2f} B values), and {free / 2**30:.1f} GiB are free: "
                         + ("; ".join(lower) or "close other programs") + ", or free memory")
    return running


def check_fits(path: str | os.PathLike, runtime, *, gpu: bool = True) -> None:
    """Refuse, with the numbers and the settings that lower them, a model that cannot load here.
    ``runtime`` is a resolved ``runtime.Runtime``; ``gpu=False`` checks host memory only (a host
    whose memory manager frees the GPU for the model, ComfyUI's, decides there)."""
    lower = []
    if runtime.weights != "fp8":
        lower.append("set ${weights} to fp8_e4m3fn (about half of bf16)")
    if runtime.dtype == torch.float32:
        lower.append("set ${dtype} to bf16" + (" (half of fp32)" if runtime.device.type != "cpu" else
                                               " (half of fp32; slower on some CPUs)"))
    running = check_host_fits(path, runtime.dtype, runtime.weights == "fp8", lower)
    if gpu and runtime.device.type == "cuda":
        free_gpu, _ = torch.cuda.mem_get_info(runtime.device)
        if running > free_gpu and runtime.block_swap in (0, "0"):
            raise SMFSRError(f"{Path(path).name} needs about {running / 2**30:.1f} GiB on {runtime.device} and "
                             f"{free_gpu / 2**30:.1f} GiB are free: set ${{block_swap}} to auto (blocks streamed from "
                             "system memory)" + ("; " + "; ".join(lower) if lower else ""))
