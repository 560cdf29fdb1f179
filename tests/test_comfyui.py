"""Integration with a real ComfyUI server: runs only where one can be started.

Set COMFYUI_DIR to a ComfyUI checkout (0.8.x) and, if its Python is not this one, COMFYUI_PYTHON
to an interpreter that runs it (it needs torch + torchvision and ComfyUI's requirements, plus this
package's: `pip install -e <this repo>` in that environment).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.comfyui_server import Comfy, comfyui, prepare_base
from tests.helpers import DOOR_SEED, cannot_import, door_input, host_marker, library_result, photo_like, \
    truncation_mismatches

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
NODES = ["SMFSRModelLoader", "SMFSRCheckpointVAELoader", "SMFSRCheckpointCLIPLoader", "SMFSRLREncode", "SMFSRSampler", "SMFSRTiledVAEDecode",
         "SMFSRColorFix", "SMFSRUpscale"]


def _missing() -> str | None:
    if not COMFYUI_DIR:
        return "COMFYUI_DIR is not set (point it at a ComfyUI checkout to run the ComfyUI integration tests)"
    if not (Path(COMFYUI_DIR) / "main.py").exists():
        return f"COMFYUI_DIR={COMFYUI_DIR} has no main.py"
    # the pack's own requirements, as install.py puts them in the host's venv (smfsr itself comes from
    # the pack's folder, which ComfyUI puts on the path)
    return cannot_import(COMFYUI_PYTHON, "torch, torchvision, aiohttp, diffusers, safetensors",
                         hint=f"run {COMFYUI_PYTHON} install.py")


pytestmark = host_marker(_missing())


def output_image(server: Comfy, entry: dict) -> np.ndarray:
    path = server.base / "fetched.png"
    path.write_bytes(server.output_file(entry))
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_bundle_path):
    base = prepare_base(tmp_path_factory.mktemp("comfy"))
    (base / "models" / "smfsr").mkdir(parents=True)
    shutil.copy(tiny_bundle_path, base / "models" / "smfsr" / "tiny.safetensors")
    (base / "models" / "smfsr" / "broken.safetensors").write_bytes(tiny_bundle_path.read_bytes()[:4000])
    Image.fromarray(photo_like(40, 56)).save(base / "input" / "example.png")
    Image.fromarray(photo_like(96, 96, seed=3)).save(base / "input" / "large.png")
    write_other_pack(base / "custom_nodes" / "zz_other_pack")
    with comfyui(base, COMFYUI_DIR, COMFYUI_PYTHON, other_packs=("zz_other_pack",)) as server:
        yield server


OTHER_PACK = """
import os, sys
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # as many packs do
from bench import MARKER  # its own modules, named as this repository's folders are
from scripts.probe import SUFFIX


class OtherPackProbe:
    CATEGORY = "other"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return {}


NODE_CLASS_MAPPINGS = {"OtherPackProbe": OtherPackProbe}
NODE_DISPLAY_NAME_MAPPINGS = {"OtherPackProbe": MARKER + SUFFIX}
"""


def write_other_pack(folder: Path) -> None:
    """A second custom-node pack with its own ``bench`` and ``scripts`` modules, loaded after this one.
    (Not ``tests`` or ``models``: ComfyUI's own folders of those names come first on its sys.path.)"""
    for package, text in (("bench", "MARKER = 'other pack'\n"), ("scripts", "")):
        (folder / package).mkdir(parents=True, exist_ok=True)
        (folder / package / "__init__.py").write_text(text)
    (folder / "scripts" / "probe.py").write_text("SUFFIX = ': its own modules'\n")
    (folder / "__init__.py").write_text(OTHER_PACK)


def test_another_pack_imports_its_own_modules_named_like_ours(comfy):
    """This pack registers only its core package ``smfsr``: its bench/ and scripts/ folders do not
    shadow another pack's modules of the same names."""
    info = comfy.get("/object_info")
    assert "OtherPackProbe" in info, "the second pack failed to import beside this one"
    assert info["OtherPackProbe"]["display_name"] == "other pack: its own modules"
    assert "SMFSRUpscale" in info


def api_workflow(name: str, **changes) -> dict:
    """A shipped API workflow with widget values changed; a change no node takes is a test bug."""
    prompt = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    used = set()
    for node in prompt.values():
        for key, value in changes.items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = value
                used.add(key)
    assert used == set(changes), f"no node of {name} has {set(changes) - used}"
    return prompt


def test_every_node_is_registered_with_tooltips_and_the_workflow_widget_order(comfy):
    from workflows.build import WIDGETS

    info = comfy.get("/object_info")
    for node in NODES:
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["category"] == "SMFSR"
        for group in ("required", "optional"):
            for name, spec in info[node]["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
        declared = info[node]["input_order"]["required"] + info[node]["input_order"].get("optional", [])
        widgets = [n for n in declared if n in WIDGETS[node]]
        assert widgets == WIDGETS[node], f"{node}: workflow widget order {WIDGETS[node]} vs ComfyUI {widgets}"
    spec = info["SMFSRModelLoader"]["input"]["required"]["model_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combos: ("COMBO", {"options": [...]})
    assert "tiny.safetensors" in options and "broken.safetensors" in options
    assert {"smfsr-small-x4.safetensors", "smfsr-small-x4-q.safetensors"} <= set(options)  # shipped, by name
    assert spec[1]["default"] == "smfsr-small-x4.safetensors"  # a new loader starts on the default model
    assert info["SMFSRModelLoader"]["input"]["required"]["weights"][1]["options"] == ["auto", "fp8_e4m3fn"]
    # two tiles, two names, each tooltip saying its unit
    sampler = info["SMFSRSampler"]["input"]["required"]
    assert "latent cells" in sampler["latent_tile"][1]["tooltip"]
    assert "latent cells" in info["SMFSRTiledVAEDecode"]["input"]["required"]["vae_tile"][1]["tooltip"]
    assert "take exactly 1" in sampler["steps"][1]["tooltip"]
    assert not any(o.endswith((".json", ".md")) for o in options)  # the folder is filtered to safetensors
    # the ranges and lists are the core's, as every door offers them (tests/test_widgets.py)
    from smfsr import options as o

    for name, r in (("steps", o.STEPS), ("latent_tile", o.LATENT_TILE), ("latent_tile_overlap", o.LATENT_TILE_OVERLAP)):
        assert (sampler[name][1]["min"], sampler[name][1]["max"]) == (r.minimum, r.maximum), name
    vae_tile = info["SMFSRTiledVAEDecode"]["input"]["required"]["vae_tile"][1]
    assert (vae_tile["min"], vae_tile["max"], vae_tile["step"]) == (o.VAE_TILE.minimum, o.VAE_TILE.maximum, o.VAE_TILE.step)
    loader = info["SMFSRModelLoader"]["input"]["required"]
    assert loader["dtype"][1]["options"] == list(o.DTYPE_CHOICES)
    assert (loader["block_swap"][1]["min"], loader["block_swap"][1]["max"]) == (o.BLOCK_SWAP.minimum, o.BLOCK_SWAP.maximum)
    assert info["SMFSRUpscale"]["input"]["required"]["color_fix"][1]["options"] == list(o.COLOR_FIX_CHOICES)


def test_both_workflows_give_the_library_pixels(comfy, tiny_bundle_path):
    """One node and the four-node chain, every widget at its default but the seed: the same pixels
    as each other, and the library's result as SaveImage quantises it (x 255, truncated)."""
    shutil.copy(door_input(comfy.base), comfy.base / "input" / "door.png")
    got = {}
    for workflow in ("smfsr_upscale", "smfsr_modular"):
        entry = comfy.run(api_workflow(workflow, model_name="tiny.safetensors", image="door.png", dtype="fp32",
                                       seed=DOOR_SEED))
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "success", [(e["exception_message"], e["traceback"][-3:]) for e in errors]
        got[workflow] = output_image(comfy, entry)
    assert np.array_equal(got["smfsr_upscale"], got["smfsr_modular"])
    result = library_result(tiny_bundle_path, comfy.base / "input" / "door.png", python=COMFYUI_PYTHON)
    assert truncation_mismatches(got["smfsr_upscale"], result) == 0


def test_the_nodes_called_in_comfyuis_python_chain_to_the_one_node_result(tiny_bundle_path, tmp_path):
    """The node classes themselves (ComfyUI's modules imported, no server): the modular chain's
    IMAGE is the one node's and the library's, to the bit."""
    script = tmp_path / "nodes.py"
    script.write_text(NODE_SCRIPT)
    run = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_DIR, str(REPO), str(tiny_bundle_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "modular == one node: True" in run.stdout and "one node == library: True" in run.stdout, run.stdout
    assert "rebuilt latent: lr_latent has lost SMFSR's posterior variance" in run.stdout, run.stdout
    assert "connect SMFSR LR Encode's lr_latent directly to SMFSR Sampler" in run.stdout
    assert "two steps: this model was trained for 1 step(s) only" in run.stdout, run.stdout
    assert "set the steps widget to 1" in run.stdout and "--steps" not in run.stdout  # in ComfyUI's terms
    assert "shipped by name: smfsr-small-x4 1" in run.stdout, run.stdout


NODE_SCRIPT = """
import sys
from pathlib import Path
comfy_dir, repo, model = sys.argv[1:4]
sys.path[:0] = [comfy_dir, repo]
sys.argv = ["main.py", "--cpu"]  # ComfyUI's modules read their flags at import, as main.py lets them
import comfy.options
comfy.options.enable_args_parsing()
import torch
import folder_paths
folder_paths.folder_names_and_paths["smfsr"] = ([str(Path(model).parent)], {".safetensors"})
from comfyui_nodes.nodes import (SMFSRColorFix, SMFSRLREncode, SMFSRModelLoader, SMFSRSampler, SMFSRTiledVAEDecode,
                                 SMFSRUpscale)
image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(0))
m = SMFSRModelLoader.execute(Path(model).name, "fp32").result[0]
lr, _ = SMFSRLREncode.execute(image, m, 0).result
latent = SMFSRSampler.execute(m, lr, 7, 0, 0, 0).result[0]
decoded = SMFSRTiledVAEDecode.execute(latent, 0, smfsr_model=m).result[0]
chain = SMFSRColorFix.execute(decoded, image, "auto", 0.0, smfsr_model=m).result[0]
one = SMFSRUpscale.execute(image, m, 0.0, 7, 0, 0, 0, "auto", 0).result[0]
from smfsr.options import UpscaleOptions
from smfsr.pipeline import SMFSRUpscaler
library = SMFSRUpscaler.from_pretrained(model, device="cpu", dtype="fp32").upscale_tensor(image.movedim(-1, 1),
                                                                                         UpscaleOptions(seed=7))
print("shapes", tuple(chain.shape), tuple(one.shape))
print("modular == one node:", torch.equal(chain, one))
print("one node == library:", torch.equal(one, library.movedim(1, -1)))
try:  # a LATENT rebuilt by another node ({"samples": ...} only) lost the posterior variance
    SMFSRSampler.execute(m, {"samples": lr["samples"]}, 7, 0, 0, 0)
except RuntimeError as e:
    print("rebuilt latent:", e)
shipped = SMFSRModelLoader.execute("smfsr-small-x4", "fp32").result[0]  # a shipped model's bare name
print("shipped by name:", shipped.name, shipped.bundle.defaults.max_steps)
try:  # a one-step model refuses more, saying so in ComfyUI's terms
    SMFSRSampler.execute(shipped, SMFSRLREncode.execute(image, shipped, 0).result[0], 7, 2, 0, 0)
except RuntimeError as e:
    print("two steps:", e)
"""


def test_the_shipped_workflow_runs_the_default_model_as_is(comfy):
    """No model to install: the workflow names the default model, which the loader finds in the
    repository's models/ folder."""
    from smfsr.checkpoint.default_model import SHIPPED_MODEL

    entry = comfy.run(api_workflow("smfsr_upscale", image="example.png", dtype="fp32"))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    got = output_image(comfy, entry)
    result = library_result(SHIPPED_MODEL, comfy.base / "input" / "example.png", seed=0, python=COMFYUI_PYTHON)
    assert got.shape == result.shape == (160, 224, 3)
    assert truncation_mismatches(got, result) == 0


@pytest.mark.parametrize("workflow", ["smfsr_sd35", "smfsr_sd35_all_in_one", "smfsr_sd35_dual_clip"])
def test_sd35_workflows_are_valid_and_ask_only_for_the_missing_weights(comfy, workflow):
    status, reply = comfy.post("/prompt", {"prompt": api_workflow(workflow, image="example.png")})
    assert status == 400
    bad = {i["extra_info"]["input_name"] for e in reply["node_errors"].values() for i in e["errors"]}
    assert bad and bad <= {"ckpt_name", "model_name", "clip_name1", "clip_name2", "clip_name3"}, reply


@pytest.mark.slow
def test_the_checkpoint_vae_loader_reads_only_the_vae_and_gives_comfyuis_vae(tmp_path):
    """Stability's sd3.5_medium.safetensors layout (an MMDiT part + first_stage_model.*, random weights
    in SD3.5's VAE shapes): the node's VAE decodes as the core's ldm VAE of the same tensors, and a
    checkpoint without a VAE is refused by name, as is one without text encoders by the CLIP loader
    (which loads Comfy-Org's all-in-one file in bench.fullsize, at the encoders' real size)."""
    import torch
    from safetensors.torch import save_file

    from smfsr.checkpoint import build_vae
    from smfsr.models.presets import vae_config
    from tests.helpers import ldm_vae

    torch.manual_seed(0)
    vae = build_vae(vae_config("sd35")).eval()
    tensors = {f"first_stage_model.{k}": v.contiguous() for k, v in ldm_vae(vae).state_dict().items()}
    tensors["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(1536, 16, 2, 2)  # stands for the MMDiT
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    save_file(tensors, str(folder / "sd3.5_medium.safetensors"))
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(folder / "mmdit_only.safetensors"))
    script = tmp_path / "vae.py"
    script.write_text(VAE_SCRIPT)
    run = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_DIR, str(REPO), str(folder)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "keys read: 0 of the MMDiT" in run.stdout, run.stdout
    difference = float(run.stdout.split("decode max diff:")[1].split()[0])
    assert difference < 1e-4, run.stdout
    assert "mmdit_only.safetensors holds no VAE" in run.stdout, run.stdout
    assert "sd3.5_medium.safetensors holds no text encoders" in run.stdout, run.stdout
    assert "TripleCLIPLoader (models/text_encoders/clip_l, clip_g, t5xxl_fp8_e4m3fn)" in run.stdout, run.stdout


SWAP_SCRIPT = """
import sys, torch
sys.path[:0] = [comfy_dir, repo]
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_patcher
from comfyui_nodes.model import Managed
from smfsr.checkpoint import build_transformer
from smfsr.models import transformer_config
from smfsr.offload import BlockSwap

t = build_transformer(transformer_config("tiny")).eval()
z = torch.randn(1, t.config.in_channels, 8, 8)
args = (z, z, torch.randn(1, 5, t.config.joint_attention_dim), torch.randn(1, t.config.pooled_projection_dim),
        torch.ones(1), torch.zeros(1))
with torch.no_grad():
    before = t(*args)
t.block_swap = BlockSwap(t.transformer_blocks, 1, "cpu")  # block 0 streamed, the others ComfyUI's
patcher = comfy.model_patcher.ModelPatcher(Managed(t), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
swapped = sum(p.nbytes for p in t.transformer_blocks[0].parameters())
total = sum(v.nbytes for v in t.state_dict().values())
print("sizes", patcher.model_size() == total - swapped, swapped > 0)
names = [n for n, _ in patcher.model.named_modules()]
print("keys", any(k.startswith("module.transformer_blocks.0.") for k in patcher.model.state_dict()),
      any(n.startswith("module.transformer_blocks.0") for n in names),
      any(n.startswith("module.transformer_blocks.1.") for n in names))
patcher.load(torch.device("cpu"), lowvram_model_memory=1, full_load=False)  # as a partial load would
print("untouched", all(p.data_ptr() == copy.data_ptr() for p, copy in t.block_swap.stored[0]))
with torch.no_grad():
    print("same", torch.equal(t(*args), before))
"""


def test_comfyuis_model_patcher_leaves_swapped_blocks_to_block_swap(tmp_path):
    """ModelPatcher sizes and moves a model parameter by parameter: it must not see the blocks
    BlockSwap streams (it would pin them on the GPU, or orphan their stored copies)."""
    run = subprocess.run([COMFYUI_PYTHON, "-c", f"comfy_dir, repo = {COMFYUI_DIR!r}, {str(REPO)!r}\n" + SWAP_SCRIPT],
                         capture_output=True, text=True, cwd=COMFYUI_DIR, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sizes True True" in run.stdout and "keys False False True" in run.stdout, run.stdout
    assert "untouched True" in run.stdout and "same True" in run.stdout, run.stdout


VAE_SCRIPT = """
import sys
from pathlib import Path
comfy_dir, repo, folder = sys.argv[1:4]
sys.path[:0] = [comfy_dir, repo]
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import folder_paths
folder_paths.folder_names_and_paths["checkpoints"] = ([folder], {".safetensors"})
from comfyui_nodes.model import checkpoint_vae_state
from comfyui_nodes.nodes import SMFSRCheckpointVAELoader
state = checkpoint_vae_state(Path(folder) / "sd3.5_medium.safetensors")
print("keys read:", sum(k.startswith("model.") for k in state), "of the MMDiT")
vae = SMFSRCheckpointVAELoader.execute("sd3.5_medium.safetensors").result[0]
from smfsr.checkpoint import import_vae
from smfsr.pipeline import decode_latent
z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
ours = vae.decode(z).movedim(-1, 1)  # ComfyUI's own decode: (B, H, W, C) in [0, 1]
reference = decode_latent(import_vae(Path(folder) / "sd3.5_medium.safetensors"), z, None)
print("decode max diff:", (ours.float() - reference).abs().max().item())
try:
    SMFSRCheckpointVAELoader.execute("mmdit_only.safetensors")
except RuntimeError as e:
    print(e)
from comfyui_nodes.nodes import SMFSRCheckpointCLIPLoader
try:  # Stability's file: no encoders inside
    SMFSRCheckpointCLIPLoader.execute("sd3.5_medium.safetensors")
except RuntimeError as e:
    print(e)
"""


def test_a_broken_model_file_gives_a_node_error_naming_it(comfy):
    entry = comfy.run(api_workflow("smfsr_upscale", model_name="broken.safetensors", image="example.png"))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "broken.safetensors" in errors[0]["exception_message"]
    assert "truncated" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "SMFSRModelLoader"


def test_interrupt_stops_a_tiled_run(comfy):
    prompt = api_workflow("smfsr_upscale", model_name="tiny.safetensors", image="large.png", latent_tile=4,
                          latent_tile_overlap=0, steps=20, seed=7)
    status, reply = comfy.post("/prompt", {"prompt": prompt, "client_id": "smfsr-tests"})
    assert status == 200
    deadline = time.time() + 60
    while not comfy.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)
    started = time.time()
    comfy.post("/interrupt")
    entry = comfy.wait(reply["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    assert time.time() - started < 30
