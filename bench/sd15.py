"""A Stable Diffusion 1.5 checkpoint with random weights in the real shapes and key names, and the
offline CLIP files A1111 asks the hub for: what the WebUI tests need to generate an image (Hires.
fix with SMFSR as its upscaler) without downloading anything.

The shapes come from A1111's own model code (its ``configs/v1-inference.yaml`` and the ldm
repository it ships, built on the meta device in A1111's Python), the text encoder's from SD1.5's
CLIP-L config; the file is written one tensor at a time in fp16 (2.1 GB), values N(0, 0.02) with
norms' scales around 1 (``bench.layouts.values``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .layouts import Tensor, write_safetensors

# SD1.5's text encoder (openai/clip-vit-large-patch14's text half)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

SHAPES_SCRIPT = """
import json, sys, torch
a1111, out, clip = sys.argv[1:4]
sys.path[:0] = [a1111 + "/repositories/stable-diffusion-stability-ai"]
from omegaconf import OmegaConf
from ldm.util import instantiate_from_config
from transformers import CLIPTextConfig, CLIPTextModel
params = OmegaConf.load(a1111 + "/configs/v1-inference.yaml").model.params
with torch.device("meta"):
    parts = {"model.diffusion_model.": instantiate_from_config(params.unet_config),
             "first_stage_model.": instantiate_from_config(params.first_stage_config),
             "cond_stage_model.transformer.": CLIPTextModel(CLIPTextConfig(**json.loads(clip)))}
json.dump({p + k: [list(v.shape), str(v.dtype)] for p, m in parts.items() for k, v in m.state_dict().items()},
          open(out, "w"))
"""


def sd15_shapes(a1111_dir: str | Path, python: str) -> dict[str, tuple[int, ...]]:
    """Every floating tensor of an SD1.5 checkpoint as A1111 builds the model (integer buffers such
    as CLIP's position ids are left out: the model makes them itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shapes.json"
        run = subprocess.run([python, "-c", SHAPES_SCRIPT, str(a1111_dir), str(out), json.dumps(CLIP_L)],
                             capture_output=True, text=True, timeout=300)
        if run.returncode:
            raise RuntimeError(f"A1111's model code did not build SD1.5: {run.stderr[-2000:]}")
        found = json.loads(out.read_text())
    return {k: tuple(shape) for k, (shape, dtype) in found.items() if dtype.startswith("torch.float")}


def write_sd15_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    if path.exists():
        return path
    return write_safetensors(path, [Tensor(k, s, torch.float16, k) for k, s in shapes.items()])


def offline_clip(hf_home: Path, tokenizer_dir: Path) -> Path:
    """``openai/clip-vit-large-patch14`` in a hub cache at ``hf_home`` (set HF_HOME to it, with
    HF_HUB_OFFLINE=1): CLIP-L's text config and the tokenizer files from ``tokenizer_dir`` (ComfyUI's
    comfy/sd1_tokenizer or Forge's SD1.5 tokenizer folder: the same files)."""
    from transformers import CLIPTextConfig

    repo = hf_home / "hub" / "models--openai--clip-vit-large-patch14"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    CLIPTextConfig(**CLIP_L).to_json_file(str(snapshot / "config.json"))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, snapshot / name)
    return hf_home


def tokenizer_folder(comfyui_dir: str | None, forge_dir: str | None) -> Path | None:
    """CLIP's tokenizer files as a host tree ships them."""
    for folder in ((Path(comfyui_dir) / "comfy" / "sd1_tokenizer") if comfyui_dir else None,
                   (Path(forge_dir) / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5" / "tokenizer")
                   if forge_dir else None):
        if folder is not None and (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            return folder
    return None
