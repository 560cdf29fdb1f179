"""Writes the example workflows from one source: UI format (``workflows/*.json``, shown in ComfyUI's
template browser) and API format (``workflows/api/*.json``, for ``POST /prompt`` and the tests).

    python workflows/build.py          # rewrite both
    python workflows/build.py --check  # exit 1 if a file differs from what this script writes
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK = {"aux_id": "smfsr/smfsr", "ver": "0.1.0"}
CORE = {"cnr_id": "comfy-core", "ver": "0.8.0"}

# Widget inputs of each node class, in the order the node declares them (the UI format stores
# widget values as a list in this order; a seed widget is followed by its "control after generate").
WIDGETS = {
    "LoadImage": ["image", "upload"],
    "SaveImage": ["filename_prefix"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "TripleCLIPLoader": ["clip_name1", "clip_name2", "clip_name3"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "SMFSRCheckpointVAELoader": ["ckpt_name"],
    "SMFSRCheckpointCLIPLoader": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "Note": ["text"],
    "SMFSRModelLoader": ["model_name", "dtype", "weights", "block_swap", "compile"],
    "SMFSRLREncode": ["vae_tile"],
    "SMFSRSampler": ["seed", "steps", "latent_tile", "latent_tile_overlap"],
    "SMFSRTiledVAEDecode": ["vae_tile"],
    "SMFSRColorFix": ["color_fix", "scale"],
    "SMFSRUpscale": ["scale", "seed", "steps", "latent_tile", "latent_tile_overlap", "color_fix", "vae_tile"],
}
SEEDS = {"seed"}
# Socket inputs and outputs (name, type), in declaration order.
SOCKETS_IN = {
    "SaveImage": [("images", "IMAGE")],
    "CLIPTextEncode": [("clip", "CLIP")],
    "SMFSRLREncode": [("image", "IMAGE"), ("smfsr_model", "SMFSR_MODEL"), ("vae", "VAE")],
    "SMFSRSampler": [("smfsr_model", "SMFSR_MODEL"), ("lr_latent", "LATENT"), ("conditioning", "CONDITIONING")],
    "SMFSRTiledVAEDecode": [("samples", "LATENT"), ("vae", "VAE"), ("smfsr_model", "SMFSR_MODEL")],
    "SMFSRColorFix": [("image", "IMAGE"), ("reference", "IMAGE"), ("smfsr_model", "SMFSR_MODEL")],
    "SMFSRUpscale": [("image", "IMAGE"), ("smfsr_model", "SMFSR_MODEL"), ("vae", "VAE")],
}
SOCKETS_OUT = {
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "TripleCLIPLoader": [("CLIP", "CLIP")],
    "DualCLIPLoader": [("CLIP", "CLIP")],
    "SMFSRCheckpointVAELoader": [("VAE", "VAE")],
    "SMFSRCheckpointCLIPLoader": [("CLIP", "CLIP")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "SMFSRModelLoader": [("smfsr_model", "SMFSR_MODEL")],
    "SMFSRLREncode": [("lr_latent", "LATENT"), ("lr_upscaled", "IMAGE")],
    "SMFSRSampler": [("latent", "LATENT")],
    "SMFSRTiledVAEDecode": [("IMAGE", "IMAGE")],
    "SMFSRColorFix": [("IMAGE", "IMAGE")],
    "SMFSRUpscale": [("IMAGE", "IMAGE")],
}


@dataclass
class Node:
    id: int
    type: str
    widgets: dict
    pos: tuple[int, int]
    links: dict = field(default_factory=dict)  # input name -> (source node id, output index)
    title: str | None = None
    models: list | None = None  # files the user must download, for the frontend's "missing models"


def api_format(nodes: list[Node]) -> dict:
    out = {}
    for n in nodes:
        if n.type == "Note":
            continue
        inputs = {k: v for k, v in n.widgets.items() if k != "upload"}
        inputs.update({k: [str(src), idx] for k, (src, idx) in n.links.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def ui_format(nodes: list[Node], note: str) -> dict:
    links, ui_nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for n in nodes:
        for name, (src, idx) in n.links.items():
            link_id = len(links) + 1
            links.append([link_id, src, idx, n.id, [s[0] for s in SOCKETS_IN[n.type]].index(name), dict(SOCKETS_IN[n.type])[name]])
            outgoing.setdefault((src, idx), []).append(link_id)
    for order, n in enumerate(nodes):
        incoming = {l[4]: l[0] for l in links if l[3] == n.id}
        inputs = [{"name": name, "type": kind, "link": incoming.get(i)} for i, (name, kind) in enumerate(SOCKETS_IN.get(n.type, []))]
        outputs = [{"name": name, "type": kind, "links": outgoing.get((n.id, i), []), "slot_index": i}
                   for i, (name, kind) in enumerate(SOCKETS_OUT.get(n.type, []))]
        values = []
        for w in WIDGETS.get(n.type, []):
            values.append(n.widgets.get(w, "image"))
            if w in SEEDS:
                values.append("fixed")
        props = {"Node name for S&R": n.type, **(PACK if n.type.startswith("SMFSR") else CORE)}
        if n.models:
            props["models"] = n.models
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": [320, 130], "flags": {}, "order": order,
                "mode": 0, "inputs": inputs, "outputs": outputs, "properties": props, "widgets_values": values}
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    return {"id": "smfsr-" + note, "revision": 0, "last_node_id": max(n.id for n in nodes), "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


DEFAULT_MODEL = "smfsr-small-x4.safetensors"
MODEL_DEFAULTS = {"steps": 0, "latent_tile": 0, "latent_tile_overlap": 0}  # 0: what the model stores
LOADER = {"dtype": "auto", "weights": "auto", "block_swap": 0, "compile": False}


def upscale_default() -> list[Node]:
    """The all-in-one node with a model that carries its own VAE (the shipped default model)."""
    return [
        Node(1, "LoadImage", {"image": "example.png", "upload": "image"}, (0, 0)),
        Node(2, "SMFSRModelLoader", {"model_name": DEFAULT_MODEL, **LOADER}, (0, 350)),
        Node(3, "SMFSRUpscale", {"scale": 0.0, "seed": 0, **MODEL_DEFAULTS, "color_fix": "auto", "vae_tile": 0}, (400, 0),
             {"image": (1, 0), "smfsr_model": (2, 0)}),
        Node(4, "SaveImage", {"filename_prefix": "smfsr"}, (800, 0), {"images": (3, 0)}),
    ]


def modular_default() -> list[Node]:
    """The same upscale as four nodes; gives the same pixels as SMFSR Upscale for the same seed."""
    return [
        Node(1, "LoadImage", {"image": "example.png", "upload": "image"}, (0, 0)),
        Node(2, "SMFSRModelLoader", {"model_name": DEFAULT_MODEL, **LOADER}, (0, 350)),
        Node(3, "SMFSRLREncode", {"vae_tile": 0}, (400, 0), {"image": (1, 0), "smfsr_model": (2, 0)}),
        Node(4, "SMFSRSampler", {"seed": 0, **MODEL_DEFAULTS}, (800, 0), {"smfsr_model": (2, 0), "lr_latent": (3, 0)}),
        Node(5, "SMFSRTiledVAEDecode", {"vae_tile": 0}, (1200, 0), {"samples": (4, 0), "smfsr_model": (2, 0)}),
        Node(6, "SMFSRColorFix", {"color_fix": "auto", "scale": 0.0}, (1600, 0),
             {"image": (5, 0), "reference": (1, 0), "smfsr_model": (2, 0)}),
        Node(7, "SaveImage", {"filename_prefix": "smfsr_modular"}, (2000, 0), {"images": (6, 0)}),
    ]


# What each SD3.5 file a user downloads holds (hosts.md: the publishers' file lists, ComfyUI 0.8's loaders):
# a workflow may take CLIP from a checkpoint only if the file holds the text encoders.
SD35_FILES = {
    "sd3.5_medium.safetensors": {"MODEL", "VAE"},  # Stability's: MMDiT + VAE, encoders are separate files
    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": {"MODEL", "CLIP", "VAE"},  # Comfy-Org's all-in-one
}
STABILITY = "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium"
COMFY_ORG = "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8"
PROMPT = ("Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, hyper detailed photo - "
          "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing.")
SMFSR_FILE = ("- models/smfsr/smfsr_q/ (the official transformer): `smfsr download smfsr_q --for comfyui`, or one bundle "
              "models/smfsr/smfsr_q.safetensors: `smfsr download smfsr_q --bundle --for comfyui` (about 5.5 GB in fp16)")
SD35_NOTE = (
    "Files to download (nothing is fetched for you), as Stability publishes them (gated: accept the licence at "
    f"{STABILITY}):\n"
    "- models/checkpoints/sd3.5_medium.safetensors (about 5.1 GB: the MMDiT and the VAE; only the VAE is read here, "
    "by SMFSR VAE from Checkpoint)\n"
    "- models/text_encoders/clip_l.safetensors (0.25 GB), clip_g.safetensors (1.4 GB) and t5xxl_fp8_e4m3fn.safetensors "
    "(4.9 GB), from the same repository's text_encoders/ folder (`smfsr download sd35-medium-encoders-fp8 --for "
    "comfyui`). t5xxl_fp16.safetensors (9.8 GB) also works, picked in the Triple CLIP loader: about 5 GB more "
    "memory (beyond a 24 GB machine with the SMFSR loader's defaults on a CPU)\n"
    + SMFSR_FILE
)
SD35_ALL_IN_ONE_NOTE = (
    "Files to download (nothing is fetched for you):\n"
    f"- models/checkpoints/sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors (about 11.6 GB) from {COMFY_ORG} "
    "(gated): the MMDiT, the VAE and CLIP-L/G + T5-XXL (fp8) in one file. Only the VAE and the text encoders are "
    "read here (SMFSR VAE / CLIP from Checkpoint): Load Checkpoint would also keep the MMDiT, which this graph does "
    "not use (about 10 GB in fp32 on a CPU)\n"
    + SMFSR_FILE
)

SD35_DUAL_CLIP_NOTE = (
    "For machines without room for T5-XXL (4.9 GB in fp8): CLIP-L and CLIP-G only (Dual CLIP loader, type sd3), "
    "77 tokens of conditioning instead of 154. The official model was trained and run with T5: expect outputs "
    "further from the official ones than smfsr_sd35's. Measured only with random weights in the real shapes "
    "(python -m bench conditioning, bench/RESULTS.md): the output is 50.9 dB PSNR from smfsr_sd35's, 4 levels at most; "
    "what dropping T5 does to the trained model's output is not measured yet. T5-XXL (its 4.9 GB file) is not "
    "loaded.\n"
    "Files to download (nothing is fetched for you), as Stability publishes them (gated: accept the licence at "
    f"{STABILITY}):\n"
    "- models/checkpoints/sd3.5_medium.safetensors (only its VAE is read, by SMFSR VAE from Checkpoint)\n"
    "- models/text_encoders/clip_l.safetensors (0.25 GB) and clip_g.safetensors (1.4 GB), from the same "
    "repository's text_encoders/ folder\n"
    + SMFSR_FILE
)


def sd35_chain(clip: tuple[int, int], vae: tuple[int, int], note: str) -> list[Node]:
    """The SMFSR nodes of an SD3.5 graph, given where CLIP and VAE come from (node id, output)."""
    return [
        Node(2, "CLIPTextEncode", {"text": PROMPT}, (0, 250), {"clip": clip}),
        Node(3, "SMFSRModelLoader", {"model_name": "smfsr_q.safetensors", **LOADER}, (0, 500)),
        Node(4, "LoadImage", {"image": "example.png", "upload": "image"}, (0, 750)),
        Node(5, "SMFSRLREncode", {"vae_tile": 0}, (400, 0), {"image": (4, 0), "smfsr_model": (3, 0), "vae": vae}),
        Node(6, "SMFSRSampler", {"seed": 0, **MODEL_DEFAULTS}, (800, 0),
             {"smfsr_model": (3, 0), "lr_latent": (5, 0), "conditioning": (2, 0)}),
        Node(7, "SMFSRTiledVAEDecode", {"vae_tile": 0}, (1200, 0), {"samples": (6, 0), "vae": vae}),
        Node(8, "SMFSRColorFix", {"color_fix": "auto", "scale": 0.0}, (1600, 0),
             {"image": (7, 0), "reference": (4, 0), "smfsr_model": (3, 0)}),
        Node(9, "SaveImage", {"filename_prefix": "smfsr_sd35"}, (2000, 0), {"images": (8, 0)}),
        Node(10, "Note", {"text": note}, (400, 400), title="Files to download"),
    ]


def sd35() -> list[Node]:
    """Official SMFSR weights with Stability's files: the VAE read alone from sd3.5_medium.safetensors
    (it holds no text encoders), CLIP-L/G + T5 from their own files."""
    return [
        Node(1, "SMFSRCheckpointVAELoader", {"ckpt_name": "sd3.5_medium.safetensors"}, (0, 0),
             models=[{"name": "sd3.5_medium.safetensors", "directory": "checkpoints", "url": STABILITY}]),
        Node(11, "TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                      "clip_name3": "t5xxl_fp8_e4m3fn.safetensors"}, (0, 120),
             models=[{"name": n, "directory": "text_encoders", "url": STABILITY}
                     for n in ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp8_e4m3fn.safetensors")]),
        *sd35_chain(clip=(11, 0), vae=(1, 0), note=SD35_NOTE),
    ]


def sd35_dual_clip() -> list[Node]:
    """smfsr_sd35 without T5: CLIP-L and CLIP-G through ComfyUI's DualCLIPLoader (small machines)."""
    return [
        Node(1, "SMFSRCheckpointVAELoader", {"ckpt_name": "sd3.5_medium.safetensors"}, (0, 0),
             models=[{"name": "sd3.5_medium.safetensors", "directory": "checkpoints", "url": STABILITY}]),
        Node(11, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                    "type": "sd3", "device": "default"}, (0, 120),
             models=[{"name": n, "directory": "text_encoders", "url": STABILITY}
                     for n in ("clip_l.safetensors", "clip_g.safetensors")]),
        *sd35_chain(clip=(11, 0), vae=(1, 0), note=SD35_DUAL_CLIP_NOTE),
    ]


def sd35_all_in_one() -> list[Node]:
    """Official SMFSR weights with Comfy-Org's all-in-one checkpoint: the VAE and the text encoders
    read from the one file, its MMDiT left on disk."""
    name = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
    return [
        Node(1, "SMFSRCheckpointVAELoader", {"ckpt_name": name}, (0, 0),
             models=[{"name": name, "directory": "checkpoints", "url": COMFY_ORG}]),
        Node(11, "SMFSRCheckpointCLIPLoader", {"ckpt_name": name}, (0, 120)),
        *sd35_chain(clip=(11, 0), vae=(1, 0), note=SD35_ALL_IN_ONE_NOTE),
    ]


WORKFLOWS = {"smfsr_upscale": upscale_default, "smfsr_modular": modular_default, "smfsr_sd35": sd35,
             "smfsr_sd35_all_in_one": sd35_all_in_one, "smfsr_sd35_dual_clip": sd35_dual_clip}


def render() -> dict[Path, str]:
    files = {}
    for name, make in WORKFLOWS.items():
        nodes = make()
        files[HERE / f"{name}.json"] = json.dumps(ui_format(nodes, name), indent=2) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(api_format(nodes), indent=2) + "\n"
    return files


def main() -> int:
    files = render()
    if "--check" in sys.argv:
        stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
        if stale:
            print("out of date (run python workflows/build.py):", *stale, sep="\n  ")
            return 1
        return 0
    for path, text in files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
