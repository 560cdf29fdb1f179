"""What a model file or folder says about itself, read from safetensors headers and config files
only, without torch: the bundle's configs and defaults (``read_bundle_info``), the official
layout's transformer config, and ``peek_model`` for either. Doors use it to check names, options
and steps in a second, before anything heavy loads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .defaults import PipelineDefaults
from .safe_read import PICKLE_SUFFIXES, Header, read_header, refuse_pickle

FORMAT_VERSION = 1
SPACE_TO_DEPTH = "space_to_depth"  # a VAE config naming the lossless codec (models/space_to_depth.py)
OFFICIAL_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class BundleInfo:
    """What a bundle's header says, read without loading a tensor (for ``smfsr info`` and for
    checking a door's options before the weights load)."""

    path: Path
    transformer_config: dict[str, Any]
    vae_config: dict[str, Any] | None
    defaults: PipelineDefaults
    header: Header
    metadata: dict[str, str]

    @property
    def has_prompt(self) -> bool:
        return "prompt.embeds" in self.header

    @property
    def weights(self) -> dict[str, Any]:
        """How the transformer's weights are stored: {} (as their dtype says) or fp8 with its scales."""
        return _meta_json(self.metadata, "smfsr_weights", self.path) or {}


def is_space_to_depth(vae_config: dict | None) -> bool:
    return bool(vae_config) and vae_config.get("codec") == SPACE_TO_DEPTH


def is_bundle(metadata: dict[str, str]) -> bool:
    return "smfsr_format" in metadata


def _meta_json(metadata: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its metadata entry {key!r} is not valid JSON ({e}); re-export the file") from None


def read_bundle_info(path: str | os.PathLike) -> BundleInfo:
    path = Path(path)
    metadata, header = read_header(path)
    if not is_bundle(metadata):
        found = foreign_kind(header)
        hint = f" It is {found[0]}: {found[1]}." if found else ""
        raise CheckpointError(f"{path} is a safetensors file but not an SMFSR bundle (no smfsr metadata).{hint}")
    version = int(metadata["smfsr_format"])
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses bundle format {version}; this SMFSR reads up to {FORMAT_VERSION}. Upgrade SMFSR.")
    t_config = _meta_json(metadata, "smfsr_transformer_config", path)
    if t_config is None:
        raise CheckpointError(f"{path}: bundle metadata lacks the transformer config; re-export the file")
    return BundleInfo(path, t_config, _meta_json(metadata, "smfsr_vae_config", path),
                      PipelineDefaults.from_dict(_meta_json(metadata, "smfsr_pipeline", path) or {}), header, metadata)


def foreign_kind(header: dict[str, tuple]) -> tuple[str, str] | None:
    """(what a non-SMFSR safetensors file is, where it goes instead), told from its tensor names:
    the files an SD3.5 user has beside the SMFSR weights, which are easy to pick by mistake."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in header)

    download = "the SMFSR network is a separate download (`smfsr download smfsr_q`)"
    if has("model.diffusion_model."):
        what = ("an SD3.5 image-generation checkpoint (its MMDiT" if has("model.diffusion_model.joint_blocks.")
                else "a Stable Diffusion checkpoint (its UNet")
        if has("text_encoders."):
            return (what + ", VAE and text encoders: Comfy-Org's all-in-one), not an SMFSR model",
                    f"its VAE and text encoders serve as ${{vae_input}} and ${{encoders_input}}; {download}")
        return what + " and VAE), not an SMFSR model", f"its VAE serves as ${{vae_input}}; {download}"
    if has("first_stage_model.") or has("encoder.down_blocks.") or has("decoder.up."):
        return "a VAE", f"it serves as ${{vae_input}}; {download}"
    if has("text_model.") or has("text_encoders.") or has("encoder.block."):
        return "a text encoder (CLIP or T5)", f"it serves as ${{encoders_input}}; {download}"
    if has("transformer_blocks."):
        if any("_control." in k for k in header):  # the LR branch of SMFSR and its DiT4SR teacher
            return ("a bare SMFSR transformer state dict (the official release's diffusion_pytorch_model.safetensors)",
                    "pass the folder that holds transformer/config.json, or make a bundle with `smfsr convert`")
        return ("a diffusers SD3 transformer without SMFSR's LR branch (SD3.5's own MMDiT, an image generator)",
                "SMFSR needs its own network: `smfsr download smfsr_q`")
    return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the config ({e})") from None


def find_weights(folder: Path) -> Path:
    weights = folder / OFFICIAL_WEIGHTS
    if weights.exists():
        return weights
    pickled = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        refuse_pickle(pickled[0])
    shards = sorted(folder.glob("*.safetensors.index.json"))
    if shards:
        raise CheckpointError(f"{folder} holds a sharded checkpoint ({shards[0].name}); merge the shards into "
                              f"{OFFICIAL_WEIGHTS} first")
    raise CheckpointError(f"{folder}: expected the weights file {weights.name} beside config.json")


def transformer_folder(folder: str | os.PathLike) -> Path:
    """The folder holding the transformer's config.json: ``<dir>/transformer`` or ``<dir>`` itself."""
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    if not (folder / "config.json").exists():
        raise CheckpointError(
            f"{folder}: no config.json. Expected the official layout <dir>/transformer/config.json "
            f"+ <dir>/transformer/{OFFICIAL_WEIGHTS} (as downloaded from the SMFSR release)."
        )
    return folder


def official_transformer_config(folder: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """The official config.json plus our behaviour switches set to what the official weights expect.
    SMFSR vs the DiT4SR teacher is told from the keys (``time_text_embed_interval.*``)."""
    if shapes is None:
        _, header = read_header(find_weights(folder))
        shapes = {k: v[0] for k, v in header.items()}
    interval = any(k.startswith("time_text_embed_interval.") for k in shapes)
    config = {
        **read_json(folder / "config.json"),
        "interval_embedding": interval,
        "time_scale": 1.0 if interval else 1000.0,
        "lr_key_quirk": True,
        "control_scale": 1.2,
        "official_dead_modules": True,
    }
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = tuple(config["dual_attention_layers"])
    return config


def is_official_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "transformer" / "config.json").is_file()


def peek_model(path: str | os.PathLike) -> tuple[dict[str, Any], PipelineDefaults]:
    """(transformer config, pipeline defaults) of a bundle or official folder, from headers and
    config files only: what a door needs to check its options before the weights load."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return official_transformer_config(transformer_folder(path)), PipelineDefaults()
    info = read_bundle_info(path)
    return info.transformer_config, info.defaults
