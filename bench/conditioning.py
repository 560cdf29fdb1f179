"""How far ComfyUI's SD3 conditioning is from the project's prompt embedding, on the same encoder files,
and (with ``--model``) what each does to the SMFSR output:

    python -m bench conditioning --encoders DIR [--t5 t5xxl_fp8_e4m3fn.safetensors] [--comfyui-dir D]
                                 [--comfyui-python P] [--text "..."] [--out DIR]
                                 [--model SMFSR_FOLDER --vae sd3.5_medium.safetensors --image PNG]

DIR holds clip_l.safetensors, clip_g.safetensors and the T5 file (``python -m bench fullsize`` writes
random ones in the real shapes under OUT/weights/stability/text_encoders/). ComfyUI's side is its own
TripleCLIPLoader and CLIPTextEncode, run in its Python (77 CLIP tokens + T5 padded to 77: 154); the
project's is ``text_encoders.encode_text`` with ComfyUI's tokenizer files at ``--t5-tokens 77`` (the
same 154) and at the default 256 (333, the official inference). Printed and written to
OUT/conditioning.json: per part (CLIP-L/G tokens, T5 tokens, pooled) the largest and the relative
(L2) difference. With random weights this measures the two implementations (tokenizers, padding,
precision), not what the difference does to an image, which needs the real model.

With ``--model`` (an official SMFSR folder; ``--vae``: the checkpoint holding SD3.5's VAE), the image
(default: a 64x64 crop of the shipped sample) is upscaled with each conditioning, seed 0, and the
PSNR of each output against the official inference's (333 tokens) is reported: the project's 154
tokens, ComfyUI's CLIPTextEncode through TripleCLIPLoader (154) and through DualCLIPLoader (CLIP-L
and CLIP-G, no T5: 77 tokens, the small-machine workflow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CLIP_TOKENS, CLIP_WIDTH = 77, 2048  # CLIP-L (768) + CLIP-G (1280) per token, zero-padded to T5's 4096

COMFYUI_SCRIPT = """
import sys
comfy_dir, encoders, t5, text, out = sys.argv[1:6]
sys.path.insert(0, comfy_dir)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths
folder_paths.folder_names_and_paths["text_encoders"] = ([encoders], {".safetensors"})
from comfy_extras.nodes_sd3 import TripleCLIPLoader
from nodes import CLIPTextEncode
from safetensors.torch import save_file
if t5 == "none":  # CLIP-L and CLIP-G only, as the DualCLIPLoader workflow loads them
    from nodes import DualCLIPLoader
    clip = DualCLIPLoader().load_clip("clip_l.safetensors", "clip_g.safetensors", "sd3")[0]
else:
    clip = TripleCLIPLoader.execute("clip_l.safetensors", "clip_g.safetensors", t5).result[0]
cond, extra = CLIPTextEncode().encode(clip, text)[0][0]
save_file({"embeds": cond.float().contiguous(), "pooled": extra["pooled_output"].float().contiguous()}, out)
"""


def comfyui_conditioning(comfyui_dir: str, python: str, encoders: Path, t5: str, text: str, out: Path):
    """(embeds, pooled) from ComfyUI's own loader and CLIPTextEncode, in its own Python (``t5`` "none":
    DualCLIPLoader with CLIP-L and CLIP-G)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "encode.py"
        script.write_text(COMFYUI_SCRIPT)
        run = subprocess.run([python, str(script), comfyui_dir, str(encoders), t5, text, str(out)],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if run.returncode != 0:
        raise RuntimeError(f"ComfyUI's CLIPTextEncode failed: {run.stderr[-2000:]}")
    found = load_file(str(out))
    return found["embeds"], found["pooled"]


def differences(ours, theirs) -> dict[str, dict[str, float]]:
    """Largest and relative L2 difference per part: CLIP tokens, T5 tokens (the shorter count), pooled."""
    (e1, p1), (e2, p2) = ours, theirs
    n = min(e1.shape[1], e2.shape[1])
    parts = {"clip": (e1[:, :CLIP_TOKENS, :CLIP_WIDTH], e2[:, :CLIP_TOKENS, :CLIP_WIDTH]),
             "t5": (e1[:, CLIP_TOKENS:n], e2[:, CLIP_TOKENS:n]), "pooled": (p1, p2)}
    return {name: {"max_abs": float((a - b).abs().max()), "relative_l2": float((a - b).norm() / b.norm()),
                   "scale": float(b.abs().max())} for name, (a, b) in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench conditioning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", required=True, help="a folder with clip_l, clip_g and the T5 file")
    parser.add_argument("--t5", default="t5xxl_fp8_e4m3fn.safetensors", help="the T5 file's name in --encoders")
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON", sys.executable))
    parser.add_argument("--text", default=None, help="the prompt (default: the official positive prompt)")
    parser.add_argument("--out", default=".", help="where conditioning.json and the embeddings go")
    parser.add_argument("--model", help="an official SMFSR folder: also upscale with each conditioning")
    parser.add_argument("--vae", help="with --model: the file holding SD3.5's VAE (sd3.5_medium.safetensors)")
    parser.add_argument("--image", help="with --model: the image (default: a 64x64 crop of the shipped sample)")
    args = parser.parse_args(argv)
    if args.model and not args.vae:
        parser.error("--model needs --vae (the official folder holds no VAE)")
    if not args.comfyui_dir or not (Path(args.comfyui_dir) / "comfy" / "sd1_tokenizer").is_dir():
        parser.error("needs a ComfyUI checkout (--comfyui-dir or $COMFYUI_DIR)")
    encoders, out = Path(args.encoders), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from smfsr import text_encoders

    text = args.text if args.text is not None else text_encoders.DEFAULT_PROMPT
    theirs = comfyui_conditioning(args.comfyui_dir, args.comfyui_python, encoders, args.t5, text,
                                  out / "comfyui_conditioning.safetensors")
    sources = text_encoders.find_sources(clip_l=encoders / "clip_l.safetensors", clip_g=encoders / "clip_g.safetensors",
                                         t5=encoders / args.t5, tokenizers=args.comfyui_dir)
    result = {"text": text, "t5_file": args.t5, "comfyui_tokens": theirs[0].shape[1]}
    conditionings = {"comfyui_triple": theirs}
    for tokens in (77, 256):
        ours = text_encoders.encode_text(sources, text, t5_tokens=tokens)
        conditionings[f"smfsr_{ours[0].shape[1]}"] = ours
        result[f"smfsr_t5_tokens_{tokens}"] = {"tokens": ours[0].shape[1], **differences(ours, theirs)}
    if args.model:
        dual = comfyui_conditioning(args.comfyui_dir, args.comfyui_python, encoders, "none", text,
                                    out / "comfyui_dual_clip_conditioning.safetensors")
        conditionings["comfyui_dual_clip"] = dual
        result["comfyui_dual_clip_tokens"] = dual[0].shape[1]
        result["outputs"] = compare_outputs(args, conditionings, out)
    (out / "conditioning.json").write_text(json.dumps(result, indent=1))
    print(f"ComfyUI CLIPTextEncode: {result['comfyui_tokens']} tokens")
    print("| project's embedding | tokens | part | max abs diff | relative L2 | ComfyUI's max abs |")
    print("|---|---|---|---|---|---|")
    for tokens in (77, 256):
        row = result[f"smfsr_t5_tokens_{tokens}"]
        for part in ("clip", "t5", "pooled"):
            d = row[part]
            print(f"| --t5-tokens {tokens} | {row['tokens']} | {part} | {d['max_abs']:.3g} | {d['relative_l2']:.3g} | "
                  f"{d['scale']:.3g} |")
    if args.model:
        print("\n| conditioning | tokens | PSNR of the output vs the official 333-token one (dB) | max diff (0-255) |")
        print("|---|---|---|---|")
        for name, row in result["outputs"].items():
            print(f"| {name} | {row['tokens']} | {row['psnr_vs_official']} | {row['max_diff']} |")
    return 0


def compare_outputs(args, conditionings: dict, out: Path) -> dict[str, dict]:
    """Upscale the image with each conditioning (one model load, seed 0); each output's PSNR and
    largest difference against the official 333-token conditioning's."""
    import numpy as np
    from PIL import Image

    from bench.fullsize import input_image
    from smfsr import memory
    from smfsr.pipeline import SMFSRUpscaler

    memory.release_freed_memory()  # the encoders are gone: let the model's memory check see it
    image = Image.open(args.image or input_image(out / "input.png")).convert("RGB")
    upscaler = SMFSRUpscaler.from_pretrained(args.model, device="cpu", vae=args.vae)
    outputs = {}
    for name, (embeds, pooled) in conditionings.items():
        result = upscaler(image, prompt_embeds=embeds, prompt_pooled=pooled)
        result.save(out / f"output_{name}.png")
        outputs[name] = (np.asarray(result).astype(np.float64), embeds.shape[1])
    official = outputs["smfsr_333"][0]
    rows = {}
    for name, (pixels, tokens) in outputs.items():
        mse = float(((pixels - official) ** 2).mean())
        rows[name] = {"tokens": tokens, "psnr_vs_official": "identical" if mse == 0 else round(10 * np.log10(255**2 / mse), 2),
                      "max_diff": int(np.abs(pixels - official).max())}
    return rows


if __name__ == "__main__":
    sys.exit(main())
