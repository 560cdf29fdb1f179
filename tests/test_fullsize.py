"""Full size without the real weights: the random files in the real layouts (bench.layouts), the
text encoders loaded one tensor at a time, and the full-size rehearsal through the CLI, a real
ComfyUI, a real A1111 and the app (``python -m bench fullsize --depth 2``; it needs COMFYUI_DIR and
A1111_DIR and writes about 14 GB)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import layouts as L
from smfsr.errors import SMFSRError
from tests.helpers import REPO, cannot_import, host_marker, ldm_vae, require_host, save_tiny_sd3_text_encoders

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)


def _comfyui_missing() -> str | None:
    if not COMFYUI_DIR:
        return "COMFYUI_DIR is not set (a ComfyUI checkout runs the full-size rehearsal's ComfyUI door)"
    return cannot_import(COMFYUI_PYTHON, "torch, aiohttp, diffusers, safetensors", hint=f"run {COMFYUI_PYTHON} install.py")


needs_comfyui = host_marker(_comfyui_missing())


def test_the_layouts_have_sd35_mediums_sizes():
    def billions(shapes, skip=()):
        return sum(math.prod(s) for k, s in shapes.items() if k not in skip) / 1e9

    assert abs(billions(L.smfsr_shapes(24), skip={"pos_embed.pos_embed"}) - 2.731) < 0.001  # method.md 4
    assert abs(billions(L.mmdit_shapes(24)) - 2.47) < 0.01  # SD3.5-medium: "2.5 B parameters"
    assert abs(billions(L.encoder_shapes("clip_l")) - 0.123) < 0.001
    assert abs(billions(L.encoder_shapes("clip_g")) - 0.695) < 0.001
    assert abs(billions(L.encoder_shapes("t5")) - 4.762) < 0.001
    config = L.smfsr_config(2)
    assert config["num_layers"] == 2 and config["dual_attention_layers"] == [0, 1]
    assert len([k for k in L.mmdit_shapes(2) if k.endswith(".x_block.attn2.qkv.weight")]) == 2


def test_the_ldm_vae_names_are_the_original_modules_and_diffusers_reads_them_back():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from smfsr.models.presets import SD35_VAE

    small = AutoencoderKL(**{**SD35_VAE, "block_out_channels": (32, 32, 64, 64)})  # SD3.5's structure, narrow
    original = {k: tuple(v.shape) for k, v in ldm_vae(small).state_dict().items()}
    ours = {L.ldm_vae_name(k, 4): tuple(v.shape) + ((1, 1) if ".attentions.0.to_" in k and k.endswith(".weight") else ())
            for k, v in small.state_dict().items()}
    assert ours == original
    full = {t.name: torch.empty(t.shape, device="meta") for t in L.ldm_vae_tensors("", torch.float16)}
    levels = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    back = convert_ldm_vae_checkpoint(full, levels)
    assert {k: tuple(v.shape) for k, v in back.items()} == L.vae_shapes()


def test_a_streamed_file_is_safetensors_with_each_weights_canonical_values(tmp_path):
    from safetensors.torch import load_file

    from smfsr.checkpoint.safe_read import read_header, read_tensors

    tensors = [
        L.Tensor("a.weight", (3, 5), torch.float16, "x.a.weight"),
        L.Tensor("b.norm.weight", (7,), torch.bfloat16, "x.b.norm.weight"),
        L.Tensor("attn.q.weight", (4, 4, 1, 1), torch.float32, "x.q.weight", (4, 4)),  # an ldm 1x1 conv
        L.Tensor("t.q.weight", (6, 8), torch.float8_e4m3fn, "x.t.q.weight", fp8="weight"),
        L.Tensor("t.q.scale_weight", (), torch.float32, "x.t.q.weight", (6, 8), "scale"),
        L.Tensor("scaled_fp8", (0,), torch.float8_e4m3fn, "x.marker"),
    ]
    path = L.write_safetensors(tmp_path / "f.safetensors", tensors, {"format": "pt"})
    metadata, header = read_header(path)
    assert metadata == {"format": "pt"} and header["t.q.scale_weight"] == ((), "F32")
    loaded = load_file(str(path))
    assert loaded["a.weight"].equal(L.values("x.a.weight", (3, 5)).half())
    assert (loaded["b.norm.weight"].float() - 1).abs().max() < 0.2  # a norm's scale is about 1
    assert loaded["attn.q.weight"].flatten().equal(L.values("x.q.weight", (4, 4)).flatten())
    scaled = loaded["t.q.weight"].float() * loaded["t.q.scale_weight"]
    exact = L.values("x.t.q.weight", (6, 8))
    assert (scaled - exact).abs().max() <= exact.abs().max() / 16 and loaded["scaled_fp8"].numel() == 0
    assert all(v.equal(loaded[k]) for k, v in read_tensors(path, list(loaded)))
    assert not list(tmp_path.glob("*.partial"))


def test_encoders_load_in_their_compute_dtype_with_nothing_left_on_meta(tmp_path):
    from smfsr.text_encoders import CHECKPOINT_PREFIXES, _EncoderFile, _encoder_from_file

    files = save_tiny_sd3_text_encoders(tmp_path)
    for name, path in (("t5", files["t5_fp8"]), ("clip_g", files["checkpoint"])):
        model = _encoder_from_file(_EncoderFile(path, CHECKPOINT_PREFIXES[name], name), torch.bfloat16,
                                   t5=name == "t5")
        tensors = list(model.parameters()) + list(model.buffers())
        assert not any(t.is_meta for t in tensors)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_text_encoders_that_cannot_fit_are_refused_with_the_numbers(tmp_path, monkeypatch):
    from smfsr import memory, text_encoders
    from smfsr.checkpoint.safe_read import read_header

    files = save_tiny_sd3_text_encoders(tmp_path)
    sources = text_encoders.find_sources(clip_l=files["clip_l"], clip_g=files["clip_g"], t5=files["t5"],
                                         tokenizers=files["comfy"])
    needed = text_encoders.encoder_bytes(sources)
    largest = max(math.prod(shape) for shape, _ in read_header(files["t5"])[1].values()) * 4
    assert needed["peak"] >= needed["t5"] + needed["clip_l"] + needed["clip_g"] + largest - 1
    monkeypatch.setattr(memory, "free_host_bytes", lambda: needed["peak"] // 2)
    with pytest.raises(SMFSRError, match=r"text encoders need about .* GiB .* are free: encode it once") as e:
        text_encoders.encode_text(sources, "a photo")
    assert "--prompt prompt.safetensors" in str(e.value)


@needs_comfyui
def test_the_mmdit_layout_is_the_one_comfyui_builds_for_sd35_medium():
    """ComfyUI's model detection on our key names finds SD3.5-medium's MMDiT, whose state dict is ours."""
    script = f"""
import json, sys, torch
sys.path[:0] = [{COMFYUI_DIR!r}, {str(REPO)!r}]
sys.argv = ["main.py", "--cpu"]  # ComfyUI's modules read their flags at import, as main.py lets them
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ops, comfy.model_detection
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from bench.layouts import mmdit_shapes
ours = mmdit_shapes(24)
config = comfy.model_detection.detect_unet_config({{k: torch.empty(s, device="meta") for k, s in ours.items()}}, "")
model = MMDiT(**config, device="meta", operations=comfy.ops.disable_weight_init)
theirs = {{k: list(v.shape) for k, v in model.state_dict().items()}}
print(json.dumps({{"config": {{k: v for k, v in config.items() if k != "context_embedder_config"}},
                  "missing": sorted(set(theirs) - set(ours)), "extra": sorted(set(ours) - set(theirs)),
                  "wrong": sorted(k for k in theirs if k in ours and tuple(theirs[k]) != tuple(ours[k]))}}))
"""
    run = subprocess.run([COMFYUI_PYTHON, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["config"]["x_block_self_attn_layers"] == list(range(13)) and found["config"]["qk_norm"] == "rms"
    assert found["config"]["pos_embed_max_size"] == 384
    assert (found["missing"], found["extra"], found["wrong"]) == ([], [], [])


@needs_comfyui
@pytest.mark.slow
def test_fullsize_rehearsal_through_the_cli_comfyui_a1111_and_the_app(tmp_path):
    """The official path at full width (2 of 24 blocks; the text encoders at full size) through the
    CLI and a real ComfyUI with the shipped Stability-files workflows (T5 as Stability's fp8 file, the
    low-memory choice; and the Dual CLIP one, without T5), and through a real A1111 and the app on the
    bundle `smfsr convert` makes of the same files: every door ok, memory as estimated, the same
    pixels as the CLI's on the bundle."""
    from tests.test_a1111 import missing

    require_host(missing("a1111"))
    out = tmp_path / "fullsize"
    run = subprocess.run([sys.executable, "-m", "bench", "fullsize", "--depth", "2", "--doors", "cli,comfyui,a1111,app",
                          "--layouts", "stability_t5fp8,bundle,dual_clip", "--out", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=2400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["door"], r["layout"]): r for r in summary["runs"]}
    assert set(rows) == {("cli", "stability_t5fp8"), ("comfyui", "stability_t5fp8"), ("convert", "stability_t5fp8"),
                         ("cli", "bundle"), ("a1111", "bundle"), ("app", "bundle"), ("comfyui", "dual_clip")}, set(rows)
    assert all(r["ok"] and r["error"] is None for r in rows.values()), rows
    # the app runs this Python's torch: the CLI's pixels; A1111 its own torch 2.1.2: within a level
    assert rows["app", "bundle"]["max_diff_vs_cli"] == 0 and rows["a1111", "bundle"]["max_diff_vs_cli"] <= 2, rows
    cli = rows["cli", "stability_t5fp8"]
    # the CLI's peak is its text encoders' loading peak (the 2-block transformer is small): as estimated
    assert cli["peak_rss_gib"] <= 1.15 * cli["encoders_gib"], cli
    comfyui = rows["comfyui", "stability_t5fp8"]
    # the VAE-only loader and TripleCLIPLoader found every weight but CLIP-L's projection, which SD3's
    # clip_l.safetensors does not have (ComfyUI warns the same for the real file; SD3 does not use it)
    assert comfyui["host_missing"] == ["clip missing: ['text_projection.weight']"], comfyui
    dual = rows["comfyui", "dual_clip"]  # DualCLIPLoader (sd3) with CLIP-L/G: 77 tokens, no T5
    assert set(dual["host_missing"]) <= {"clip missing: ['text_projection.weight']"}, dual


def test_freed_encoders_are_gone_before_the_model_is_checked():
    """A model held only by a reference cycle (its layers' forward bound to themselves, as the float32
    linears are) is collected by release_freed_memory, so the next free-memory check counts it free."""
    import gc
    import weakref

    from smfsr.memory import release_freed_memory
    from smfsr.text_encoders import _linears_in_float32

    gc.disable()  # as if the collector had not run yet
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4)).to(torch.bfloat16)
        _linears_in_float32(model)
        assert model(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
        alive = weakref.ref(model[0])
        del model
        assert alive() is not None  # the cycle keeps it
        release_freed_memory()
        assert alive() is None
    finally:
        gc.enable()
