"""How far ComfyUI's SD3 conditioning is from the project's prompt embedding, on the same encoder files:

    python -m bench conditioning --encoders DIR [--t5 t5xxl_fp8_e4m3fn.safetensors] [--comfyui-dir D]
                                 [--comfyui-python P] [--text "..."] [--out DIR]

DIR holds clip_l.safetensors, clip_g.safetensors and the T5 file (``python -m bench fullsize`` writes
random ones in the real shapes under OUT/weights/stability/text_encoders/). ComfyUI's side is its own
TripleCLIPLoader and CLIPTextEncode, run in its Python (77 CLIP tokens + T5 padded to 77: 154); the
project's is ``text_encoders.encode_text`` with ComfyUI's tokenizer files at ``--t5-tokens 77`` (the
same 154) and at the default 256 (333, the official inference). Printed and written to
OUT/conditioning.json: per part (CLIP-L/G tokens, T5 tokens, pooled) the largest and the relative
(L2) difference. With random weights this measures the two implementations (tokenizers, padding,
precision), not what the difference does to an image, which needs the real model.
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
clip = TripleCLIPLoader.execute("clip_l.safetensors", "clip_g.safetensors", t5).result[0]
cond, extra = CLIPTextEncode().encode(clip, text)[0][0]
save_file({"embeds": cond.float().contiguous(), "pooled": extra["pooled_output"].float().contiguous()}, out)
"""


def comfyui_conditioning(comfyui_dir: str, python: str, encoders: Path, t5: str, text: str, out: Path):
    """(embeds, pooled) from ComfyUI's own loader and CLIPTextEncode, in its own Python."""
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
    args = parser.parse_args(argv)
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
    for tokens in (77, 256):
        ours = text_encoders.encode_text(sources, text, t5_tokens=tokens)
        result[f"smfsr_t5_tokens_{tokens}"] = {"tokens": ours[0].shape[1], **differences(ours, theirs)}
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
