"""SD3.5's prompt embedding from the downloads (issue 21): tiny random text encoders in the
diffusers-folder and single-file layouts, encoded as diffusers' SD3 pipeline does; a bundle from
the official layout plus an SD3.5 folder that `smfsr upscale` runs; and each wrong input's message."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, TINY_TEXT, diffusers_reference_embedding, photo_like, save_tiny_sd3_text_encoders

pytest.importorskip("transformers", reason="prompt encoding needs transformers (pip install 'smfsr[prompt]')")
TEXT = "a small house by the sea, sharp photo"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_sd3_text_encoders(tmp_path_factory.mktemp("sd3-text"))


@pytest.fixture(scope="module")
def reference(encoders):
    return diffusers_reference_embedding(encoders["sd35"], TEXT)


def smfsr(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smfsr.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def written(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(path))
    return tensors["embeds"], tensors["pooled"]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["diffusers folder", "single files + ComfyUI tokenizers", "single-file checkpoint"])
def test_encode_prompt_gives_the_diffusers_pipelines_tensors(encoders, reference, tmp_path, form):
    out = tmp_path / "prompt.safetensors"
    source = {"diffusers folder": ["--sd35", encoders["sd35"]],
              "single files + ComfyUI tokenizers": ["--clip-l", encoders["clip_l"], "--clip-g", encoders["clip_g"],
                                                    "--t5", encoders["t5"], "--tokenizers", encoders["comfy"]],
              "single-file checkpoint": ["--sd35", encoders["checkpoint"], "--tokenizers", encoders["sd35"]]}[form]
    run = smfsr("encode-prompt", "--text", TEXT, "-o", out, "--t5-dtype", "fp32", *source)
    assert run.returncode == 0, run.stderr
    embeds, pooled = written(out)
    assert embeds.shape == (1, 77 + 256, TINY_TEXT["t5"]) and pooled.shape == (1, TINY_TEXT["clip_l"] + TINY_TEXT["clip_g"])
    assert (embeds - reference[0]).abs().max() <= 1e-5 and (pooled - reference[1]).abs().max() <= 1e-5
    assert load_file  # the file is plain safetensors; its metadata keeps the text
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["prompt"] == TEXT


@pytest.mark.slow
def test_t5_tokens_77_gives_the_training_and_comfyui_length(encoders, tmp_path):
    """--t5-tokens 77: 77 CLIP + 77 T5 = 154 tokens (the official training's and ComfyUI's SD3
    CLIPTextEncode's length), equal to diffusers' pipeline at max_sequence_length=77."""
    out = tmp_path / "prompt77.safetensors"
    run = smfsr("encode-prompt", "--text", TEXT, "-o", out, "--t5-dtype", "fp32", "--t5-tokens", "77",
                "--sd35", encoders["sd35"])
    assert run.returncode == 0, run.stderr
    embeds, pooled = written(out)
    reference = diffusers_reference_embedding(encoders["sd35"], TEXT, max_sequence_length=77)
    assert embeds.shape == (1, 154, TINY_TEXT["t5"])
    assert (embeds - reference[0]).abs().max() <= 1e-5 and (pooled - reference[1]).abs().max() <= 1e-5


def test_t5_in_bf16_and_from_an_fp8_file_stays_close(encoders, reference):
    from smfsr.text_encoders import encode_prompt, find_sources, load_pipeline

    bf16 = encode_prompt(load_pipeline(find_sources(encoders["sd35"])), TEXT)  # the default: T5 in bf16
    fp8 = encode_prompt(load_pipeline(find_sources(clip_l=encoders["clip_l"], clip_g=encoders["clip_g"],
                                                   t5=encoders["t5_fp8"], tokenizers=encoders["sd35"])), TEXT)
    t5_part = slice(77, None)
    for got, tolerance in ((bf16, 0.02), (fp8, 0.1)):
        assert torch.equal(got[1], reference[1])  # pooled: CLIP only
        ref_t5, got_t5 = reference[0][:, t5_part], got[0][:, t5_part]
        assert (got_t5 - ref_t5).abs().max() / ref_t5.abs().max() < tolerance


@pytest.mark.slow
def test_convert_with_sd35_makes_a_bundle_that_upscales(encoders, tmp_path):
    from smfsr.checkpoint import build_transformer
    from smfsr.models import transformer_config
    from smfsr.text_encoders import DEFAULT_PROMPT
    from tests.helpers import write_official_folder

    model = build_transformer(transformer_config("tiny-official", joint_attention_dim=TINY_TEXT["t5"],
                                                 pooled_projection_dim=TINY_TEXT["clip_l"] + TINY_TEXT["clip_g"]))
    official = write_official_folder(tmp_path / "smfsr_q", model)
    bundle = tmp_path / "smfsr_q.safetensors"
    run = smfsr("convert", "--transformer", official, "--sd35", encoders["sd35"], "-o", bundle)
    assert run.returncode == 0, run.stderr
    info = smfsr("info", bundle)
    assert "stored embedding" in info.stdout and DEFAULT_PROMPT[:20] in info.stdout and "AutoencoderKL" in info.stdout
    embeds, pooled = load_file(str(bundle))["prompt.embeds"], load_file(str(bundle))["prompt.pooled"]
    want = diffusers_reference_embedding(encoders["sd35"], DEFAULT_PROMPT)
    # stored in fp16; T5 ran in bf16 (the default)
    assert (pooled.float() - want[1]).abs().max() < 1e-2 and embeds.shape == want[0].shape
    Image.fromarray(photo_like(24, 32)).save(tmp_path / "in.png")
    run = smfsr("upscale", tmp_path / "in.png", "-o", tmp_path / "out.png", "--model", bundle)
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "out.png").size == (128, 96)
    # a prompt of the user's, encoded for this run
    run = smfsr("upscale", tmp_path / "in.png", "-o", tmp_path / "out2.png", "--model", bundle, "--sd35",
                encoders["sd35"], "--prompt-text", TEXT)
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "out2.png").size == (128, 96)


def test_the_vae_of_a_single_file_checkpoint_is_converted_by_diffusers_rules(encoders):
    from smfsr.checkpoint import import_vae

    ours, theirs = import_vae(encoders["checkpoint"]), import_vae(encoders["sd35"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours.decoder(ours.encoder(x)[:, :4]), theirs.decoder(theirs.encoder(x)[:, :4]), atol=1e-5)


@pytest.mark.slow
def test_wrong_inputs_say_what_is_wrong(encoders, tmp_path):
    out = tmp_path / "p.safetensors"
    (tmp_path / "not-sd35").mkdir()
    (tmp_path / "not-sd35" / "unet").mkdir()
    cases = [
        (["--sd35", tmp_path / "not-sd35"], "is not a diffusers SD3.5 folder"),
        (["--sd35", tmp_path / "missing"], "no such file or folder"),
        (["--clip-l", encoders["clip_l"]], "no --clip-g, --t5 given"),
        (["--clip-l", encoders["clip_l"], "--clip-g", encoders["clip_g"], "--t5", encoders["t5"]], "carry no tokenizers"),
        (["--clip-l", encoders["clip_g"], "--clip-g", encoders["clip_g"], "--t5", encoders["clip_l"], "--tokenizers",
          encoders["sd35"]], "holds no T5 encoder"),
        ([], "name SD3.5's text encoders"),
    ]
    pickled = tmp_path / "t5xxl.bin"
    pickled.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    cases.append((["--clip-l", encoders["clip_l"], "--clip-g", encoders["clip_g"], "--t5", pickled, "--tokenizers",
                   encoders["sd35"]], "pickled PyTorch checkpoint"))
    cases.append((["--sd35", encoders["sd35"], "--text", "word " * 300], "T5 tokens; the encoders read at most 256"))
    stability = tmp_path / "sd3.5_medium.safetensors"  # Stability's layout: MMDiT + VAE, no encoders
    save_file({"model.diffusion_model.x": torch.zeros(2), "first_stage_model.decoder.conv_in.weight": torch.zeros(2)},
              str(stability))
    cases.append((["--sd35", stability, "--tokenizers", encoders["sd35"]],
                  "holds no clip_l, clip_g, t5 text encoder(s) (Stability publishes sd3.5_medium.safetensors as the "
                  "MMDiT and the VAE only"))
    cases.append((["--sd35", stability, "--clip-l", encoders["clip_l"], "--tokenizers", encoders["sd35"]],
                  "add --clip-g models/text_encoders/clip_g.safetensors --t5 models/text_encoders/t5xxl_fp16.safetensors"))
    # a diffusers folder with a component missing (a download cut short or left out): the part named
    no_t5 = tmp_path / "no-t5"
    shutil.copytree(encoders["sd35"], no_t5, ignore=shutil.ignore_patterns("text_encoder_3"))
    cases.append((["--sd35", no_t5], "the SD3.5 folder " + str(no_t5) + " is incomplete: it lacks text_encoder_3/ (T5-XXL)"))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(encoders["sd35"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    cases.append((["--sd35", no_weights], "it lacks text_encoder/*.safetensors (CLIP-L), text_encoder_2/*.safetensors "
                                          "(CLIP-G), text_encoder_3/*.safetensors (T5-XXL)"))
    cut = tmp_path / "t5xxl_fp16.safetensors"  # a truncated encoder file: said before anything loads
    cut.write_bytes(Path(encoders["t5"]).read_bytes()[:-1000])
    cases.append((["--clip-l", encoders["clip_l"], "--clip-g", encoders["clip_g"], "--t5", cut, "--tokenizers",
                   encoders["sd35"]], "truncated"))
    for args, message in cases:
        run = smfsr("encode-prompt", "-o", out, *args)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
        assert not out.exists()
