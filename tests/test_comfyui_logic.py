"""The ComfyUI nodes' logic without ComfyUI: type conversions, the modular chain's arithmetic (the
same core calls the nodes make), and the workflow files. The real server is tests/test_comfyui.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_nodes.convert import image_from_core, image_to_core, lr_latent, moments_of, text_from_conditioning
from smfsr.codec import LatentCodec
from smfsr.color import color_fix
from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions, resize
from tests.conftest import photo_like, tiny_bundle

REPO = Path(__file__).resolve().parents[1]


def test_image_conversions():
    bhwc = torch.rand(2, 24, 32, 3)
    assert torch.equal(image_from_core(image_to_core(bhwc)), bhwc)
    rgba = torch.rand(1, 8, 8, 4)
    assert torch.equal(image_to_core(rgba), rgba[..., :3].movedim(-1, 1))  # alpha dropped, as VAEEncode does
    gray = torch.rand(1, 8, 8, 1)
    assert image_to_core(gray).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        image_to_core(torch.rand(3, 8, 8))


def test_latent_and_conditioning_conversions():
    mean, logvar = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    assert all(torch.equal(a, b) for a, b in zip(moments_of(lr_latent(mean, logvar)), (mean, logvar)))
    assert moments_of({"samples": mean})[1] is None  # a plain VAE Encode LATENT works too
    embeds, pooled = torch.randn(1, 5, 16), torch.randn(1, 16)
    got = text_from_conditioning([[embeds, {"pooled_output": pooled}]])
    assert got[0] is embeds and got[1] is pooled
    with pytest.raises(ValueError, match="pooled"):
        text_from_conditioning([[embeds, {}]])


def test_the_modular_chain_equals_the_one_node_upscale():
    """LR Encode -> Sampler -> Tiled VAE Decode -> Color Fix, step by step as the nodes do it."""
    up = SMFSRUpscaler(tiny_bundle())
    image = torch.from_numpy(photo_like(40, 56)).float()[None] / 255  # IMAGE (B, H, W, C)
    seed, target = 11, (160, 224)
    # SMFSR LR Encode
    x = image_to_core(image)
    control = up.prepare(x)
    latent = lr_latent(*up.codec.moments(control))
    # SMFSR Sampler (raw latents in and out)
    mean, logvar = moments_of(latent)
    embeds, pooled = up.text(1, None, None)
    out = up.codec.denormalize(up.generate(mean, logvar, seeds=[seed], steps=1, tile=64, overlap=24,
                                           embeds=embeds, pooled=pooled))
    # SMFSR Tiled VAE Decode (raw latent: no scaling) and resize to the target size
    decoded = resize(LatentCodec(up.codec.vae, 1.0, 0.0).decode(out), *target)
    # SMFSR Color Fix against the LoadImage output
    chain = color_fix(image_to_core(image_from_core(decoded)), resize(image_to_core(image), *target), "adain")
    one_node = up.upscale_tensor(x, UpscaleOptions(seed=seed, tile_size=64, tile_overlap=24))
    assert torch.allclose(chain, one_node, atol=1e-6)


def test_workflow_files_are_generated_from_one_source():
    result = subprocess.run([sys.executable, str(REPO / "workflows" / "build.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    from workflows.build import SOCKETS_IN, WIDGETS

    for path in (REPO / "workflows" / "api").glob("*.json"):
        prompt = json.loads(path.read_text())
        for node_id, node in prompt.items():
            assert node["class_type"] in WIDGETS, f"{path.name}: unknown node {node['class_type']}"
            for name, value in node["inputs"].items():
                if isinstance(value, list):  # a link: [source id, output index]
                    assert value[0] in prompt and name in dict(SOCKETS_IN[node["class_type"]]), f"{path.name}: {node_id}.{name}"
                else:
                    assert name in WIDGETS[node["class_type"]], f"{path.name}: {node_id}.{name}"
    ui = json.loads((REPO / "workflows" / "smfsr_sd35.json").read_text())
    note = next(n for n in ui["nodes"] if n["type"] == "Note")
    assert "sd3.5_medium.safetensors" in note["widgets_values"][0] and "GB" in note["widgets_values"][0]
