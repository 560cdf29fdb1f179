"""Block swap: N of the transformer's blocks live in (pinned) CPU memory and are copied to the GPU
just before they run; the next one is copied on a side stream while the current one computes, so
the copies hide behind the work. The weights are the same tensors either way: the output is
bit-identical to not swapping. GPU memory then holds the resident blocks, one or two swapped ones
and the activations.

``swap_count("auto", ...)`` chooses N from free GPU memory: as few blocks as leave room for the
working memory of a latent tile (measured: about 2 GB for a 64x64 tile of the SD3.5-sized model in
bf16, README "Memory guide").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import SMFSRError

log = logging.getLogger("smfsr")
WORKING_BYTES = 2 << 30  # one 64x64 latent tile of the SD3.5-sized network in bf16, with headroom


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def swap_count(request: int | str | None, blocks: nn.ModuleList, device: torch.device) -> int:
    """The number of blocks to swap: a number, 0 / None (none), or "auto" (from free memory)."""
    if request in (None, 0, "0", "off"):
        return 0
    if device.type != "cuda":
        log.warning("block swap is for GPUs; on %s every weight is already in system memory: not swapping", device.type)
        return 0
    if request != "auto":
        n = int(request)
        if not 0 <= n <= len(blocks):
            raise SMFSRError(f"${{block_swap}}: the model has {len(blocks)} blocks; swap 0..{len(blocks)} of them, not {n}")
        return n
    free, _ = torch.cuda.mem_get_info(device)
    per_block = [module_bytes(b) for b in blocks]
    resident = sum(per_block)
    n = 0
    while n < len(blocks) and resident + WORKING_BYTES > free:
        resident -= per_block[n]
        n += 1
    if n:
        log.info("block swap: %d of %d blocks in system memory (%.1f GB free on the GPU)", n, len(blocks), free / 2**30)
    return n


class BlockSwap:
    """Swaps ``blocks[:count]`` between ``storage`` (CPU, pinned when the device is a GPU) and ``device``."""

    def __init__(self, blocks: nn.ModuleList, count: int, device: torch.device | str, storage: str = "cpu"):
        self.blocks, self.device = blocks, torch.device(device)
        self.swapped = list(range(count))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stored: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # block -> [(tensor, stored copy)]
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.hooks = []
        pin = self.device.type == "cuda"
        for i in self.swapped:
            block = blocks[i]
            copies = []
            for t in (*block.parameters(), *block.buffers()):
                copy = t.detach().to(storage)
                copy = copy.pin_memory() if pin else copy.clone() if copy.data_ptr() == t.data_ptr() else copy
                copies.append((t, copy))
                t.data = copy  # the block rests in storage
            self.stored[i] = copies
            # a later model.to(device) (the pipeline's, a host's memory manager) leaves this block where it is
            block._apply = lambda fn, recurse=True, block=block: block
            self.hooks.append(block.register_forward_pre_hook(self._arrive(i)))
            self.hooks.append(block.register_forward_hook(self._leave(i)))

    def _copy_in(self, i: int) -> None:
        """Start copying block i to the device (on the side stream on a GPU)."""
        if i in self.ready:
            return
        context = torch.cuda.stream(self.stream) if self.stream is not None else _nothing()
        with context:
            for t, copy in self.stored[i]:
                t.data = copy.to(self.device, non_blocking=self.stream is not None)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.ready[i] = event

    def _arrive(self, i: int):
        def hook(module, args):
            self._copy_in(i)
            event = self.ready[i]
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            later = [j for j in self.swapped if j > i]
            if later:  # prefetch the next swapped block while this one computes
                self._copy_in(later[0])
        return hook

    def _leave(self, i: int):
        def hook(module, args, output):
            for t, copy in self.stored[i]:
                if self.stream is not None:  # the device copy may still be read by queued kernels
                    t.data.record_stream(torch.cuda.current_stream(self.device))
                t.data = copy
            self.ready.pop(i, None)
        return hook

    def remove(self) -> None:
        """Back to plain blocks (left in storage; ``.to()`` moves them again)."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for i in self.swapped:
            self.blocks[i].__dict__.pop("_apply", None)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
