"""Reading model files safely: safetensors only, never a pickle (unpickling runs code).

A file is recognised by its content, not its name: a safetensors file starts with its header
length (u64, little-endian) and then '{'; a PyTorch pickle is a zip container or a raw pickle.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

from ..errors import CheckpointError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header

# What a user who trusts a pickled checkpoint can run to convert it. torch.load(weights_only=True)
# is PyTorch's tensor-only unpickler; nested checkpoints ({"state_dict": {...}, "epoch": 3}) are
# flattened to dotted names, and anything that is not a tensor is dropped.
CONVERSION_SCRIPT = """\
import sys, torch
from safetensors.torch import save_file
def flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield prefix + k, v.contiguous()
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
for wrapper in ("state_dict", "model", "module", "params_ema", "params"):
    if isinstance(sd.get(wrapper), dict):
        sd = sd[wrapper]
        break
save_file(dict(flat(sd)), sys.argv[2])
"""


def looks_like_safetensors(head: bytes, size: int) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def looks_like_pickle(head: bytes) -> bool:
    """torch.save's zip container, or a raw pickle (protocol 2-5 starts with 0x80, protocol)."""
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def refuse_pickle(path: Path) -> None:
    """Raise if ``path`` looks like a pickled PyTorch checkpoint (by content, else by suffix)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if looks_like_safetensors(head, path.stat().st_size):
        return
    if looks_like_pickle(head) or path.suffix.lower() in PICKLE_SUFFIXES:
        script = path.with_name("to_safetensors.py")
        raise CheckpointError(
            f"{path} is a pickled PyTorch checkpoint, and SMFSR reads only .safetensors: unpickling can run code "
            "hidden in the file. If you trust the file, convert it once, on a machine you trust (a throwaway "
            f"container is best), with torch's tensor-only loader (`smfsr info {path}` prints these steps). Save "
            f"these lines as {script.name}:\n\n{CONVERSION_SCRIPT}\nrun them in an environment with torch and "
            f"safetensors:\n  python {script.name} '{path.name}' '{path.stem}.safetensors'\n"
            "and pass the .safetensors file (official folders: `smfsr convert`)."
        )


def check_file(path: str | os.PathLike, what: str = "model file") -> Path:
    """``path`` as a Path if it is a readable, non-empty, non-pickle file; a clear error if not."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a .safetensors {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish")
    refuse_pickle(path)
    return path


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], Header]:
    """Metadata and {name: (shape, dtype)} of a safetensors file, without loading tensors or torch.

    The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
    data_offsets}}, metadata under "__metadata__"), then the data; a file shorter than its header
    says (an unfinished download) is refused here, before anything tries to map it."""
    path = check_file(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError("its header length is impossible")
            entries = json.loads(f.read(length))
        if not isinstance(entries, dict):
            raise ValueError("its header is not a JSON object")
        metadata = entries.pop("__metadata__", None) or {}
        shapes: Header = {}
        end = 0
        for name, entry in entries.items():
            shapes[name] = (tuple(int(n) for n in entry["shape"]), str(entry["dtype"]))
            end = max(end, int(entry["data_offsets"][1]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}). It may be truncated (an unfinished "
            "download) or not a safetensors file at all; download or export it again."
        ) from None
    if 8 + length + end > size:
        missing = (8 + length + end - size) / 2**20
        raise CheckpointError(f"{path} is truncated: its header describes {(8 + length + end) / 2**20:.1f} MiB but "
                              f"the file has {size / 2**20:.1f} MiB ({missing:.1f} MiB missing; an unfinished download "
                              "or copy). Download or copy it again.")
    return {str(k): str(v) for k, v in metadata.items()}, shapes


# While a dry run plans (``planning``): the notes it collects, and load_tensors reads headers only.
_PLANNING: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("smfsr_planning", default=None)


@contextlib.contextmanager
def planning():
    """Within: ``load_tensors`` returns meta tensors in each file's shapes (and the asked dtype),
    reading headers only, so the code that loads networks builds them, through its own loaders,
    with no weights (a dry run of a 2.7 B-parameter training stage plans in seconds). Yields the
    list ``plan_note`` adds to: what the plan assumed (a file that does not exist yet, say)."""
    notes: list[str] = []
    token = _PLANNING.set(notes)
    try:
        yield notes
    finally:
        _PLANNING.reset(token)


def is_planning() -> bool:
    return _PLANNING.get() is not None


def plan_note(text: str) -> None:
    """Record what a plan assumed (nothing outside ``planning``)."""
    notes = _PLANNING.get()
    if notes is not None and text not in notes:
        notes.append(text)


def load_tensors(path: str | os.PathLike, device: str = "cpu", prefix: str | None = None, dtype=None):
    """The tensors of a safetensors file (after :func:`read_header` has vetted it); with ``prefix``
    only those whose names start with it, the prefix removed (one part of a large checkpoint).

    With ``dtype``, floating tensors (fp8 aside: those are quantized data) are cast to it as each
    one is read, so a model loads straight into its compute dtype: the peak is the cast network
    plus one tensor, not the file beside it (an fp16 SD3.5-sized transformer loaded for fp32: 10.2
    GiB, not 15.3)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if is_planning():
        return meta_tensors(path, prefix, dtype)
    if dtype is not None:
        _, header = read_header(path)
        names = [k for k in header if prefix is None or k.startswith(prefix)]
        start = len(prefix or "")
        return {name[start:]: (t.to(device=device, dtype=dtype) if t.is_floating_point() and t.element_size() > 1
                               else t.to(device))
                for name, t in read_tensors(path, names)}
    if prefix is None:
        return load_file(str(path), device=device)
    with safe_open(str(path), framework="pt", device=device) as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def meta_tensors(path: str | os.PathLike, prefix: str | None, dtype=None) -> dict:
    """``load_tensors``'s result as meta tensors, from the header alone."""
    import torch

    start = len(prefix or "")
    found = {}
    for name, (shape, stored) in read_header(path)[1].items():
        if prefix is None or name.startswith(prefix):
            kind = getattr(torch, TORCH_DTYPES[stored])
            if dtype is not None and kind.is_floating_point and torch.empty((), dtype=kind).element_size() > 1:
                kind = dtype
            found[name[start:]] = torch.empty(shape, dtype=kind, device="meta")
    return found


TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_tensors(path: str | os.PathLike, names):
    """(name, tensor) for ``names`` of a vetted safetensors file, one at a time, by plain reads: a
    memory map keeps every page it touched resident until it closes (a 9.5 GB T5 file read whole
    through one would sit beside the model built from it); here one tensor's bytes at a time."""
    import torch

    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        entries = json.loads(f.read(length))
        for name in names:
            entry = entries[name]
            start, end = (int(n) for n in entry["data_offsets"])
            f.seek(8 + length + start)
            data = bytearray(end - start)
            f.readinto(data)
            dtype = getattr(torch, TORCH_DTYPES[entry["dtype"]])
            shape = [int(n) for n in entry["shape"]]
            yield name, (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(shape)
