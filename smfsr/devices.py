"""Devices and dtypes from what a user typed, with a clear error for one this torch cannot use.
Imports torch only (not the model stack), so a door can check them in a second."""

from __future__ import annotations

import torch

from .errors import SMFSRError


# torch.OutOfMemoryError exists from torch 2.5; torch.cuda's (same class there) from 1.13. Hosts
# install torch 2.1.2 (A1111) and 2.3.1 (Forge): naming torch's turned every error there into an
# AttributeError.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_device(name: str | torch.device | None) -> torch.device:
    """A device this torch can use, or a clear SMFSRError saying why not."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SMFSRError(f"unknown ${{device}} {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SMFSRError(f"device {name!r} is not available: {why}; set ${{device}} to cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SMFSRError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        available = getattr(torch, device.type, None)
        if available is None or not hasattr(available, "is_available") or not available.is_available():
            raise SMFSRError(f"device {name!r} is not available here; use cpu or cuda")
    return device


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise SMFSRError(f"unknown ${{dtype}} {name!r}; use auto, fp32, fp16 or bf16")
    if DTYPES[name] == torch.float16 and device.type == "cpu":
        raise SMFSRError("fp16 is not supported on the CPU; set ${dtype} to fp32 or bf16")
    return DTYPES[name]
