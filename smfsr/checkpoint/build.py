"""Networks from configs, and a file's tensors checked against them before anything is loaded.

Every key and shape is checked, and one message says what is missing, extra or mis-shaped (the
official loader's ``strict=False`` silently ignores all three). Networks are built on the meta
device and adopt the file's tensors, so loading allocates memory once.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from ..models.space_to_depth import SpaceToDepthVAE, is_space_to_depth
from ..models.transformer import SMFSRTransformer

# Tensors a file may lack: a buffer we can recompute, and modules the official code builds but
# never runs (method.md 5.4, 5.5, 6.5). Absent ones are filled (recomputed / zeros), never used.
OPTIONAL_TRANSFORMER_KEYS = re.compile(
    r"^(pos_embed\.pos_embed"
    r"|interval_embedder\.\d+\.(weight|bias)"
    r"|transformer_blocks\.\d+\.attn2\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\.(weight|bias))$"
)


@contextlib.contextmanager
def numpy_tables_as_views():
    """diffusers before 0.32 computes PatchEmbed's 2-D sin-cos table in numpy float64 as the module
    is built, even on the meta device (SD3.5-medium's: 1.8 GB, 3.4 GB at its peak, seconds of CPU;
    measured on Forge's diffusers 0.31). The table is rebuilt from the file or by ``position_table``
    anyway, so while building it is a zero-stride view of one value (``on_meta`` makes it meta).
    diffusers' function is replaced only for the milliseconds of that build, and only its numpy
    form: 0.32 and later ask for torch tensors and are passed through."""
    import numpy as np

    try:
        from diffusers.models import embeddings
    except ImportError:
        yield
        return
    original = embeddings.get_2d_sincos_pos_embed

    def view(embed_dim, grid_size, *args, output_type="np", **kwargs):
        if output_type != "np":  # diffusers >= 0.32 asks for torch: computed on the meta device, free
            return original(embed_dim, grid_size, *args, output_type=output_type, **kwargs)
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (h * w, embed_dim), (0, 0))

    embeddings.get_2d_sincos_pos_embed = view
    try:
        yield
    finally:
        embeddings.get_2d_sincos_pos_embed = original


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` on the meta device: no memory is allocated, by torch or by diffusers' numpy."""
    with torch.device("meta"), numpy_tables_as_views():
        module = build()
    for owner in module.modules():
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer is not None and not buffer.is_meta and buffer.numel() > 1 and not any(buffer.stride()):
                owner.register_buffer(name, torch.empty_like(buffer, device="meta"),
                                      persistent=name not in owner._non_persistent_buffers_set)
    return module


def expected_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of a module, built on the meta device (no memory is allocated)."""
    return {k: tuple(v.shape) for k, v in on_meta(build).state_dict().items()}


def check_state(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], *, what: str,
                path: Path | str, optional: re.Pattern | None = None) -> None:
    """Raise one readable CheckpointError listing missing, unexpected and mis-shaped tensors."""
    missing = [k for k in expected if k not in found and not (optional and optional.match(k))]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return

    def listing(keys: list[str], show: Callable[[str], str]) -> str:
        shown = "\n".join(f"    {show(k)}" for k in keys[:8])
        return shown + (f"\n    ... and {len(keys) - 8} more" if len(keys) > 8 else "")

    parts = [f"{path} does not match the {what} it should contain:"]
    if missing:
        parts.append(f"  {len(missing)} missing: \n" + listing(missing, lambda k: f"{k} {list(expected[k])}"))
    if extra:
        parts.append(f"  {len(extra)} unexpected: \n" + listing(extra, lambda k: f"{k} {list(found[k])}"))
    if wrong:
        parts.append(f"  {len(wrong)} with the wrong shape:\n"
                     + listing(wrong, lambda k: f"{k}: file {list(found[k])}, expected {list(expected[k])}"))
    parts.append("The file may be damaged, belong to a different model, or come from an incompatible tool. "
                 "Check `smfsr info` on it, or re-create it with `smfsr convert`.")
    raise CheckpointError("\n".join(parts))


def _build(cls: type, config: dict[str, Any], what: str, path: Path | str):
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise CheckpointError(
            f"{path}: the {what} config has settings this SMFSR version does not know: {', '.join(unknown)}. "
            "It was probably written by a newer SMFSR; upgrade SMFSR."
        )
    try:
        return cls(**config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build the {what} from its config ({e})") from None


def build_transformer(config: dict[str, Any], path: Path | str = "<config>") -> SMFSRTransformer:
    return _build(SMFSRTransformer, config, "transformer", path)


def build_vae(config: dict[str, Any], path: Path | str = "<config>"):
    """A diffusers ``AutoencoderKL``, or the parameter-free space-to-depth codec its config names."""
    if is_space_to_depth(config):
        return _build(SpaceToDepthVAE, {k: v for k, v in config.items() if k != "latent_channels"}, "VAE", path)
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return _build(AutoencoderKL, config, "VAE", path)


def load_into(build: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor],
              fill: Callable[[str, torch.nn.Module], torch.Tensor] | None = None) -> torch.nn.Module:
    """Build on meta, adopt the (already checked) tensors, and ``fill`` any optional tensor the
    file lacked."""
    module = on_meta(build)
    module.load_state_dict(tensors, strict=False, assign=True)
    for name, tensor in list(module.state_dict(keep_vars=True).items()):
        if tensor.is_meta:
            if fill is None:  # unreachable after check_state, which lists missing tensors first
                raise CheckpointError(f"tensor {name} is missing")
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            value = fill(name, module)
            if isinstance(tensor, torch.nn.Parameter):
                setattr(owner, attr, torch.nn.Parameter(value, requires_grad=tensor.requires_grad))
            else:
                owner.register_buffer(attr, value)
    return module


def fill_transformer(name: str, model: torch.nn.Module, stored: torch.dtype | None = None) -> torch.Tensor:
    """An optional transformer tensor the file lacks: the sin-cos position table, or zeros for a
    module the official code builds but never runs. The table is rounded to the file's dtype
    (``stored``, default the weights' dtype as loaded) so a model loaded straight into fp32 runs the
    table of one loaded as stored and then cast."""
    if name == "pos_embed.pos_embed":
        weight = model.pos_embed.proj.weight
        return position_table(model.pos_embed, stored or weight.dtype).to(weight.dtype)
    return torch.zeros(model.state_dict(keep_vars=True)[name].shape)


def filler(header: dict[str, tuple], prefix: str = "") -> Callable[[str, torch.nn.Module], torch.Tensor]:
    """``fill_transformer`` for the file with this header (its stored dtype for the table)."""
    from .safe_read import TORCH_DTYPES

    entry = header.get(prefix + "pos_embed.proj.weight")
    stored = getattr(torch, TORCH_DTYPES.get(entry[1], "float32")) if entry else None
    return lambda name, model: fill_transformer(name, model, stored)


def sincos_1d(channels: int, positions: torch.Tensor) -> torch.Tensor:
    """The 1-D sin-cos embedding of SD3's position table, (M, channels) in float64: channel k < C/2
    is sin(p w_k), channel C/2 + k is cos(p w_k), with w_k = 10000^(-2k/C). (diffusers computes the
    same, with a torch output only from 0.32; the doors run on 0.31.)"""
    half = channels // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def position_table(embed: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """SD3's 2-D sin-cos table (1, n*n, D) for a diffusers ``PatchEmbed``, as it computes it, built
    straight into ``dtype``. It is separable: token (i, j) holds [f(x_j), f(y_i)], f the 1-D table
    of D/2 channels, so only the two 1-D tables are computed in float64 (SD3.5-medium's full table
    in float64 would be 1.8 GB)."""
    n, dim = embed.pos_embed_max_size, embed.proj.out_channels
    coords = torch.arange(n, dtype=torch.float32) / (n / embed.base_size) / embed.interpolation_scale
    one_d = sincos_1d(dim // 2, coords).float().to(dtype)  # (n, D/2)
    table = torch.empty(n, n, dim, dtype=dtype)
    table[:, :, : dim // 2] = one_d[None, :, :]  # x: the column
    table[:, :, dim // 2:] = one_d[:, None, :]  # y: the row
    return table.reshape(1, n * n, dim)
