"""What several test files share: tiny models built from config, test images, host probes and the
in-process trainer. Fixtures live in conftest.py; this is a plain module, imported by name."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from bench.comfyui_server import free_port  # noqa: F401 (the tests' one free-port helper)
from smfsr.checkpoint import Bundle
from smfsr.checkpoint.random import random_bundle

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN_CONFIG = str(REPO / "smfsr_trainer" / "configs" / "tiny.yaml")


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised control layers also do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_bundle(seed: int = 0, preset: str = "tiny", **defaults) -> Bundle:
    settings = dict(upscale=4, steps=1, process_size=64, vae_scaling_factor=1.0, vae_shift_factor=0.0,
                    latent_tile=16, latent_overlap=4, color_fix="adain")
    settings.update(defaults)
    bundle = random_bundle(preset, "tiny", seed=seed, **settings)
    perturb(bundle.transformer, seed)
    perturb(bundle.vae, seed + 1, std=0.01)
    bundle.license, bundle.provenance = "test", "tests/helpers.py"
    return bundle


def write_official_folder(root, model, with_dead_modules=True):
    """The official release layout: <root>/transformer/config.json + diffusion_pytorch_model.safetensors."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    official_keys = [k for k in model.config if k in (
        "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
        "pos_embed_max_size", "dual_attention_layers", "qk_norm")]
    config = {"_class_name": "SD3Transformer2DModel_interval", "_diffusers_version": "0.30.0",
              **{k: model.config[k] for k in official_keys}}
    config["dual_attention_layers"] = list(config["dual_attention_layers"])
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not with_dead_modules:
        state = {k: v for k, v in state.items()
                 if not k.startswith("interval_embedder.") and ".attn2.add_" not in k and k != "pos_embed.pos_embed"}
    from safetensors.torch import save_file

    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return root


def tiny_sd35_vae(seed: int = 0):
    """The tiny bundle's VAE in SD3.5's place: with SD3.5's latent constants, as the official
    network's VAE must have (a VAE with other constants is refused beside it)."""
    from smfsr.checkpoint.defaults import SD35_VAE_SCALE, SD35_VAE_SHIFT

    vae = tiny_bundle(seed).vae
    vae.register_to_config(scaling_factor=SD35_VAE_SCALE, shift_factor=SD35_VAE_SHIFT)
    return vae


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, colourful test image with some texture (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    base = np.stack([np.sin(5 * xx + 1) * 0.4 + 0.5, np.cos(3 * yy + 4 * xx) * 0.4 + 0.5, 0.3 + 0.5 * xx * yy], -1)
    base += rng.normal(0, 0.03, base.shape)
    return (np.clip(base, 0, 1) * 255).astype(np.uint8)


def photo_folder(folder: Path, count: int) -> Path:
    """``count`` photo-like 96x128 training images in ``folder``."""
    from PIL import Image

    for i in range(count):
        Image.fromarray(photo_like(96, 128, seed=i)).save(folder / f"p{i}.png")
    return folder


def cannot_import(python: str, modules: str, hint: str = "") -> str | None:
    """Why ``python`` cannot import ``modules`` (comma-separated), or None if it can."""
    try:
        probe = subprocess.run([python, "-c", f"import {modules}"], capture_output=True, text=True)
    except OSError as e:
        return f"{python} cannot run ({e.strerror or e})"
    if probe.returncode == 0:
        return None
    last = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "unknown error"
    return f"{python} cannot import {modules} ({last})" + (f"; {hint}" if hint else "")


def require_host(missing: str | None) -> None:
    """In a test or fixture: skip with the reason the host is missing (an error under
    SMFSR_REQUIRE_HOSTS=1, as in :func:`host_marker`)."""
    if missing:
        if os.environ.get("SMFSR_REQUIRE_HOSTS") == "1":
            raise RuntimeError(f"SMFSR_REQUIRE_HOSTS=1, but the host is missing: {missing}")
        import pytest

        pytest.skip(missing)


def host_marker(missing: str | None):
    """Skip a host's tests with the reason it is missing. Under SMFSR_REQUIRE_HOSTS=1 (CI, which
    sets the hosts up) a missing host is an error instead, so CI can never pass by skipping them."""
    if missing and os.environ.get("SMFSR_REQUIRE_HOSTS") == "1":
        raise RuntimeError(f"SMFSR_REQUIRE_HOSTS=1, but the host is missing: {missing}")
    import pytest  # here: the hosts' Pythons import this module for library_result, without pytest

    return pytest.mark.skipif(missing is not None, reason=missing or "")


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; tests that run several trainings reset them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train(photos: Path, out: Path, *args: str) -> Path:
    """One in-process trainer run on the tiny config; returns what it exported."""
    from smfsr_trainer.train import main

    reset_accelerate()
    return main(["--config", TINY_TRAIN_CONFIG, "--train-dir", str(photos), "--output-dir", str(out), *args])


def stage_loss(config, nets, batch: dict, g: torch.Generator, model: torch.nn.Module | None = None):
    """The first trained network's loss on one batch, as the loop computes it (unprepared model)."""
    from smfsr_trainer.stages import get_stage

    stage = get_stage(config.stage)
    name = stage.trained(config, nets)[0][0]
    state = stage.batch(config, nets, batch, g, torch.device("cpu"))
    return stage.losses(config, nets, {name: model or nets.trained})[name](state)


def build_networks(config):
    from smfsr_trainer.stages import get_stage

    return get_stage(config.stage).build(config)


# ----------------------------------------------------------------------------------------------
# one pipeline, every door: the reference each door's test compares with (every setting at its
# default, only the seed set)

DOOR_SEED = 7
DOOR_INPUT = (40, 56)  # x4 = 160 x 224: a multiple of 8, so A1111 adds no resize of its own


def door_input(folder: Path) -> Path:
    from PIL import Image

    path = folder / "door-input.png"
    Image.fromarray(photo_like(*DOOR_INPUT, seed=5)).save(path)
    return path


def library_result(model: Path, image: Path, seed: int = DOOR_SEED, *, python: str | None = None) -> np.ndarray:
    """The Python door's result, (H, W, 3) float in [0, 1], every setting at its default but the seed.

    ``python``: compute it in that interpreter (a host's), so the comparison is with the same torch
    build; float results of different torch releases may differ in the last bit."""
    if python is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.npy"
            code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import numpy as np; from pathlib import Path; "
                    f"from tests.helpers import library_result; np.save({str(out)!r}, library_result("
                    f"Path({str(model)!r}), Path({str(image)!r}), {seed}))")
            run = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if run.returncode:
                raise RuntimeError(f"{python} could not run the library: {run.stderr[-2000:]}")
            return np.load(out)
    from smfsr.imageio import from_pil, open_image
    from smfsr.options import UpscaleOptions
    from smfsr.pipeline import SMFSRUpscaler

    up = SMFSRUpscaler.from_pretrained(model, device="cpu", dtype="fp32")
    rgb = from_pil(open_image(image)).rgb
    return up.upscale_tensor(rgb[None], UpscaleOptions(seed=seed))[0].permute(1, 2, 0).numpy()


def library_pixels(model: Path, image: Path, seed: int = DOOR_SEED, *, python: str | None = None) -> np.ndarray:
    """The Python door's result as smfsr writes it: 8-bit, rounded."""
    return (np.clip(library_result(model, image, seed, python=python), 0, 1) * 255).round().astype(np.uint8)


def truncation_mismatches(saved: np.ndarray, result: np.ndarray, margin: float = 1e-3) -> int:
    """Pixels where ComfyUI's SaveImage output (x 255, truncated) disagrees with the library's float
    result, not counting values within ``margin`` of a truncation boundary: there the last bit of
    a float (which the order of a parallel sum can change, measured 2e-6) decides the level."""
    scaled = np.clip(result * 255.0, 0, 255)
    settled = np.abs(scaled - np.round(scaled)) > margin
    return int(((saved != scaled.astype(np.uint8)) & settled).sum())


# ----------------------------------------------------------------------------------------------
# tiny frozen backbones for the refine stage, in the layouts the trainer reads

def save_random_dinov3(folder: Path, **overrides) -> Path:
    """A randomly initialised DINOv3 ViT in the transformers layout (config.json + model.safetensors)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    settings = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8,
                    image_size=64, num_register_tokens=2)
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(**{**settings, **overrides})).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def save_random_feature_stack(path: Path, arch: str = "vgg16-st", width: int = 4, lpips: bool = True) -> Path:
    """A feature-stack file as recipes/quality/convert_stlpips.py writes it, with random weights and
    narrow layers (``width`` channels, doubling at each pooling, as VGG's do)."""
    from safetensors.torch import save_file

    from smfsr_trainer.backbones import ARCHITECTURES

    g = torch.Generator().manual_seed(1)
    spec = ARCHITECTURES[arch]
    tensors = {"shift": torch.tensor([-0.03, -0.088, -0.188]), "scale": torch.tensor([0.458, 0.448, 0.45])}
    channels, out = 3, width
    binomial = torch.tensor([1.0, 2.0, 1.0])
    for i, op in enumerate(spec["layers"]):
        if op.startswith("conv"):
            tensors[f"layers.{i}.weight"] = torch.randn(out, channels, 3, 3, generator=g) * (2 / (9 * channels)) ** 0.5
            tensors[f"layers.{i}.bias"] = torch.zeros(out)
            channels = out
        elif op == "blur":
            tensors[f"layers.{i}.filt"] = (binomial[:, None] * binomial[None] / 16).expand(channels, 1, 3, 3).clone()
            out = channels * 2
    if lpips:
        stack_channels = []
        for tap in spec["taps"]:
            last = max(i for i in range(tap + 1) if f"layers.{i}.weight" in tensors)
            stack_channels.append(tensors[f"layers.{last}.weight"].shape[0])
        for k, c in enumerate(stack_channels):
            tensors[f"lin.{k}.weight"] = torch.rand(1, c, 1, 1, generator=g)
    save_file(tensors, str(path), metadata={"smfsr_feature_net": arch, "license": "test", "source": "random"})
    return path


# ----------------------------------------------------------------------------------------------
# a VAE under the original (ldm) module names, as ComfyUI holds it and single-file checkpoints store it

class LDM(torch.nn.Module):
    """An empty container: the ldm module tree is built from names alone."""


def ldm_vae(vae) -> torch.nn.Module:
    """The same weights under ldm/ComfyUI module names (first_stage_model.encoder.down[i].block[j]...)."""

    def resnet(r):
        b = LDM()
        b.norm1, b.conv1, b.norm2, b.conv2 = r.norm1, r.conv1, r.norm2, r.conv2
        if r.conv_shortcut is not None:
            b.nin_shortcut = r.conv_shortcut
        return b

    def attention(a):
        b = LDM()
        b.norm = a.group_norm
        for name, lin in (("q", a.to_q), ("k", a.to_k), ("v", a.to_v), ("proj_out", a.to_out[0])):
            conv = torch.nn.Conv2d(lin.in_features, lin.out_features, 1)
            conv.weight.data, conv.bias.data = lin.weight.data[..., None, None].clone(), lin.bias.data.clone()
            setattr(b, name, conv)
        return b

    def mid(m):
        b = LDM()
        b.block_1, b.attn_1, b.block_2 = resnet(m.resnets[0]), attention(m.attentions[0]), resnet(m.resnets[1])
        return b

    def level(block, resample: str):
        out = LDM()
        out.block = torch.nn.ModuleList(resnet(r) for r in block.resnets)
        samplers = block.downsamplers if resample == "downsample" else block.upsamplers
        if samplers:
            setattr(out, resample, LDM())
            getattr(out, resample).conv = samplers[0].conv
        return out

    enc, dec = LDM(), LDM()
    enc.conv_in, enc.mid = vae.encoder.conv_in, mid(vae.encoder.mid_block)
    enc.down = torch.nn.ModuleList(level(b, "downsample") for b in vae.encoder.down_blocks)
    enc.norm_out, enc.conv_out = vae.encoder.conv_norm_out, vae.encoder.conv_out
    dec.conv_in, dec.mid = vae.decoder.conv_in, mid(vae.decoder.mid_block)
    # ldm indexes the decoder's levels from the highest resolution
    dec.up = torch.nn.ModuleList(level(b, "upsample") for b in reversed(vae.decoder.up_blocks))
    dec.norm_out, dec.conv_out = vae.decoder.conv_norm_out, vae.decoder.conv_out
    model = LDM()
    model.encoder, model.decoder = enc, dec
    return model


# ----------------------------------------------------------------------------------------------
# SD3.5's three text encoders, tiny and random, in the diffusers folder layout and as ComfyUI's
# single files (configs such that the single-file loader's shape-based configs rebuild them)

TINY_TEXT = dict(clip_l=64, clip_g=128, t5=256)  # widths: pooled = 64 + 128 = 192, embeds 256 wide


def _clip_tokenizer(folder: Path, pad: str | None = None, max_length: int = 77):
    """A byte-level CLIP BPE tokenizer without merges: every character is a token."""
    import json

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    kwargs = {"pad_token": pad} if pad else {}
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, **kwargs)
    tok.save_pretrained(str(folder))
    return tok


def _t5_tokenizer(folder: Path):
    """A tiny T5 tokenizer (Unigram over characters) with T5's special tokens, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.-' "]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tok = T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                          extra_ids=0, model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


def save_tiny_sd3_text_encoders(root: Path) -> dict[str, Path]:
    """Writes ``root/sd35`` (a diffusers SD3.5 folder: text encoders, tokenizers, a tiny VAE),
    ``root/comfy`` (ComfyUI's tokenizer folders) and the single files clip_l / clip_g / t5xxl (fp16
    and fp8) and one single-file checkpoint with all of them and an ldm-named VAE."""
    import json

    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from smfsr.checkpoint import build_vae
    from smfsr.models.presets import vae_config

    torch.manual_seed(0)
    sd35 = root / "sd35"

    def clip(width: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=514, hidden_size=width, num_hidden_layers=2, intermediate_size=2 * width,
            num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()

    encoders = {"clip_l": clip(TINY_TEXT["clip_l"]), "clip_g": clip(TINY_TEXT["clip_g"]),
                "t5": T5EncoderModel(T5Config(vocab_size=80, d_model=TINY_TEXT["t5"], d_kv=64, num_heads=4, d_ff=128,
                                              num_layers=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                              relative_attention_num_buckets=32)).eval()}
    with torch.no_grad():  # weights an fp16 file holds exactly, so fp16 single files are the same model
        for model in encoders.values():
            for p in model.parameters():
                p.copy_(p.half().float())
    for folder, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5")):
        encoders[name].save_pretrained(str(sd35 / folder), safe_serialization=True)
    _clip_tokenizer(sd35 / "tokenizer")
    _clip_tokenizer(sd35 / "tokenizer_2", pad="!")
    _t5_tokenizer(sd35 / "tokenizer_3")
    # SD's 32 GroupNorm groups (a single file does not say how many; importers assume SD's), SD3.5's constants
    from smfsr.checkpoint.defaults import SD35_VAE_SCALE, SD35_VAE_SHIFT

    vae = build_vae(vae_config("tiny", block_out_channels=(32, 32, 64, 64), norm_num_groups=32,
                               scaling_factor=SD35_VAE_SCALE, shift_factor=SD35_VAE_SHIFT)).eval()
    vae.save_pretrained(str(sd35 / "vae"), safe_serialization=True)
    (sd35 / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "vae": ["diffusers", "AutoencoderKL"], "transformer": [None, None], "scheduler": [None, None],
        "image_encoder": [None, None], "feature_extractor": [None, None]}))

    comfy = root / "ComfyUI" / "comfy"
    _clip_tokenizer(comfy / "sd1_tokenizer", max_length=8192)  # as ComfyUI's config says (it chunks prompts itself)
    _t5_tokenizer(comfy / "text_encoders" / "t5_tokenizer")

    files = {}
    for name, model in encoders.items():
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if k not in ("encoder.embed_tokens.weight", "text_model.embeddings.position_ids")}
        files[name] = root / f"{name}.safetensors"
        save_file({k: v.half() for k, v in state.items()}, str(files[name]))
    t5_state = {k: v for k, v in encoders["t5"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    files["t5_fp8"] = root / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn).contiguous() for k, v in t5_state.items()}, str(files["t5_fp8"]))
    checkpoint = {f"text_encoders.{prefix}.transformer.{k}": v.contiguous()
                  for prefix, name in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5"))
                  for k, v in encoders[name].state_dict().items()
                  if k not in ("encoder.embed_tokens.weight", "text_model.embeddings.position_ids")}
    checkpoint.update({f"first_stage_model.{k}": v.contiguous() for k, v in ldm_vae(vae).state_dict().items()})
    files["checkpoint"] = root / "sd3.5_medium.safetensors"
    save_file(checkpoint, str(files["checkpoint"]))
    return {"sd35": sd35, "comfy": root / "ComfyUI", **files}


def diffusers_reference_embedding(sd35: Path, text: str, max_sequence_length: int = 256):
    """What diffusers' own SD3 pipeline (from_pretrained on the folder, all fp32) makes of ``text``."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd35), transformer=None, vae=None, scheduler=None,
                                                    local_files_only=True, torch_dtype=torch.float32)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(text, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    return embeds, pooled
