"""What of the ComfyUI pack runs without ComfyUI: type conversions and the workflow files. The nodes
themselves (which need ComfyUI's modules) are called in tests/test_comfyui.py, in ComfyUI's own
Python and through a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smfsr.errors import SMFSRError
from comfyui_nodes.convert import image_from_core, image_to_core, lr_latent, moments_of, text_from_conditioning

REPO = Path(__file__).resolve().parents[1]


def test_image_conversions():
    bhwc = torch.rand(2, 24, 32, 3)
    assert torch.equal(image_from_core(image_to_core(bhwc)), bhwc)
    rgba = torch.rand(1, 8, 8, 4)
    assert torch.equal(image_to_core(rgba), rgba[..., :3].movedim(-1, 1))  # alpha dropped, as VAEEncode does
    gray = torch.rand(1, 8, 8, 1)
    assert image_to_core(gray).shape == (1, 3, 8, 8)
    with pytest.raises(SMFSRError, match=r"\(B, H, W, C\)"):
        image_to_core(torch.rand(3, 8, 8))


def test_latent_and_conditioning_conversions():
    mean, logvar = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    assert all(torch.equal(a, b) for a, b in zip(moments_of(lr_latent(mean, logvar)), (mean, logvar)))
    assert moments_of({"samples": mean})[1] is None  # a plain VAE Encode LATENT works too
    embeds, pooled = torch.randn(1, 5, 16), torch.randn(1, 16)
    got = text_from_conditioning([[embeds, {"pooled_output": pooled}]])
    assert got[0] is embeds and got[1] is pooled
    with pytest.raises(SMFSRError, match="pooled"):
        text_from_conditioning([[embeds, {}]])


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


def test_no_workflow_takes_clip_from_a_checkpoint_that_holds_none():
    """Stability's sd3.5_medium.safetensors holds the MMDiT and the VAE only: a graph that feeds its
    CLIP output to CLIPTextEncode fails with "clip input is invalid: None". Every checkpoint a
    shipped workflow names is one whose contents are known, and CLIP comes only from one that has it."""
    from workflows.build import SD35_FILES, SOCKETS_OUT

    for path in sorted((REPO / "workflows" / "api").glob("*.json")):
        prompt = json.loads(path.read_text())
        for node in prompt.values():
            for value in node["inputs"].values():
                if not isinstance(value, list):
                    continue
                source = prompt[value[0]]
                if source["class_type"] != "CheckpointLoaderSimple":
                    continue
                ckpt = source["inputs"]["ckpt_name"]
                assert ckpt in SD35_FILES, f"{path.name}: what does {ckpt} hold? (add it to SD35_FILES)"
                output = SOCKETS_OUT["CheckpointLoaderSimple"][value[1]][0]
                assert output in SD35_FILES[ckpt], f"{path.name}: {output} taken from {ckpt}, which holds none"
    stability = json.loads((REPO / "workflows" / "api" / "smfsr_sd35.json").read_text())
    loaders = {n["class_type"] for n in stability.values()}
    assert {"TripleCLIPLoader", "SMFSRCheckpointVAELoader"} <= loaders and "CheckpointLoaderSimple" not in loaders
    # the fp8 T5 by default: with fp16 the graph does not fit a 24 GB machine on a CPU (bench/RESULTS.md)
    assert next(n for n in stability.values() if n["class_type"] == "TripleCLIPLoader")["inputs"]["clip_name3"] == \
        "t5xxl_fp8_e4m3fn.safetensors"
    # Comfy-Org's all-in-one: its VAE and encoders only, the MMDiT never loaded
    all_in_one = json.loads((REPO / "workflows" / "api" / "smfsr_sd35_all_in_one.json").read_text())
    loaders = {n["class_type"] for n in all_in_one.values()}
    assert {"SMFSRCheckpointCLIPLoader", "SMFSRCheckpointVAELoader"} <= loaders and "CheckpointLoaderSimple" not in loaders
