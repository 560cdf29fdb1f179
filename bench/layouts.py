"""Random weights in exactly the shapes and key names of the files users download, for full-size
rehearsals without the real weights (speed and memory do not depend on the values).

The files, named as each publisher names them:
- the official SMFSR release (``write_smfsr``): ``smfsr_q/transformer/`` config.json + diffusion_pytorch_model.safetensors
- Stability's ``sd3.5_medium.safetensors`` (MMDiT + VAE, original key names; no encoders) and its
  ``text_encoders/`` files: clip_l, clip_g, t5xxl_fp16 and t5xxl_fp8_e4m3fn
- Comfy-Org's ``sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors``, the all-in-one: MMDiT, VAE, CLIP-L/G
  (fp16) and T5-XXL as ComfyUI's "scaled" fp8 (fp8 weights, a float32 scale each, a ``scaled_fp8`` marker)
- the SD3.5 diffusers folder's parts that SMFSR reads: vae/, text_encoder*/, tokenizer*/ and
  model_index.json (the MMDiT's transformer/ is left out: nothing here reads it)

Every network is built on the meta device (no memory) for its names and shapes, and each file is
written one tensor at a time: a tensor's values come from a generator seeded by the tensor's
canonical name, so the same weight holds the same values in every layout (up to its file's dtype).
``depth`` keeps every width and key pattern but only that many blocks: the SMFSR transformer is a
``depth``-block model (its config says so), the MMDiT holds the first ``depth`` of its 24 blocks
(ComfyUI builds the whole MMDiT from its width and reports the rest missing; no graph here runs
it); the text encoders keep their real depth (ComfyUI builds them from fixed configs).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from smfsr.models.presets import SD35_MEDIUM, SD35_VAE

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
             torch.int64: "I64"}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass(frozen=True)
class Tensor:
    """One tensor of a file: its name there, shape and dtype. Its values are those of the canonical
    weight ``source`` (generated in ``source_shape``, then reshaped); ``fp8``: "weight" stores them
    divided by their scale (ComfyUI's scaled fp8 files), "scale" stores that scale."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    source_shape: tuple[int, ...] | None = None
    fp8: str | None = None


def values(source: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values of canonical weight ``source``: N(0, 0.02), norms' scales around 1."""
    g = torch.Generator().manual_seed(zlib.crc32(source.encode()))
    out = torch.randn(shape, generator=g) * 0.02
    if re.search(r"(norm[^.]*|ln_[qk]|layer_norm)\.weight$", source) and len(shape) == 1:
        out += 1.0
    return out


def materialise(t: Tensor) -> torch.Tensor:
    out = values(t.source, t.source_shape or t.shape)
    if t.fp8 is not None:
        scale = (out.abs().amax() / FP8_MAX).clamp(min=1e-12)
        out = out / scale if t.fp8 == "weight" else scale
    return out.reshape(t.shape).to(t.dtype)


def write_safetensors(path: Path, tensors: list[Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written one tensor at a time (the format: u64 header length, JSON header
    with each tensor's dtype, shape and byte range, then the data); never more than one tensor in RAM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        size = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        header[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors:
            f.write(materialise(t).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(partial, path)
    return path


def _shapes(make) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = make()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# the networks' names and shapes


def smfsr_config(depth: int) -> dict:
    """The official release's transformer/config.json, with ``depth`` blocks."""
    config = {**SD35_MEDIUM, "num_layers": depth}
    config["dual_attention_layers"] = [i for i in SD35_MEDIUM["dual_attention_layers"] if i < depth]
    return {"_class_name": "SD3Transformer2DModel_interval", "_diffusers_version": "0.30.0", **config}


def smfsr_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    from smfsr.models.presets import transformer_config
    from smfsr.models.transformer import SMFSRTransformer

    config = smfsr_config(depth)
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if not k.startswith("_")}
    return _shapes(lambda: SMFSRTransformer(**transformer_config("sd35-medium", **overrides)))


def vae_shapes() -> dict[str, tuple[int, ...]]:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    config = {k: v for k, v in SD35_VAE.items() if k not in ("scaling_factor", "shift_factor")}
    return _shapes(lambda: AutoencoderKL(**config, scaling_factor=SD35_VAE["scaling_factor"],
                                         shift_factor=SD35_VAE["shift_factor"]))


def ldm_vae_name(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key in the original (ldm) names single-file checkpoints use; the
    decoder's levels are counted from the highest resolution there."""
    part, rest = key.split(".", 1)
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|(down|up)samplers\.0)\.(.*)", rest)
    if m:
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        inner = f"block.{m[4]}.{m[6]}" if m[4] is not None else f"{m[5]}sample.{m[6]}"
        rest = f"{m[1]}.{level}.{inner}"
    rest = re.sub(r"^mid_block\.resnets\.(\d)\.", lambda r: f"mid.block_{int(r[1]) + 1}.", rest)
    rest = rest.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
    for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        rest = rest.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
    rest = rest.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    return f"{part}.{rest}"


def ldm_vae_tensors(prefix: str, dtype: torch.dtype) -> list[Tensor]:
    shapes = vae_shapes()
    levels = len(SD35_VAE["block_out_channels"])
    out = []
    for key, shape in shapes.items():
        stored = (*shape, 1, 1) if ".attentions.0.to_" in key and key.endswith(".weight") else shape
        # (ldm's attention projections are 1x1 convolutions)
        out.append(Tensor(prefix + ldm_vae_name(key, levels), stored, dtype, f"vae.{key}", shape))
    return out


def mmdit_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """SD3.5-medium's MMDiT(-X) in the original names (ComfyUI's mmdit.py, Stability's files)."""
    d, heads_dim, ff = SD35_MEDIUM["caption_projection_dim"], SD35_MEDIUM["attention_head_dim"], 4 * 1536
    s: dict[str, tuple[int, ...]] = {}

    def linear(name, out, inp, bias=True):
        s[f"{name}.weight"] = (out, inp)
        if bias:
            s[f"{name}.bias"] = (out,)

    def attention(name, proj=True):
        linear(f"{name}.qkv", 3 * d, d)
        s[f"{name}.ln_q.weight"] = s[f"{name}.ln_k.weight"] = (heads_dim,)
        if proj:
            linear(f"{name}.proj", d, d)

    s["x_embedder.proj.weight"], s["x_embedder.proj.bias"] = (d, 16, 2, 2), (d,)
    s["pos_embed"] = (1, SD35_MEDIUM["pos_embed_max_size"] ** 2, d)
    linear("t_embedder.mlp.0", d, 256)
    linear("t_embedder.mlp.2", d, d)
    linear("y_embedder.mlp.0", d, SD35_MEDIUM["pooled_projection_dim"])
    linear("y_embedder.mlp.2", d, d)
    linear("context_embedder", d, SD35_MEDIUM["joint_attention_dim"])
    dual, blocks = set(SD35_MEDIUM["dual_attention_layers"]), SD35_MEDIUM["num_layers"]
    for i in range(depth):  # the first ``depth`` of the 24 blocks: ComfyUI sizes the model from its width
        last = i == blocks - 1
        for part in ("context_block", "x_block"):
            name = f"joint_blocks.{i}.{part}"
            pre_only = last and part == "context_block"
            mods = 9 if part == "x_block" and i in dual else 2 if pre_only else 6
            linear(f"{name}.adaLN_modulation.1", mods * d, d)
            attention(f"{name}.attn", proj=not pre_only)
            if part == "x_block" and i in dual:
                attention(f"{name}.attn2")
            if not pre_only:
                linear(f"{name}.mlp.fc1", ff, d)
                linear(f"{name}.mlp.fc2", d, ff)
    linear("final_layer.adaLN_modulation.1", 2 * d, d)
    linear("final_layer.linear", 2 * 2 * SD35_MEDIUM["out_channels"], d)
    return s


def clip_config(which: str):
    from transformers import CLIPTextConfig

    wide = which == "clip_g"  # OpenCLIP bigG vs OpenAI's CLIP-L, as SD3.5 ships them
    return CLIPTextConfig(vocab_size=49408, hidden_size=1280 if wide else 768, num_hidden_layers=32 if wide else 12,
                          intermediate_size=5120 if wide else 3072, num_attention_heads=20 if wide else 12,
                          max_position_embeddings=77, projection_dim=1280 if wide else 768,
                          hidden_act="gelu" if wide else "quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)


def t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128)


def encoder_shapes(which: str) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if which == "t5":
        shapes = _shapes(lambda: T5EncoderModel(t5_config()))
        shapes.pop("encoder.embed_tokens.weight")  # tied to shared.weight; files store it once
    else:
        shapes = _shapes(lambda: CLIPTextModelWithProjection(clip_config(which)))
        shapes.pop("text_model.embeddings.position_ids", None)
        if which == "clip_l":
            shapes.pop("text_projection.weight")  # SD3's clip_l.safetensors has none (it is unused)
    return shapes


T5_LINEAR = re.compile(r"\.(q|k|v|o|wi_0|wi_1|wo)\.weight$")


def encoder_tensors(which: str, prefix: str, dtype: torch.dtype, scaled: bool = False) -> list[Tensor]:
    """One encoder's tensors under ``prefix``; ``scaled``: T5's linear weights as ComfyUI's scaled fp8."""
    out = []
    for key, shape in encoder_shapes(which).items():
        source = f"{which}.{key}"
        if scaled and T5_LINEAR.search(key):
            out.append(Tensor(prefix + key, shape, torch.float8_e4m3fn, source, fp8="weight"))
            out.append(Tensor(prefix + key[:-len("weight")] + "scale_weight", (), torch.float32, source, shape, "scale"))
        else:
            out.append(Tensor(prefix + key, shape, torch.float16 if scaled else dtype, source))
    if scaled:
        out.append(Tensor(prefix + "scaled_fp8", (0,), torch.float8_e4m3fn, f"{which}.scaled_fp8"))
    return out


def mmdit_tensors(prefix: str, depth: int, dtype: torch.dtype) -> list[Tensor]:
    return [Tensor(prefix + k, shape, dtype, f"mmdit.{k}") for k, shape in mmdit_shapes(depth).items()]


# ------------------------------------------------------------------------------------------------
# the layouts


STABILITY_CHECKPOINT = "sd3.5_medium.safetensors"
COMFY_ORG_CHECKPOINT = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
ENCODER_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5": "t5xxl_fp16.safetensors",
                 "t5_fp8": "t5xxl_fp8_e4m3fn.safetensors"}
LAYOUTS = ("smfsr", "stability", "comfy_org", "diffusers")


def write_smfsr(folder: Path, depth: int, dtype: torch.dtype = torch.float16) -> Path:
    transformer = folder / "transformer"
    transformer.mkdir(parents=True, exist_ok=True)
    (transformer / "config.json").write_text(json.dumps(smfsr_config(depth), indent=2))
    write_safetensors(transformer / "diffusion_pytorch_model.safetensors",
                      [Tensor(k, s, dtype, f"smfsr.{k}") for k, s in smfsr_shapes(depth).items()])
    return folder


def write_stability(path: Path, depth: int) -> Path:
    """Stability's sd3.5_medium.safetensors: the MMDiT and the VAE in the original names, fp16."""
    return write_safetensors(path, mmdit_tensors("model.diffusion_model.", depth, torch.float16)
                             + ldm_vae_tensors("first_stage_model.", torch.float16))


def write_encoder_file(path: Path, name: str) -> Path:
    """One of Stability's text_encoders/ files (``ENCODER_FILES``): fp16, or T5 as plain fp8."""
    dtype = torch.float8_e4m3fn if name == "t5_fp8" else torch.float16
    return write_safetensors(path, encoder_tensors("t5" if name.startswith("t5") else name, "", dtype))


def write_comfy_org(folder: Path, depth: int) -> Path:
    tensors = mmdit_tensors("model.diffusion_model.", depth, torch.float16)
    tensors += ldm_vae_tensors("first_stage_model.", torch.float16)
    for which, prefix in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5", "t5xxl")):
        tensors += encoder_tensors(which, f"text_encoders.{prefix}.transformer.", torch.float16, scaled=which == "t5")
    return write_safetensors(folder / COMFY_ORG_CHECKPOINT, tensors)


def write_diffusers(folder: Path, tokenizers: Path) -> Path:
    """vae/, text_encoder{,_2,_3}/ (fp16) and tokenizer{,_2,_3}/ (from a ComfyUI install's tokenizer files)."""
    from smfsr.text_encoders import _tokenizers

    for sub, which in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5")):
        config = t5_config() if which == "t5" else clip_config(which)
        config.architectures = ["T5EncoderModel" if which == "t5" else "CLIPTextModelWithProjection"]
        config.torch_dtype = "float16"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        config.to_json_file(str(folder / sub / "config.json"))
        tensors = encoder_tensors(which, "", torch.float16)
        if which == "clip_l":  # a diffusers folder's CLIP-L has its projection
            tensors.append(Tensor("text_projection.weight", (768, 768), torch.float16, "clip_l.text_projection.weight"))
        write_safetensors(folder / sub / "model.safetensors", tensors, {"format": "pt"})
    vae = folder / "vae"
    vae.mkdir(parents=True, exist_ok=True)
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "_diffusers_version": "0.31.0",
                                                 **{k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in SD35_VAE.items()}}, indent=2))
    write_safetensors(vae / "diffusion_pytorch_model.safetensors",
                      [Tensor(k, s, torch.float16, f"vae.{k}") for k, s in vae_shapes().items()])
    for sub, tokenizer in zip(("tokenizer", "tokenizer_2", "tokenizer_3"), _tokenizers(tokenizers)):
        shutil.rmtree(folder / sub, ignore_errors=True)
        tokenizer.save_pretrained(str(folder / sub))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
        **{f"text_encoder{s}": ["transformers", "CLIPTextModelWithProjection"] for s in ("", "_2")},
        "text_encoder_3": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"],
        **{f"tokenizer{s}": ["transformers", "CLIPTokenizer"] for s in ("", "_2")},
        "tokenizer_3": ["transformers", "T5TokenizerFast"]}, indent=2))
    return folder

