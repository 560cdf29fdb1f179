"""SD3.5's prompt embedding, which the official SMFSR weights are conditioned on.

CLIP-L, CLIP-G and T5-XXL, from wherever a user has them:
- a diffusers SD3.5 folder (text_encoder/, text_encoder_2/, text_encoder_3/ + tokenizer*/), or
- the single files ComfyUI users have: ``clip_l``, ``clip_g`` and ``t5xxl`` (fp16, or fp8 with or
  without scales), or the single-file SD3.5 checkpoint that holds all three; tokenizers from a
  diffusers SD3.5 folder or from a ComfyUI install (which ships them);
and encoded exactly as diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` does (the pipeline
is built with its text parts only): CLIP-L and CLIP-G hidden states (77 tokens each) side by side,
zero-padded to T5's width, followed by T5's tokens; pooled = CLIP-L pooled ++ CLIP-G pooled.
T5-XXL (4.7 B parameters) runs in bf16 on the CPU by default and is freed with the pipeline.
Safetensors only; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import refuse_existing, write_atomically
from .errors import CheckpointError, SMFSRError

# The official positive prompt suffix (method.md 2.7), the stored prompt of converted bundles.
DEFAULT_PROMPT = ("Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, hyper detailed "
                  "photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin "
                  "pore detailing.")
T5_TOKENS = 256  # official inference: 77 CLIP + 256 T5 tokens = 333
CLIP_TOKENS = 77
FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5": "t5xxl_fp16.safetensors"}
CHECKPOINT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                       "t5": "text_encoders.t5xxl.transformer."}
NEEDS = ("Needs, from SD3.5-medium: either the diffusers folder (text_encoder*, tokenizer*), or ComfyUI's single files "
         "(--clip-l clip_l.safetensors --clip-g clip_g.safetensors --t5 t5xxl_fp16.safetensors, or the single-file "
         "all-in-one sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors; Stability's sd3.5_medium.safetensors holds no "
         "encoders) with --tokenizers pointing at a ComfyUI install or an SD3.5 folder. "
         "`smfsr download sd35-medium-encoders` brings the single files and their tokenizers.")


@dataclass
class Sources:
    """Where each encoder and the tokenizers come from: a diffusers folder, or files."""

    folder: Path | None = None  # diffusers SD3.5 folder: everything
    clip_l: Path | None = None  # single files (or one checkpoint holding all three, with its prefixes)
    clip_g: Path | None = None
    t5: Path | None = None
    tokenizers: Path | None = None  # a diffusers SD3.5 folder or a ComfyUI install


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and all((path / f"text_encoder{s}").is_dir() for s in ("", "_2", "_3"))


def find_sources(sd35: str | os.PathLike | None = None, *, clip_l=None, clip_g=None, t5=None,
                 tokenizers=None) -> Sources:
    """Check what the user named, before anything large loads; a clear error for what is missing."""
    paths = {k: Path(v) if v else None for k, v in dict(clip_l=clip_l, clip_g=clip_g, t5=t5, tokenizers=tokenizers).items()}
    for name, path in paths.items():
        if path is not None and not path.exists():
            raise SMFSRError(f"--{name.replace('_', '-')} {path}: no such file or folder")
    if sd35 is not None:
        sd35 = Path(sd35)
        if not sd35.exists():
            raise SMFSRError(f"--sd35 {sd35}: no such file or folder")
        if sd35.is_dir():
            if not is_diffusers_folder(sd35):
                found = ", ".join(sorted(p.name for p in sd35.iterdir())[:12]) or "nothing"
                raise SMFSRError(f"{sd35} is not a diffusers SD3.5 folder: it lacks text_encoder/, text_encoder_2/ "
                                 f"and text_encoder_3/ (found: {found}). {NEEDS}")
            return Sources(folder=sd35, tokenizers=paths["tokenizers"] or sd35)
        if not all(paths[n] for n in ("clip_l", "clip_g", "t5")):
            _check_checkpoint_holds_encoders(sd35, given={n for n in ("clip_l", "clip_g", "t5") if paths[n]})
        for name in ("clip_l", "clip_g", "t5"):  # a single-file checkpoint: each encoder under its prefix
            paths[name] = paths[name] or sd35
    missing = [f"--{n.replace('_', '-')}" for n in ("clip_l", "clip_g", "t5") if paths[n] is None]
    if missing:
        raise SMFSRError(f"no {', '.join(missing)} given. {NEEDS}")
    if paths["tokenizers"] is None:
        raise SMFSRError("single-file text encoders carry no tokenizers: pass --tokenizers with a ComfyUI install "
                         "(it ships them in comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer) or a diffusers "
                         "SD3.5 folder")
    return Sources(clip_l=paths["clip_l"], clip_g=paths["clip_g"], t5=paths["t5"], tokenizers=paths["tokenizers"])


def _check_checkpoint_holds_encoders(path: Path, given: set[str]) -> None:
    """A single-file checkpoint named as the source of the encoders must hold them; Stability's
    sd3.5_medium.safetensors (MMDiT + VAE) does not, and the error says which files to add and where."""
    from .checkpoint.safe_read import read_header

    _, header = read_header(path)
    found = {name for name, prefix in CHECKPOINT_PREFIXES.items() if any(k.startswith(prefix) for k in header)}
    missing = [n for n in CHECKPOINT_PREFIXES if n not in found | given]
    if not missing:
        return
    flags = " ".join(f"--{n.replace('_', '-')} models/text_encoders/{FILES[n]}" for n in missing)
    raise SMFSRError(f"{path} holds no {', '.join(missing)} text encoder(s) (Stability publishes "
                     "sd3.5_medium.safetensors as the MMDiT and the VAE only; the encoders are separate files in "
                     f"its text_encoders/ folder): add {flags} (ComfyUI keeps them in models/text_encoders; `smfsr "
                     "download sd35-medium-encoders` brings them), or use Comfy-Org's all-in-one "
                     "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors")


# ------------------------------------------------------------------------------------------------
# single files -> transformers models (configs from the tensor shapes, as SD3.5's encoders are built)


def _tensors(path: Path, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of one encoder: the whole file, or those under ``prefix`` of a checkpoint."""
    from .checkpoint.safe_read import load_tensors, read_header

    _, header = read_header(path)
    if any(k.startswith(prefix) for k in header):
        return load_tensors(path, prefix=prefix)
    if what == "t5" and "shared.weight" not in header and "encoder.embed_tokens.weight" not in header:
        raise CheckpointError(f"{path} holds no T5 encoder (no shared.weight, nor {prefix}*). {NEEDS}")
    if what != "t5" and "text_model.embeddings.token_embedding.weight" not in header:
        raise CheckpointError(f"{path} holds no CLIP text encoder (no text_model.embeddings.token_embedding.weight, "
                              f"nor {prefix}*). {NEEDS}")
    return load_tensors(path)


def _dequantize(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 files: plain casts, or ComfyUI's "scaled" files (weight * scale_weight)."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("scale_weight") or key.endswith("scale_input") or key == "scaled_fp8":
            continue
        if value.is_floating_point():
            value = value.to(torch.float32)
            scale = tensors.get(key.replace(".weight", ".scale_weight"))
            if key.endswith(".weight") and scale is not None:
                value = value * scale.to(torch.float32)
            value = value.to(dtype)
        out[key] = value
    return out


def _clip_from_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype, path: Path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    t = _dequantize(tensors, dtype)
    vocab, hidden = t["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in t if k.startswith("text_model.encoder.layers.")})
    if "text_projection.weight" not in t:  # SD3's clip_l may come without it: the projection is then the identity
        t["text_projection.weight"] = torch.eye(hidden, dtype=dtype)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=max(1, hidden // 64),  # 64-wide heads, as CLIP-L (12) and CLIP-G (20) have
        max_position_embeddings=t["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=t["text_projection.weight"].shape[0],
        hidden_act="quick_gelu" if hidden == 768 else "gelu",  # OpenAI's CLIP-L; OpenCLIP's bigG uses GELU
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # SD3.5's configs: pooled at the highest token id
    )
    model = CLIPTextModelWithProjection(config)
    _load(model, t, path)
    return model.to(dtype).eval().requires_grad_(False)


def _t5_from_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype, path: Path):
    from transformers import T5Config, T5EncoderModel

    t = _dequantize(tensors, dtype)
    if "shared.weight" not in t:
        t["shared.weight"] = t["encoder.embed_tokens.weight"]
    t["encoder.embed_tokens.weight"] = t["shared.weight"]  # the same embedding (tied in T5EncoderModel)
    vocab, d_model = t["shared.weight"].shape
    buckets, heads = t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    config = T5Config(
        vocab_size=vocab, d_model=d_model, num_heads=heads,
        d_kv=t["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=t["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=len({k.split(".")[2] for k in t if k.startswith("encoder.block.")}),
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )
    model = T5EncoderModel(config)
    _load(model, t, path)
    return model.to(dtype).eval().requires_grad_(False)


def _load(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    from .checkpoint import check_state

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "text_model.embeddings.position_ids"}
    found = {k: tuple(v.shape) for k, v in tensors.items() if k in expected or k != "text_model.embeddings.position_ids"}
    check_state(expected, found, what=type(model).__name__, path=path)
    model.load_state_dict(tensors, strict=False)


def _tokenizers(path: Path):
    """(CLIP-L, CLIP-G, T5) tokenizers from a diffusers SD3.5 folder or a ComfyUI install."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    if (path / "tokenizer").is_dir() and (path / "tokenizer_3").is_dir():
        kw = dict(local_files_only=True)
        return (CLIPTokenizer.from_pretrained(str(path / "tokenizer"), **kw),
                CLIPTokenizer.from_pretrained(str(path / "tokenizer_2"), **kw),
                T5TokenizerFast.from_pretrained(str(path / "tokenizer_3"), **kw))
    comfy = path / "comfy" if (path / "comfy").is_dir() else path
    clip, t5 = comfy / "sd1_tokenizer", comfy / "text_encoders" / "t5_tokenizer"
    if not (clip.is_dir() and t5.is_dir()):
        raise SMFSRError(f"--tokenizers {path}: neither a diffusers SD3.5 folder (tokenizer/, tokenizer_2/, "
                         "tokenizer_3/) nor a ComfyUI install (comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer)")
    # SD3.5's CLIP-G tokenizer is CLIP-L's vocabulary padded with "!" (id 0), as OpenCLIP pads
    return (CLIPTokenizer.from_pretrained(str(clip), local_files_only=True),
            CLIPTokenizer.from_pretrained(str(clip), local_files_only=True, pad_token="!"),
            T5TokenizerFast.from_pretrained(str(t5), local_files_only=True))


def load_pipeline(sources: Sources, *, dtype: torch.dtype = torch.float32, t5_dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu"):
    """diffusers' StableDiffusion3Pipeline with its text encoders and tokenizers only."""
    try:
        from diffusers import StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401
    except ImportError:
        raise SMFSRError("encoding prompts needs transformers: pip install 'smfsr[prompt]'") from None
    if sources.folder is not None:
        kw = dict(local_files_only=True, use_safetensors=True)
        try:
            clip_l = CLIPTextModelWithProjection.from_pretrained(str(sources.folder / "text_encoder"), torch_dtype=dtype,
                                                                 **kw)
            clip_g = CLIPTextModelWithProjection.from_pretrained(str(sources.folder / "text_encoder_2"),
                                                                 torch_dtype=dtype, **kw)
            t5 = T5EncoderModel.from_pretrained(str(sources.folder / "text_encoder_3"), torch_dtype=t5_dtype, **kw)
        except OSError as e:
            raise SMFSRError(f"{sources.folder}: a text encoder could not be loaded ({e}); only safetensors weights "
                             "are read") from None
    else:
        clip_l = _clip_from_tensors(_tensors(sources.clip_l, CHECKPOINT_PREFIXES["clip_l"], "clip_l"), dtype,
                                    sources.clip_l)
        clip_g = _clip_from_tensors(_tensors(sources.clip_g, CHECKPOINT_PREFIXES["clip_g"], "clip_g"), dtype,
                                    sources.clip_g)
        t5 = _t5_from_tensors(_tensors(sources.t5, CHECKPOINT_PREFIXES["t5"], "t5"), t5_dtype, sources.t5)
    tok_l, tok_g, tok_t5 = _tokenizers(sources.tokenizers)
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=clip_l, tokenizer=tok_l,
                                    text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)
    return pipe.to(device)


def encode_prompt(pipe, text: str, max_sequence_length: int = T5_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (1, 77 + max_sequence_length, 4096), pooled (1, 2048)) in float32, as the SD3 pipeline
    makes them. A prompt longer than T5 reads is refused (CLIP reading only its first 77 tokens
    is how SD3 always works, and is only noted)."""
    t5_tokens = len(pipe.tokenizer_3(text).input_ids)
    if t5_tokens > max_sequence_length:
        raise SMFSRError(f"the prompt is {t5_tokens} T5 tokens; the encoders read at most {max_sequence_length}. "
                         "Shorten it (the part past that would be silently dropped).")
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(text, None, None, device=pipe.text_encoder.device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    return embeds.float().cpu(), pooled.float().cpu()


def clip_truncated(pipe, text: str) -> bool:
    return len(pipe.tokenizer(text).input_ids) > CLIP_TOKENS


def encode_text(sources: Sources, text: str, *, t5_dtype: str = "bf16", device: str = "cpu",
                t5_tokens: int = T5_TOKENS, say=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (1, 77 + t5_tokens, 4096), pooled) of ``text`` with SD3.5's encoders from ``sources``;
    they are freed when this returns. ``t5_tokens``: 256 as official inference (333 tokens in all),
    77 as official training and ComfyUI's SD3 CLIPTextEncode (154). ``say(message)`` hears what is
    happening (loading T5-XXL takes a while)."""
    say = say or (lambda message: None)
    say(f"encoding the prompt with SD3.5's text encoders (T5-XXL in {t5_dtype} on {device}) ...")
    pipe = load_pipeline(sources, t5_dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[t5_dtype], device=device)
    if clip_truncated(pipe, text):
        say("note: CLIP reads the first 77 tokens of the prompt, T5 all of it (as SD3.5 always does)")
    embeds, pooled = encode_prompt(pipe, text, max_sequence_length=t5_tokens)
    del pipe
    return embeds, pooled


def write_prompt_file(path: str | os.PathLike, embeds: torch.Tensor, pooled: torch.Tensor, text: str,
                      overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    path = refuse_existing(path, overwrite)
    tensors = {"embeds": embeds.contiguous(), "pooled": pooled.contiguous()}
    metadata = {"prompt": text, "encoders": "SD3.5 CLIP-L + CLIP-G + T5-XXL (diffusers encode_prompt)"}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
