"""The ``smfsr`` command: upscale images, inspect and convert models, serve the app.

Exit status: 0 when everything succeeded, 1 when some images failed (the rest still finished),
2 for a usage or model error. User errors print one clear line, never a traceback. Everything that
can be checked without the model (options, files, the output folder) is checked before torch is
imported; the device and the model's own limits before the weights load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from . import __version__
from .atomic import refuse_existing
from .errors import SMFSRError

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2
WEIGHT_CHOICES = ["auto", "fp8_e4m3fn", "fp8"]  # runtime.WEIGHTS and its short name (not imported: torch)


# --------------------------------------------------------------------------------------------
# commands


def upscale_options(args: argparse.Namespace):
    from .options import UpscaleOptions, VAETiling
    return UpscaleOptions(scale=args.scale, seed=args.seed, steps=args.steps, tile_size=args.tile_size,
                          tile_overlap=args.tile_overlap, color_fix=args.color_fix,
                          vae_tiling=VAETiling.parse(args.vae_tile)).check()


def preflight(args: argparse.Namespace, options):
    """Everything about the model that can be checked from its header, before torch: the name or
    path, what kind of file it is, and the options against its limits (steps, tile multiple).
    Returns (the model's path, the settings that will run)."""
    from .checkpoint.default_model import default_model_path, resolve_model
    from .checkpoint.peek import peek_model

    model = resolve_model(args.model) if args.model else default_model_path()
    config, defaults = peek_model(model)
    settings = options.resolve(defaults, int(config["patch_size"]))
    if args.prompt_text is not None and not _names_text_encoders(args):
        raise SMFSRError("--prompt-text needs SD3.5's text encoders to encode it: add --sd35 (or --clip-l --clip-g "
                         "--t5 --tokenizers); without them the model's stored prompt is used")
    if args.prompt and _names_text_encoders(args):
        raise SMFSRError("give --prompt (an encoded prompt file) or the text encoders, not both")
    return model, settings, defaults


def cmd_upscale(args: argparse.Namespace) -> int:
    from .batch import check_writable, distributed_rank, keep_readable, plan

    rank, world, local_rank = distributed_rank()
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    model, settings, defaults = preflight(args, upscale_options(args))  # usage errors first: no torch, no model
    batch = plan(args.inputs, args.output, overwrite=args.overwrite, skip_existing=args.skip_existing,
                 rank=rank, world=world)
    todo, unreadable = keep_readable(batch.todo, args.max_pixels,  # image headers, before the model loads
                                     lambda message: print(f"error: {tag}{message}", file=sys.stderr))
    for job in batch.skipped:
        _say(args, f"{tag}{job.source}: {job.target} exists, skipped")
    for job in batch.refused:
        print(f"error: {tag}{job.source}: {job.target} already exists (use --overwrite to replace it, "
              "--skip-existing to skip)", file=sys.stderr)
    check_writable({job.target.parent for job in todo})
    failed = upscale_jobs(args, model, settings, defaults, todo, tag, local_rank if world > 1 else None) if todo else 0
    failures = failed + len(batch.refused) + unreadable
    total = len(todo) + len(batch.skipped) + len(batch.refused) + unreadable
    summary = f"{tag}{len(todo) - failed} of {total} images upscaled"
    summary += f", {len(batch.skipped)} skipped (output exists)" if batch.skipped else ""
    summary += f", {failures} failed" if failures else ""
    _say(args, summary)
    return EXIT_OK if failures == 0 else EXIT_SOME_FAILED


def upscale_jobs(args: argparse.Namespace, model, settings, defaults, jobs: list, tag: str,
                 local_rank: int | None) -> int:
    """Load the model and run the jobs; returns the number that failed."""
    import torch

    from .batch import write_png
    from .imageio import from_pil, open_image
    from .pipeline import SMFSRUpscaler
    from .runtime import Runtime
    from .text_encoders import DEFAULT_PROMPT

    device = args.device
    if device is None and local_rank is not None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    # device, dtype and fp8 support are checked once, here, before the encoders or the weights load
    runtime = Runtime(device, args.dtype, args.weights, args.block_swap, args.compile).resolved()
    sources = text_sources(args)
    text = encode(sources, args.prompt_text or defaults.prompt or DEFAULT_PROMPT, args) if sources else None
    upscaler = SMFSRUpscaler.from_pretrained(model, runtime=runtime, vae=args.vae, prompt=args.prompt)
    if text is not None:
        upscaler.prompt_embeds, upscaler.prompt_pooled = text
    failures = 0
    for index, job in enumerate(jobs, 1):
        label = f"{tag}[{index}/{len(jobs)}] {job.source}"
        try:
            image = from_pil(open_image(job.source, max_pixels=args.max_pixels))
            for note in image.notes:
                _say(args, f"{label}: {note}")
            if not args.quiet:
                line = upscaler.announcement(*image.rgb.shape[-2:], settings)
                if line:
                    _say(args, f"{label}: {line}")
            with _progress_bar(args, job.source.name) as bar:
                result = upscaler.upscale_image(image, settings, progress=bar)
            if args.rgb:
                result = result.convert("RGBA" if "A" in result.getbands() else "RGB")
            try:
                write_png(result, job.target)  # the output folder is made now, not before
            except OSError as e:
                raise SMFSRError(f"could not write {job.target} ({e.strerror or e}); nothing was written") from None
            _say(args, f"{label} -> {job.target} ({result.width}x{result.height})")
        except SMFSRError as e:
            failures += 1
            print(f"error: {label}: {e}", file=sys.stderr)
        except Exception as e:  # keep going: one bad image must not stop a folder
            failures += 1
            print(f"error: {label}: unexpected {type(e).__name__}: {e}", file=sys.stderr)
            if args.debug:
                traceback.print_exc()
    return failures


class _progress_bar:
    """A tqdm bar (with its ETA) over latent tiles, as a ``progress(done, total)`` callback."""

    def __init__(self, args: argparse.Namespace, name: str):
        self.args, self.name, self.bar = args, name, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.args.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.name[:40], unit="tile", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def cmd_app(args: argparse.Namespace) -> int:
    from .app import model_entries

    model_entries(args.model, args.models_dir)  # a wrong name or file is said before gradio and torch load
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SMFSRError("the app needs gradio: pip install 'smfsr[app]' (or pip install gradio)") from None
    from .app import serve

    serve(args.model, args.models_dir, args.host, args.port, args.device, args.dtype, weights=args.weights,
          block_swap=args.block_swap)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint.default_model import resolve_model
    from .checkpoint.describe import describe

    print(describe(resolve_model(args.model)))
    return EXIT_OK


def _names_text_encoders(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) for k in ("sd35", "clip_l", "clip_g", "t5"))


def text_sources(args: argparse.Namespace):
    """The SD3.5 text encoders the user named (--sd35 / --clip-l --clip-g --t5 / --tokenizers), or None."""
    if not _names_text_encoders(args):
        return None
    from .text_encoders import find_sources

    return find_sources(args.sd35, clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5, tokenizers=args.tokenizers)


def encode(sources, text: str, args: argparse.Namespace):
    from .text_encoders import encode_text

    return encode_text(sources, text, t5_dtype=args.t5_dtype, device=args.text_device,
                       say=lambda message: print(message, file=sys.stderr))


def cmd_encode_prompt(args: argparse.Namespace) -> int:
    refuse_existing(args.output, args.overwrite)
    if not _names_text_encoders(args):
        raise SMFSRError("name SD3.5's text encoders: --sd35 FOLDER_OR_CHECKPOINT, or --clip-l --clip-g --t5 with "
                         "--tokenizers")
    from .text_encoders import DEFAULT_PROMPT, write_prompt_file

    text = args.text if args.text is not None else DEFAULT_PROMPT
    embeds, pooled = encode(text_sources(args), text, args)
    path = write_prompt_file(args.output, embeds, pooled, text, overwrite=args.overwrite)
    print(f"wrote {path}: embeds {tuple(embeds.shape)}, pooled {tuple(pooled.shape)}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint.default_model import resolve_model

    transformer = resolve_model(args.transformer)  # a shipped name works too
    output = refuse_existing(args.output, args.overwrite)  # before torch: said in a second
    if args.prompt_embeds and args.sd35:
        raise SMFSRError("give --prompt-embeds or --sd35 (to encode --prompt-text), not both")
    sources = text_sources(args)  # checked before the large transformer loads
    from .checkpoint.convert import convert
    from .text_encoders import DEFAULT_PROMPT

    path = convert(transformer, output, vae=args.vae or args.sd35, prompt_embeds=args.prompt_embeds,
                   prompt_text=args.prompt_text, default_prompt=DEFAULT_PROMPT,
                   encode_text=(lambda text: encode(sources, text, args)) if sources else None,
                   upscale=args.upscale, weights=args.weights, fp8_scale=args.fp8_scale, dtype=args.dtype,
                   license=args.license, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# argument types: a bad value is a usage error (exit 2, one line) before anything loads


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
    group.add_argument("--sd35", help="a diffusers SD3.5-medium folder, or the single-file sd3.5_medium.safetensors")
    group.add_argument("--clip-l", help="ComfyUI's clip_l.safetensors")
    group.add_argument("--clip-g", help="ComfyUI's clip_g.safetensors")
    group.add_argument("--t5", help="ComfyUI's t5xxl_fp16.safetensors (or an fp8 one)")
    group.add_argument("--tokenizers", help="a ComfyUI install or a diffusers SD3.5 folder (single files carry none)")
    group.add_argument("--t5-dtype", choices=["bf16", "fp32"], default="bf16", help="T5-XXL's precision (default bf16)")
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
    up.add_argument("--color-fix", choices=["adain", "wavelet", "none"], help="colour correction (default: the model's)")
    up.add_argument("--vae-tile", default="auto",
                    help="VAE tile in latent px (the encoder takes the same area in image px); tiled equals "
                         "untiled, memory is set by the tile. 'auto' tiles images over 1 MP with a size from free "
                         "memory; 'off' never tiles (default auto)")
    up.add_argument("--device", type=_device, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    up.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="auto: bf16/fp16 on GPU, fp32 on CPU")
    up.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                    help="fp8_e4m3fn (or fp8): quantise the transformer blocks to fp8 on load (half of bf16's "
                         "memory); auto: as stored")
    up.add_argument("--block-swap", default="0", type=_block_swap,
                    help="keep N transformer blocks in system memory, streamed to the GPU as they run; 'auto': as "
                         "many as free GPU memory needs (default 0)")
    up.add_argument("--compile", action="store_true", help="torch.compile the networks (pays off for many images)")
    up.add_argument("--rgb", action="store_true", help="write RGB even for grayscale inputs (default: like the input)")
    exists = up.add_mutually_exclusive_group()
    exists.add_argument("--overwrite", action="store_true", help="replace existing output files")
    exists.add_argument("--skip-existing", action="store_true", help="skip inputs whose output exists")
    up.add_argument("--max-pixels", type=_number(int, "--max-pixels", 1, inclusive=True), default=8192 * 8192,
                    help="refuse larger inputs (default 64 MP)")
    up.add_argument("-q", "--quiet", action="store_true")
    up.add_argument("--debug", action="store_true", help="print tracebacks for unexpected errors")
    add_text_encoder_arguments(up)
    up.set_defaults(func=cmd_upscale)

    app = sub.add_parser("app", help="a local web page to upscale images (gradio)")
    app.add_argument("--model", help="the model selected first (default: models found in --models-dir and models/)")
    app.add_argument("--models-dir", help="a folder of SMFSR models to list")
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (default loopback; others expose the app)")
    app.add_argument("--port", type=int, help="port (default: gradio's, 7860 or the next free one)")
    app.add_argument("--device", type=_device, help="cpu, cuda, ... (default: cuda if available)")
    app.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    app.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help="as for upscale")
    app.add_argument("--block-swap", default="0", type=_block_swap, help="as for upscale")
    app.set_defaults(func=cmd_app)

    enc = sub.add_parser("encode-prompt", help="encode a prompt with SD3.5's text encoders (for the official weights)")
    enc.add_argument("--text", help="the prompt (default: the official positive prompt)")
    enc.add_argument("-o", "--output", required=True, help="the prompt file to write (.safetensors)")
    enc.add_argument("--overwrite", action="store_true")
    add_text_encoder_arguments(enc)
    enc.set_defaults(func=cmd_encode_prompt)

    info = sub.add_parser("info", help="describe a model file or folder")
    info.add_argument("model")
    info.set_defaults(func=cmd_info)

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
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network at run time
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except SMFSRError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
