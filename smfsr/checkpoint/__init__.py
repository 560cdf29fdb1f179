"""Model files: safe reading (``safe_read``), networks checked and built from configs (``build``),
SMFSR bundles (``bundle``), the official release's layout and diffusers VAEs (``official``), the
``smfsr info`` text (``describe``), models found in folders (``catalog``) and the default model
(``default_model``). Only safetensors is ever read."""

from .build import OPTIONAL_TRANSFORMER_KEYS, build_transformer, build_vae, check_state, expected_shapes
from .bundle import Bundle, BundleInfo, PipelineDefaults, is_bundle, load_bundle, read_bundle_info, read_prompt_file, \
    save_bundle, to_device
from .official import import_official_transformer, import_vae, infer_vae_config, is_official_folder, load_model, \
    peek_model
from .safe_read import read_header, refuse_pickle

__all__ = [
    "OPTIONAL_TRANSFORMER_KEYS", "Bundle", "BundleInfo", "PipelineDefaults", "build_transformer", "build_vae",
    "check_state", "expected_shapes", "import_official_transformer", "import_vae", "infer_vae_config",
    "is_bundle", "is_official_folder", "load_bundle", "load_model", "peek_model", "read_bundle_info", "read_header",
    "read_prompt_file", "refuse_pickle", "save_bundle", "to_device",
]
