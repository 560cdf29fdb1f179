"""How a loaded model runs: device and compute dtype, fp8 weights, block swap, torch.compile. One
place for what every door offers (CLI flags, the ComfyUI loader, A1111 settings, the app).

- ``weights="fp8"``: the transformer blocks' linears quantised to fp8 on load (a bundle already
  stored in fp8 stays so); about half the memory of bf16 (``quant.py``).
- ``block_swap``: N blocks (or "auto", from free GPU memory) kept in system memory and streamed to
  the GPU as they run (``offload.py``); a no-op, said once, without a GPU.
- ``compile``: torch.compile of the transformer and the VAE decoder. The first call compiles (tens
  of seconds on a GPU, minutes on a CPU; reported), later calls of the same tile shape are faster.
  It pays for batches and folders, not for one image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from .checkpoint import Bundle, to_device
from .devices import parse_device, parse_dtype
from .errors import SMFSRError

log = logging.getLogger("smfsr")
WEIGHTS = ("auto", "fp8_e4m3fn")  # what every door offers; "fp8" is accepted as a short name
FP8_NAMES = ("fp8_e4m3fn", "fp8")


@dataclass(frozen=True)
class Runtime:
    device: str | torch.device | None = None  # None: cuda if available
    dtype: str | torch.dtype | None = None  # compute dtype; None: bf16/fp16 on GPU, fp32 on CPU
    weights: str = "auto"  # "auto": as stored; "fp8" / "fp8_e4m3fn": fp8 block weights
    block_swap: int | str = 0  # 0: none; N; "auto"
    compile: bool = False

    @classmethod
    def from_widgets(cls, device=None, dtype=None, *, weights: str = "auto", block_swap: int = 0,
                     compile: bool = False, low_memory: bool = False) -> "Runtime":
        """As GUI hosts hold the settings: block_swap -1 = "auto", 0 = none, unless the host runs in a
        low-memory mode (ComfyUI's --lowvram / --novram, A1111's --lowvram / --medvram), where 0
        means "auto" too."""
        swap = int(block_swap)
        return cls(device, dtype, str(weights), "auto" if swap < 0 or (swap == 0 and low_memory) else swap, compile)

    def resolved(self) -> "Runtime":
        """This runtime checked, with its device and dtype as torch objects: the one place a door's
        device, dtype, weights and block swap are checked, before anything loads. Idempotent."""
        if self.weights not in WEIGHTS + FP8_NAMES:
            raise SMFSRError(f"${{weights}} must be one of {', '.join(WEIGHTS)}, not {self.weights!r}")
        weights = "fp8" if self.weights in FP8_NAMES else self.weights
        if self.block_swap not in ("auto",) and not str(self.block_swap).isdigit():
            raise SMFSRError(f"${{block_swap}} must be a number of blocks or 'auto', not {self.block_swap!r}")
        device = parse_device(self.device)
        dtype = parse_dtype(self.dtype, device)
        if weights == "fp8":
            from .quant import fp8_supported

            reason = fp8_supported()
            if reason:
                raise SMFSRError(f"fp8 weights are not possible here: {reason}; set ${{weights}} to auto")
        return replace(self, device=device, dtype=dtype, weights=weights)


def prepare(bundle: Bundle, runtime: Runtime = Runtime(), *, place: bool = True) -> Bundle:
    """The bundle made ready to run: fp8 if asked, cast to the compute dtype, blocks set to swap,
    compiled if asked, and (``place``) moved to the device. A host that moves models itself
    (ComfyUI's memory manager) passes ``place=False``."""
    from .offload import BlockSwap, swap_count
    from .quant import is_fp8, to_fp8

    runtime = runtime.resolved()
    device, dtype = runtime.device, runtime.dtype
    transformer = bundle.transformer
    if runtime.weights == "fp8" and not is_fp8(transformer):
        to_fp8(transformer)  # from the stored precision, before any cast
    to_device(bundle, "cpu", dtype)  # cast on the CPU; fp8 data and scales are integer-held and stay
    count = swap_count(runtime.block_swap, transformer.transformer_blocks, device)
    if count:
        transformer.block_swap = BlockSwap(transformer.transformer_blocks, count, device)
    if runtime.compile:
        transformer.compile()
        if bundle.vae is not None and any(True for _ in bundle.vae.parameters()):
            bundle.vae.decoder.compile()
    return to_device(bundle, device, None) if place else bundle


class FirstCallTimer:
    """Logs the duration of the first call after compilation (it includes compiling)."""

    def __init__(self, enabled: bool):
        self.pending = enabled

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.pending and exc[0] is None:
            self.pending = False
            log.warning("torch.compile: the first call took %.1f s, compilation included; later calls with the "
                        "same tile size reuse it", time.perf_counter() - self.start)
