"""``smfsr info``: a human summary of a model file or folder, read from headers only."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .defaults import PipelineDefaults
from .peek import foreign_kind, is_space_to_depth, read_bundle_info
from .safe_read import Header, read_header


def describe(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():  # an official folder: its weights are read (header-only description is for bundles)
        from .official import load_model

        bundle = load_model(path)
        header = {f"transformer.{k}": (tuple(v.shape), str(v.dtype)) for k, v in bundle.transformer.state_dict().items()}
        lines = [f"{path}: official folder layout"]
        lines += _describe_parts(dict(bundle.transformer.config), bundle.defaults,
                                 dict(bundle.vae.config) if bundle.vae is not None else None,
                                 header, bundle.prompt_embeds is not None)
        return "\n".join(lines)
    metadata, header = read_header(path)
    if "smfsr_format" not in metadata:
        found = foreign_kind(header)
        kind = f"not an SMFSR bundle: {found[0]} ({found[1]})" if found else "not an SMFSR bundle"
        return f"{path}: safetensors, {len(header)} tensors, {kind}"
    info = read_bundle_info(path)
    lines = [f"{path}: SMFSR bundle, format {metadata['smfsr_format']}, {path.stat().st_size / 2**20:.1f} MiB"]
    lines += _describe_parts(info.transformer_config, info.defaults, info.vae_config, header, info.has_prompt)
    if info.weights:
        w = info.weights
        lines.insert(2, f"  weights:     {w['format']} in {w.get('layers', '?')} block linear layers, scale per "
                        f"{w.get('scale', 'channel')}; embeddings, norms and the output layers in higher precision")
    if metadata.get("smfsr_license"):
        lines.append(f"  license:     {metadata['smfsr_license']}")
    if metadata.get("smfsr_provenance"):
        lines.append(f"  provenance:  {metadata['smfsr_provenance']}")
    return "\n".join(lines)


def _count(header: Header, prefix: str) -> int:
    return sum(math.prod(shape) for k, (shape, _) in header.items()
               if k.startswith(prefix) and k != "transformer.pos_embed.pos_embed")


def _describe_parts(t_config: dict, defaults: PipelineDefaults, v_config: dict | None, header: Header,
                    has_prompt: bool) -> list[str]:
    dtypes = sorted({str(d) for k, (_, d) in header.items() if k.startswith("transformer.")})
    kind = "SMFSR average-velocity (mean-flow) net" if t_config.get("interval_embedding", True) \
        else "DiT4SR-style flow teacher"
    width = t_config["num_attention_heads"] * t_config["attention_head_dim"]
    lines = [
        f"  transformer: {kind}; {t_config['num_layers']} layers, width {width}, "
        f"{t_config['in_channels']} latent channels; {_count(header, 'transformer.') / 1e6:.1f} M parameters; "
        f"dtype {', '.join(dtypes)}",
        f"  behaviour:   time scale {t_config.get('time_scale')}, LR-key quirk {t_config.get('lr_key_quirk')}, "
        f"control scale {t_config.get('control_scale')}",
    ]
    if is_space_to_depth(v_config):
        lines.append(f"  vae:         lossless space-to-depth x{v_config['factor']}, {v_config['latent_channels']} "
                     "channels, no parameters")
    elif v_config is not None:
        factor = 2 ** (len(v_config["block_out_channels"]) - 1)
        lines.append(f"  vae:         AutoencoderKL x{factor}, {v_config['latent_channels']} channels, "
                     f"{_count(header, 'vae.') / 1e6:.1f} M parameters")
    else:
        lines.append("  vae:         none (supply one: the host's VAE or --vae)")
    prompt = f" ({defaults.prompt!r})" if defaults.prompt else ""
    lines.append(f"  prompt:      {'stored embedding' if has_prompt else 'none stored'}{prompt}")
    steps = "one step only" if defaults.max_steps == 1 else f"{defaults.steps} step(s)"
    lines.append(
        f"  defaults:    x{defaults.upscale}, {steps}, VAE scale {defaults.vae_scaling_factor} shift "
        f"{defaults.vae_shift_factor}, latent tile {defaults.latent_tile}/{defaults.latent_overlap}, "
        f"colour fix {defaults.color_fix}"
    )
    return lines
