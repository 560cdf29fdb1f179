"""Model files: safe reading (``safe_read``), what a file or folder says about itself without torch
(``peek``, ``defaults``), networks checked and built from configs (``build``), SMFSR bundles
(``bundle``), the official release's layout and diffusers VAEs (``official``), the ``smfsr info``
text (``describe``), models found in folders (``catalog``) and shipped models by name
(``default_model``). Only safetensors is ever read.

The names below are imported on first use, so ``import smfsr.checkpoint.peek`` (what a door needs
to check a model before loading it) does not import torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build": ["OPTIONAL_TRANSFORMER_KEYS", "build_transformer", "build_vae", "check_state", "expected_shapes"],
    "bundle": ["Bundle", "load_bundle", "read_prompt_file", "save_bundle", "to_device"],
    "defaults": ["PipelineDefaults"],
    "official": ["import_official_transformer", "import_vae", "infer_vae_config", "load_model"],
    "peek": ["BundleInfo", "is_bundle", "is_official_folder", "peek_model", "read_bundle_info"],
    "safe_read": ["read_header", "refuse_pickle"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_MODULE_OF[name]}", __name__)
    except AttributeError as e:
        # raised inside the import (a diffusers that does not fit this torch, say): passed on as an
        # AttributeError, Python would report "cannot import name" and hide it
        raise ImportError(f"importing {__name__}.{_MODULE_OF[name]} failed: {type(e).__name__}: {e}") from e
    return getattr(module, name)
