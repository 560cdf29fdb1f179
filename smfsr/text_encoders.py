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
from .memory import release_freed_memory

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


FOLDER_PARTS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL",
                "tokenizer": "CLIP-L's tokenizer", "tokenizer_2": "CLIP-G's tokenizer", "tokenizer_3": "T5's tokenizer"}


def missing_folder_parts(path: Path) -> list[str]:
    """What a diffusers SD3.5 folder lacks for the prompt: a part's folder, or its config or
    safetensors weights (a download cut short, or a component left out of ``allow_patterns``)."""
    missing = []
    for part in FOLDER_PARTS:
        folder = path / part
        if not folder.is_dir():
            missing.append(f"{part}/")
        elif part.startswith("text_encoder"):
            if not (folder / "config.json").is_file():
                missing.append(f"{part}/config.json")
            if not any(folder.glob("*.safetensors")):
                missing.append(f"{part}/*.safetensors")
    return missing


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
            if not any((sd35 / part).is_dir() for part in FOLDER_PARTS):  # nothing of SD3.5's: another folder
                found = ", ".join(sorted(p.name for p in sd35.iterdir())[:12]) or "nothing"
                raise SMFSRError(f"{sd35} is not a diffusers SD3.5 folder: it lacks text_encoder/, text_encoder_2/ "
                                 f"and text_encoder_3/ (found: {found}). {NEEDS}")
            missing = missing_folder_parts(sd35)
            if missing:
                what = ", ".join(f"{m} ({FOLDER_PARTS[m.split('/')[0]]})" for m in missing)
                raise SMFSRError(f"the SD3.5 folder {sd35} is incomplete: it lacks {what}. Download those parts again "
                                 "(`smfsr download sd35-medium-encoders` brings the encoders and tokenizers), or give "
                                 "the single files instead (--clip-l, --clip-g, --t5 with --tokenizers)")
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


class _EncoderFile:
    """One encoder's tensors in a file: the whole file, or those under ``prefix`` of a checkpoint.
    Read one tensor at a time, so that loading never holds more than the model in its final dtype."""

    SCALES = ("scale_weight", "scale_input")  # ComfyUI's "scaled" fp8 files
    IGNORED = ("scaled_fp8", "text_model.embeddings.position_ids")  # a marker; a buffer some CLIP files store

    def __init__(self, path: Path, prefix: str, what: str):
        from .checkpoint.safe_read import read_header

        _, header = read_header(path)
        self.path, self.prefix = path, prefix if any(k.startswith(prefix) for k in header) else ""
        if not self.prefix:
            markers = ("shared.weight", "encoder.embed_tokens.weight") if what == "t5" else \
                ("text_model.embeddings.token_embedding.weight",)
            if not any(m in header for m in markers):
                kind = "T5 encoder" if what == "t5" else "CLIP text encoder"
                raise CheckpointError(f"{path} holds no {kind} (no {markers[0]}, nor {prefix}*). {NEEDS}")
        self.header = {k[len(self.prefix):]: v for k, v in header.items() if k.startswith(self.prefix)}
        self.shapes = {k: shape for k, (shape, _) in self.header.items() if k not in self.IGNORED
                       and not k.endswith(self.SCALES)}

    def tensors(self, dtype: torch.dtype):
        """(name, tensor in ``dtype``), one at a time: fp8 weights times their scale where the file has one."""
        from .checkpoint.safe_read import read_tensors

        p = self.prefix
        scales = dict(read_tensors(self.path, [p + n for n in self.header if n.endswith(".scale_weight")]))  # scalars
        for full, value in read_tensors(self.path, [p + n for n in self.shapes]):
            name = full[len(p):]
            scale = scales.get(f"{p}{name[:-len('weight')]}scale_weight") if name.endswith(".weight") else None
            if scale is not None:
                value = value.to(torch.float32) * scale.to(torch.float32)
            yield name, value.to(dtype) if value.is_floating_point() else value


def _layers(shapes: dict, prefix: str, index: int) -> int:
    return len({k.split(".")[index] for k in shapes if k.startswith(prefix)})


def _clip_config(s: dict[str, tuple[int, ...]]):
    """A CLIP text config from the tensor shapes, as SD3.5's CLIP-L and CLIP-G are built."""
    from transformers import CLIPTextConfig

    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_layers(s, "text_model.encoder.layers.", 3),
        intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_attention_heads=max(1, hidden // 64),  # 64-wide heads, as CLIP-L (12) and CLIP-G (20) have
        max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
        projection_dim=s.get("text_projection.weight", (hidden,))[0],
        hidden_act="quick_gelu" if hidden == 768 else "gelu",  # OpenAI's CLIP-L; OpenCLIP's bigG uses GELU
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # SD3.5's configs: pooled at the highest token id
    )


def _t5_config(s: dict[str, tuple[int, ...]]):
    from transformers import T5Config

    vocab, d_model = s.get("shared.weight") or s["encoder.embed_tokens.weight"]
    buckets, heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return T5Config(
        vocab_size=vocab, d_model=d_model, num_heads=heads,
        d_kv=s["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=_layers(s, "encoder.block.", 2),
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )


def _encoder_from_file(source: _EncoderFile, dtype: torch.dtype, t5: bool):
    """The transformers model built on the meta device and given the file's tensors in ``dtype``
    (assigned, not copied): peak memory is the model in ``dtype`` plus one tensor, where building
    it in float32 first and converting would hold 2-3 copies (T5-XXL: 19 GB in float32 alone)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from .checkpoint import check_state

    shapes = dict(source.shapes)
    if t5:
        shapes.setdefault("shared.weight", shapes.get("encoder.embed_tokens.weight"))
        shapes.setdefault("encoder.embed_tokens.weight", shapes["shared.weight"])
        config, kind = _t5_config(shapes), T5EncoderModel
    else:
        config, kind = _clip_config(shapes), CLIPTextModelWithProjection
    with torch.device("meta"):
        model = kind(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k not in ("text_model.embeddings.position_ids", "text_projection.weight")}
    check_state(expected, {k: v for k, v in shapes.items() if k != "text_projection.weight"}, what=kind.__name__,
                path=source.path)
    state = dict(source.tensors(dtype))
    if t5:  # one embedding (tied in T5EncoderModel), whichever name the file uses
        state["shared.weight"] = state["encoder.embed_tokens.weight"] = state.get("shared.weight",
                                                                                  state.get("encoder.embed_tokens.weight"))
    else:  # SD3's clip_l may come without its projection: then it is the identity
        state.setdefault("text_projection.weight", torch.eye(config.hidden_size, dtype=dtype))
    model.load_state_dict(state, strict=True, assign=True)
    if not t5:  # a buffer, not in the file
        positions = torch.arange(config.max_position_embeddings).unsqueeze(0)
        model.text_model.embeddings.register_buffer("position_ids", positions, persistent=False)
    return model.eval().requires_grad_(False)


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
    # (ComfyUI's CLIP tokenizer config says 8192 tokens, as ComfyUI chunks prompts itself; SD3 reads 77)
    kw = dict(local_files_only=True, model_max_length=CLIP_TOKENS)
    return (CLIPTokenizer.from_pretrained(str(clip), **kw),
            CLIPTokenizer.from_pretrained(str(clip), **kw, pad_token="!"),
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
        clip_l, clip_g, t5 = (
            _encoder_from_file(_EncoderFile(getattr(sources, name), CHECKPOINT_PREFIXES[name], name),
                               t5_dtype if name == "t5" else dtype, t5=name == "t5")
            for name in ("clip_l", "clip_g", "t5"))
    tok_l, tok_g, tok_t5 = _tokenizers(sources.tokenizers)
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=clip_l, tokenizer=tok_l,
                                    text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)
    pipe = pipe.to(device)
    if torch.device(device).type == "cpu" and t5_dtype in (torch.bfloat16, torch.float16):
        _linears_in_float32(t5)
    return pipe


def _linear_float32(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.float()
    return torch.nn.functional.linear(x.float(), module.weight.float(), bias).to(x.dtype)


def _linears_in_float32(model: torch.nn.Module) -> None:
    """Each linear layer of a 16-bit model multiplies in float32 (weight and input cast for the call,
    the result cast back, so the model's other ops see its own dtype): CPUs without native bf16
    arithmetic (AVX2) multiply bf16 4-5x slower than float32 (two T5-XXL blocks on 256 tokens, 2
    cores: 16.9 s in bf16, 3.9 s like this, the same error against float32), and the weights stay
    16-bit in memory."""
    from functools import partial

    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = partial(_linear_float32, module)


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


def _encoder_shapes(sources: Sources) -> dict[str, list[tuple[int, ...]]]:
    """The tensor shapes of each encoder, from the files' headers (nothing is loaded)."""
    from .checkpoint.safe_read import read_header

    if sources.folder is None:
        return {name: list(_EncoderFile(getattr(sources, name), CHECKPOINT_PREFIXES[name], name).shapes.values())
                for name in ("clip_l", "clip_g", "t5")}
    out = {}
    for name, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        files = sorted((sources.folder / sub).glob("*.safetensors"))
        out[name] = [shape for f in files for shape, _ in read_header(f)[1].values()]
    return out


def encoder_bytes(sources: Sources, dtype: torch.dtype = torch.float32,
                  t5_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Each encoder's bytes in its compute dtype (CLIP-L/G in ``dtype``, T5 in ``t5_dtype``), and
    "peak": all three plus the largest tensor, read at once in float32 (the loading peak)."""
    import math

    out, largest = {}, 0
    for name, shapes in _encoder_shapes(sources).items():
        size = torch.empty((), dtype=t5_dtype if name == "t5" else dtype).element_size()
        out[name] = sum(math.prod(shape) for shape in shapes) * size
        largest = max([largest] + [math.prod(shape) * 4 for shape in shapes])
    return {**out, "peak": sum(out.values()) + largest}


def check_encoders_fit(sources: Sources, dtype: torch.dtype = torch.float32,
                       t5_dtype: torch.dtype = torch.bfloat16) -> int:
    """The encoders' loading peak (bytes), refused before anything loads where it is not free."""
    from .memory import free_host_bytes

    needed, free = encoder_bytes(sources, dtype, t5_dtype), free_host_bytes()
    if free is not None and needed["peak"] > free:
        raise SMFSRError(
            f"SD3.5's text encoders need about {needed['peak'] / 2**30:.1f} GiB of memory to encode the prompt "
            f"(T5-XXL alone {needed['t5'] / 2**30:.1f} GiB) and {free / 2**30:.1f} GiB are free: encode it once "
            "where it fits (`smfsr encode-prompt -o prompt.safetensors`, then `--prompt prompt.safetensors`), use "
            "a bundle that stores its prompt (`smfsr convert --sd35`), or close other programs")
    return needed["peak"]


def clip_truncated(pipe, text: str) -> bool:
    return len(pipe.tokenizer(text).input_ids) > CLIP_TOKENS


def encode_text(sources: Sources, text: str, *, t5_dtype: str = "bf16", device: str = "cpu",
                t5_tokens: int = T5_TOKENS, say=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (1, 77 + t5_tokens, 4096), pooled) of ``text`` with SD3.5's encoders from ``sources``;
    they are freed when this returns. ``t5_tokens``: 256 as official inference (333 tokens in all),
    77 as official training and ComfyUI's SD3 CLIPTextEncode (154). ``say(message)`` hears what is
    happening (loading T5-XXL takes a while)."""
    say = say or (lambda message: None)
    t5_torch = {"bf16": torch.bfloat16, "fp32": torch.float32}[t5_dtype]
    needed = check_encoders_fit(sources, t5_dtype=t5_torch)
    say(f"encoding the prompt with SD3.5's text encoders (T5-XXL in {t5_dtype} on {device}; about "
        f"{needed / 2**30:.1f} GiB of memory) ...")
    pipe = load_pipeline(sources, t5_dtype=t5_torch, device=device)
    if clip_truncated(pipe, text):
        say("note: CLIP reads the first 77 tokens of the prompt, T5 all of it (as SD3.5 always does)")
    embeds, pooled = encode_prompt(pipe, text, max_sequence_length=t5_tokens)
    del pipe
    release_freed_memory()  # the model that loads next is checked against free memory
    return embeds, pooled


def write_prompt_file(path: str | os.PathLike, embeds: torch.Tensor, pooled: torch.Tensor, text: str,
                      overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    path = refuse_existing(path, overwrite)
    tensors = {"embeds": embeds.contiguous(), "pooled": pooled.contiguous()}
    metadata = {"prompt": text, "encoders": "SD3.5 CLIP-L + CLIP-G + T5-XXL (diffusers encode_prompt)"}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
