"""SMFSR bundles: one ``.safetensors`` file that every door loads (design.md).

Layout: tensors ``transformer.*`` (the velocity net), optional ``vae.*`` (a diffusers AutoencoderKL),
optional ``prompt.embeds`` (1, L, joint_dim) and ``prompt.pooled`` (1, pooled_dim); the safetensors
header metadata holds the format version, both configs as JSON, the pipeline defaults (upscale
factor, steps, VAE scale/shift, ...), licence and provenance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomically
from ..errors import CheckpointError
from .build import OPTIONAL_TRANSFORMER_KEYS, build_transformer, build_vae, check_state, expected_shapes, \
    fill_transformer, filler, load_into, on_meta
from .defaults import PipelineDefaults
from .peek import FORMAT_VERSION, read_bundle_info
from .safe_read import load_tensors, read_header


@dataclass
class Bundle:
    """A loaded model: the networks plus what is needed to run them."""

    transformer: torch.nn.Module
    vae: torch.nn.Module | None = None
    prompt_embeds: torch.Tensor | None = None
    prompt_pooled: torch.Tensor | None = None
    defaults: PipelineDefaults = field(default_factory=PipelineDefaults)
    license: str = ""
    provenance: str = ""
    source: str = ""


def save_bundle(path: str | os.PathLike, bundle: Bundle, *, overwrite: bool = False,
                dtype: torch.dtype | None = None) -> Path:
    """Write ``bundle`` as one safetensors file, atomically; refuses to replace a file unless asked.
    ``dtype`` casts floating tensors; fp8 weights and their float32 scales stay as they are."""
    from safetensors.torch import save_file

    from ..quant import FP8, FP8_FORMAT, FP8Linear, quantized_layer_names

    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    keep = {f"transformer.{n}.{k}" for n in quantized_layer_names(bundle.transformer)
            if isinstance(bundle.transformer.get_submodule(n), FP8Linear) for k in ("weight", "weight_scale")}

    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        return t.to(dtype) if dtype is not None and t.is_floating_point() and key not in keep and t.dtype != FP8 else t

    tensors = {f"transformer.{k}": cast(f"transformer.{k}", v) for k, v in bundle.transformer.state_dict().items()}
    if _is_standard_position_table(tensors, bundle.transformer):
        # the sin-cos table is a function of the config (SD3.5-medium's: 226 M values, 0.45 GB in
        # bf16, 15 % of an fp8 file); the loader recomputes it in the file's dtype
        del tensors[POSITION_TABLE]
    metadata = {
        "smfsr_format": str(FORMAT_VERSION),
        "smfsr_transformer_config": json.dumps(dict(bundle.transformer.config)),
        "smfsr_pipeline": json.dumps(dataclasses.asdict(bundle.defaults)),
        "smfsr_license": bundle.license,
        "smfsr_provenance": bundle.provenance,
    }
    if keep:
        layer = next(m for m in bundle.transformer.modules() if isinstance(m, FP8Linear))
        metadata["smfsr_weights"] = json.dumps({"format": FP8_FORMAT, "scale": layer.granularity, "layers": len(keep) // 2})
    if bundle.vae is not None:
        tensors.update({f"vae.{k}": cast(k, v) for k, v in bundle.vae.state_dict().items()})
        metadata["smfsr_vae_config"] = json.dumps(dict(bundle.vae.config))
    if bundle.prompt_embeds is not None:
        tensors["prompt.embeds"] = cast("prompt", bundle.prompt_embeds)
        tensors["prompt.pooled"] = cast("prompt", bundle.prompt_pooled)
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


POSITION_TABLE = "transformer.pos_embed.pos_embed"


def _is_standard_position_table(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> bool:
    """The stored table equals the recomputed one, rounded to its dtype (a fine-tuned or foreign
    table is kept)."""
    stored = tensors.get(POSITION_TABLE)
    if stored is None or getattr(transformer.pos_embed, "pos_embed_max_size", None) is None:
        return False
    computed = fill_transformer("pos_embed.pos_embed", transformer)
    return stored.shape == computed.shape and torch.equal(stored, computed.to(stored.dtype))


def _split(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_bundle(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> Bundle:
    """Load and validate a bundle file. ``dtype`` casts floating tensors (default: as stored)."""
    from ..quant import FP8_FORMAT, check_fp8_tensors, check_scales, quantized_layer_names, to_fp8

    info = read_bundle_info(path)
    path = info.path
    shapes = {k: v[0] for k, v in info.header.items()}
    weights = info.weights
    fp8_in_file = [k for k, (_, d) in info.header.items() if d.startswith("F8")]
    if weights.get("format") not in (None, FP8_FORMAT):
        raise CheckpointError(f"{path}: weights stored as {weights.get('format')!r}, which this SMFSR cannot read "
                              f"(it reads {FP8_FORMAT}); upgrade SMFSR")
    if fp8_in_file and not weights:
        raise CheckpointError(f"{path} holds fp8 tensors ({fp8_in_file[0]}, ...) but its metadata does not say how "
                              "they are scaled; the file is damaged or was written by another tool")

    def make_transformer():
        model = build_transformer(info.transformer_config, path)
        return to_fp8(model, weights.get("scale", "channel")) if weights else model

    def make_vae():
        return build_vae(info.vae_config, path)

    expected = {f"transformer.{k}": s for k, s in expected_shapes(make_transformer).items()}
    if info.vae_config is not None:
        expected.update({f"vae.{k}": s for k, s in expected_shapes(make_vae).items()})
    prompt_keys = {k: shapes[k] for k in ("prompt.embeds", "prompt.pooled") if k in shapes}
    expected.update(prompt_keys)
    optional = re.compile(r"^transformer\.(" + OPTIONAL_TRANSFORMER_KEYS.pattern.strip("^$") + r")$")
    check_state(expected, shapes, what="SMFSR bundle", path=path, optional=optional)
    if weights:
        names = quantized_layer_names(on_meta(make_transformer))
        check_fp8_tensors({k[len("transformer."):]: v for k, v in info.header.items() if k.startswith("transformer.")},
                          names, path, weights.get("scale", "channel"))
    if len(prompt_keys) == 1:
        raise CheckpointError(f"{path} has only one of prompt.embeds / prompt.pooled; it needs both or neither")

    # cast as read unless the file holds fp8 weights (their scales are kept as stored)
    tensors = load_tensors(path, dtype=None if weights else dtype)
    transformer = load_into(make_transformer, _split(tensors, "transformer."), filler(info.header, "transformer."))
    if weights:
        check_scales(transformer, path)
    vae = load_into(make_vae, _split(tensors, "vae.")) if info.vae_config is not None else None
    bundle = Bundle(
        transformer=transformer, vae=vae,
        prompt_embeds=tensors.get("prompt.embeds"), prompt_pooled=tensors.get("prompt.pooled"),
        defaults=info.defaults, license=info.metadata.get("smfsr_license", ""),
        provenance=info.metadata.get("smfsr_provenance", ""), source=str(path),
    )
    return to_device(bundle, device, dtype)


def to_device(bundle: Bundle, device: str | torch.device, dtype: torch.dtype | None) -> Bundle:
    from .safe_read import is_planning

    if is_planning():  # a plan's networks stay on the meta device (safe_read.planning)
        device = "meta"

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules these models lack
    for module in (bundle.transformer, bundle.vae):
        if module is not None:
            torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    bundle.prompt_embeds, bundle.prompt_pooled = move(bundle.prompt_embeds), move(bundle.prompt_pooled)
    return bundle


def read_prompt_file(file: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A safetensors file with ``embeds`` (1, L, D) and ``pooled`` (1, P): a precomputed prompt."""
    file = Path(file)
    _, header = read_header(file)
    missing = {"embeds", "pooled"} - set(header)
    if missing:
        raise CheckpointError(f"{file}: a prompt file needs tensors 'embeds' (1, L, D) and 'pooled' (1, P); "
                              f"missing {sorted(missing)}")
    tensors = load_tensors(file)
    embeds, pooled = tensors["embeds"], tensors["pooled"]
    if embeds.ndim == 2:
        embeds = embeds[None]
    if pooled.ndim == 1:
        pooled = pooled[None]
    return embeds, pooled
