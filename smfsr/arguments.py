"""The ``smfsr`` command line's arguments: every option with its type, range and help. A bad value
is a usage error (one line, exit 2) before anything loads; nothing here imports torch."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .options import COLOR_FIXES, DTYPE_CHOICES

EXIT_ERROR = 2
WEIGHT_CHOICES = ["auto", "fp8_e4m3fn", "fp8"]  # runtime.WEIGHTS and its short name (not imported: torch)


def _number(kind, what: str, low: float, *, inclusive: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}") from None
        if value < low or (value == low and not inclusive):
            bound = f"at least {low:g}" if inclusive else f"greater than {low:g}"
            raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {text}")
        return value

    return parse


def _block_swap(text: str) -> str:
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"--block-swap must be a number of blocks or 'auto', not {text!r}")
    return text


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"(cpu|cuda(:\d+)?|mps|xpu(:\d+)?|auto)", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    return text


def add_text_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SD3.5 text encoders (for the official weights' prompt)")
    group.add_argument("--sd35", help="a diffusers SD3.5-medium folder, or a single-file checkpoint with the encoders "
                                      "(Comfy-Org's sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors; Stability's "
                                      "sd3.5_medium.safetensors holds none: give --clip-l --clip-g --t5)")
    group.add_argument("--clip-l", help="ComfyUI's clip_l.safetensors")
    group.add_argument("--clip-g", help="ComfyUI's clip_g.safetensors")
    group.add_argument("--t5", help="ComfyUI's t5xxl_fp16.safetensors (or an fp8 one)")
    group.add_argument("--tokenizers", help="a ComfyUI install or a diffusers SD3.5 folder (single files carry none)")
    group.add_argument("--t5-dtype", choices=["bf16", "fp32"], default="bf16", help="T5-XXL's precision (default bf16)")
    group.add_argument("--t5-tokens", type=_number(int, "--t5-tokens", 1, inclusive=True), default=256,
                       help="T5 tokens in the embedding: 256 as the official inference (77 CLIP + 256 = 333, the "
                            "default), 77 as the official training and ComfyUI's SD3 CLIPTextEncode (154)")
    group.add_argument("--text-device", type=_device, default="cpu",
                       help="where the text encoders run (default cpu: T5-XXL needs about 10 GB in bf16)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, with the command to get help
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smfsr", description="SMFSR one-step diffusion super-resolution")
    parser.add_argument("--version", action="version", version=f"smfsr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser("upscale", help="upscale images, folders or globs")
    up.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or globs")
    up.add_argument("-o", "--output", required=True, help="output folder, or a file name for a single input")
    up.add_argument("--model", help="SMFSR bundle (.safetensors), official folder, or a shipped model's name "
                                    "(smfsr-small-x4, smfsr-small-x4-q; default: the default one)")
    up.add_argument("--vae", help="a diffusers VAE folder or file, for models without their own")
    up.add_argument("--prompt", help="prompt embeddings (.safetensors with 'embeds' and 'pooled', from `smfsr encode-prompt`)")
    up.add_argument("--prompt-text", help="a prompt to encode for this run (needs the text encoders below)")
    up.add_argument("--scale", type=_number(float, "--scale", 0, inclusive=False),
                    help="output size / input size, at most 16 (default: the model's factor)")
    up.add_argument("--seed", type=int, default=0, help="noise seed; same seed, same result (default 0)")
    up.add_argument("--steps", type=_number(int, "--steps", 1, inclusive=True),
                    help="mean-flow steps (default: the model's, 1)")
    up.add_argument("--tile-size", type=_number(int, "--tile-size", 0, inclusive=True),
                    help="latent tile in latent px, 0 = the whole latent at once (default: the model's)")
    up.add_argument("--tile-overlap", type=_number(int, "--tile-overlap", 0, inclusive=True),
                    help="latent tile overlap in latent px (default: the model's, in proportion to the tile)")
    up.add_argument("--color-fix", choices=COLOR_FIXES, help="colour correction (default: the model's)")
    up.add_argument("--vae-tile", default="auto",
                    help="VAE tile in latent px (the encoder takes the same area in image px); tiled equals "
                         "untiled, memory is set by the tile. 'auto' tiles images over 1 MP with a size from free "
                         "memory; 'off' never tiles (default auto)")
    up.add_argument("--device", type=_device, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    up.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                    help="auto: bf16/fp16 on GPU, fp32 on CPU")
    up.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                    help="fp8_e4m3fn (or fp8): quantise the transformer blocks to fp8 on load (half of bf16's "
                         "memory); auto: as stored")
    up.add_argument("--block-swap", default="0", type=_block_swap,
                    help="keep N transformer blocks in system memory, streamed to the GPU as they run; 'auto': as "
                         "many as free GPU memory needs (default 0)")
    up.add_argument("--compile", action="store_true", help="torch.compile the networks (pays off for many images)")
    up.add_argument("--rgb", action="store_true", help="write RGB even for grayscale inputs (default: like the input)")
    up.add_argument("--compare", action="store_true", help="also write NAME_compare.png beside each result: the input "
                    "resized with bicubic | the result, side by side")
    exists = up.add_mutually_exclusive_group()
    exists.add_argument("--overwrite", action="store_true", help="replace existing output files")
    exists.add_argument("--skip-existing", action="store_true", help="skip inputs whose output exists")
    up.add_argument("--max-pixels", type=_number(int, "--max-pixels", 1, inclusive=True), default=8192 * 8192,
                    help="refuse larger inputs (default 64 MP)")
    up.add_argument("-q", "--quiet", action="store_true")
    up.add_argument("-v", "--verbose", action="store_true",
                    help="also say what each model needs in memory (estimated before it loads) and other details")
    up.add_argument("--debug", action="store_true", help="print tracebacks for unexpected errors")
    add_text_encoder_arguments(up)
    up.set_defaults(command="upscale")

    app = sub.add_parser("app", help="a local web page to upscale images (gradio)")
    app.add_argument("--model", help="the model selected first (default: models found in --models-dir and models/)")
    app.add_argument("--models-dir", help="a folder of SMFSR models to list")
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (default loopback; others expose the app)")
    app.add_argument("--port", type=int, help="port (default: gradio's, 7860 or the next free one)")
    app.add_argument("--device", type=_device, help="cpu, cuda, ... (default: cuda if available)")
    app.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    app.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help="as for upscale")
    app.add_argument("--block-swap", default="0", type=_block_swap, help="as for upscale")
    app.set_defaults(command="app")

    enc = sub.add_parser("encode-prompt", help="encode a prompt with SD3.5's text encoders (for the official weights)")
    enc.add_argument("--text", help="the prompt (default: the official positive prompt)")
    enc.add_argument("-o", "--output", required=True, help="the prompt file to write (.safetensors)")
    enc.add_argument("--overwrite", action="store_true")
    add_text_encoder_arguments(enc)
    enc.set_defaults(command="encode_prompt")

    info = sub.add_parser("info", help="describe a model file or folder")
    info.add_argument("model")
    info.set_defaults(command="info")

    conv = sub.add_parser("convert", help="make a bundle from official parts")
    conv.add_argument("--transformer", required=True,
                      help="official folder (with transformer/), the transformer folder, or an SMFSR bundle to re-store")
    conv.add_argument("--vae", help="a VAE folder or file (default: the one in --sd35)")
    conv.add_argument("--prompt-embeds", help=".safetensors with 'embeds' (1, L, 4096) and 'pooled' (1, 2048)")
    conv.add_argument("--prompt-text", help="the prompt to store (encoded with --sd35; default: the official one)")
    conv.add_argument("--upscale", type=_number(int, "--upscale", 1, inclusive=True), default=4)
    conv.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                      help="storage of the floating tensors (default fp16); fp8 weights keep their format")
    conv.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                      help="fp8: store the transformer blocks' linears as float8 e4m3fn with scales (about half of fp16)")
    conv.add_argument("--fp8-scale", choices=["channel", "tensor"], default="channel",
                      help="fp8 scale granularity (default: per output channel)")
    conv.add_argument("--license", help="licence note to store (default: the source's)")
    conv.add_argument("-o", "--output", required=True)
    conv.add_argument("--overwrite", action="store_true")
    add_text_encoder_arguments(conv)
    conv.set_defaults(command="convert")

    from .download import DOORS, SOURCES, names_help  # no torch, no network: names and folders

    dl = sub.add_parser("download", help="download the official weights (SMFSR, SD3.5's VAE and encoders)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Downloads from the Hugging Face hub, checks every file against the hub's "
                                    "hashes, resumes an interrupted file, and puts the files where a door looks.",
                        epilog="names:\n" + names_help())
    dl.add_argument("name", choices=list(SOURCES), metavar="NAME", help="what to download (below)")
    dl.add_argument("-o", "--output", help="the folder (default: $SMFSR_CACHE or ~/.cache/smfsr/models, where "
                                           "`--model smfsr_q` finds it)")
    dl.add_argument("--for", dest="door", choices=DOORS, default="cli",
                    help="put the files where this door reads them (comfyui: models/smfsr, models/vae, "
                         "models/text_encoders; a1111: models/SMFSR)")
    dl.add_argument("--comfyui-dir", help="the ComfyUI folder (default $COMFYUI_DIR)")
    dl.add_argument("--a1111-dir", help="the web UI's folder (default $A1111_DIR)")
    dl.add_argument("--bundle", action="store_true",
                    help="also fetch SD3.5's VAE and encoders and convert everything into one bundle file")
    dl.add_argument("--revision", help="a branch, tag or commit of the repository (default: the newest)")
    dl.add_argument("--endpoint", help="the hub's address (default $HF_ENDPOINT or https://huggingface.co)")
    dl.set_defaults(command="download")
    return parser
