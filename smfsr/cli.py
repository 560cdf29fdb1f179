"""The ``smfsr`` command: upscale images, inspect and convert models, serve the app.

Exit status: 0 when everything succeeded, 1 when some images failed (the rest still finished),
2 for a usage or model error. User errors print one clear line, never a traceback. Everything that
can be checked without the model (options, files, the output folder) is checked before torch is
imported; the device and the model's own limits before the weights load.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .atomic import write_atomically
from .errors import SMFSRError

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


# --------------------------------------------------------------------------------------------
# inputs and outputs


def expand_inputs(items: list[str]) -> list[tuple[Path, Path]]:
    """(file, path relative to its root) for files, folders (recursive) and globs."""
    from .imageio import is_image_path

    found: list[tuple[Path, Path]] = []
    for item in items:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise SMFSRError(f"{item}: no files match")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p))
                if not files:
                    raise SMFSRError(f"{path}: the folder has no images")
                found += [(f, f.relative_to(path)) for f in files]
            elif path.exists():
                found.append((path, Path(path.name)))
            else:
                raise SMFSRError(f"{path}: no such file or folder")
    return found


def output_path(source_rel: Path, out: Path, single: bool) -> Path:
    """A single input may name its output file; otherwise ``out`` is a folder and names are kept."""
    from .imageio import is_image_path

    if single and is_image_path(out):
        return out
    return out / source_rel.with_suffix(".png")


def check_writable(folders: set[Path]) -> None:
    """Each output folder exists (made if need be) and takes a new file; probed for real, since a
    permission check says nothing on a read-only file system or as root."""
    for folder in sorted(folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".smfsr-probe-"):
                pass
        except OSError as e:
            raise SMFSRError(f"cannot write to the output folder {folder} ({e.strerror or e}); "
                             "choose another -o") from None


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of the inputs under ``accelerate launch`` / ``torchrun``."""
    return items[rank::world]


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment accelerate/torchrun set."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


@dataclass
class Job:
    source: Path
    target: Path


def plan_jobs(args: argparse.Namespace, rank: int, world: int) -> tuple[list[Job], list[Job], list[Job]]:
    """(to do, skipped because the output exists, refused because it exists) for this process."""
    found = expand_inputs(args.inputs)
    single = len(found) == 1
    out = Path(args.output)
    jobs = [Job(src, output_path(rel, out, single)) for src, rel in found]
    targets = [job.target for job in jobs]
    if len(set(targets)) != len(targets):
        raise SMFSRError("two inputs would write the same output file (same name in different folders?); use folders")
    jobs = shard(jobs, rank, world)
    exists = [job for job in jobs if job.target.exists() and not args.overwrite]
    todo = [job for job in jobs if job not in exists]
    return todo, (exists if args.skip_existing else []), ([] if args.skip_existing else exists)


def readable(jobs: list[Job], max_pixels: int, tag: str) -> tuple[list[Job], int]:
    """The jobs whose input opens as an image of a size SMFSR takes (header only); the others are
    reported. Returns (the readable jobs, how many were not)."""
    from .imageio import open_image

    good = []
    for job in jobs:
        try:
            open_image(job.source, max_pixels, decode=False).close()
            good.append(job)
        except SMFSRError as e:
            print(f"error: {tag}{e}", file=sys.stderr)  # the message names the file
    return good, len(jobs) - len(good)


def write_png(image, target: Path) -> None:
    """Write through a temporary file in the same folder, so a failed write leaves nothing behind
    and never a half-written file in place of one the user had."""
    write_atomically(target, lambda tmp: image.save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------
# commands


def upscale_options(args: argparse.Namespace):
    from .options import UpscaleOptions, VAETiling

    return UpscaleOptions(scale=args.scale, seed=args.seed, steps=args.steps, tile_size=args.tile_size,
                          tile_overlap=args.tile_overlap, color_fix=args.color_fix,
                          vae_tiling=VAETiling.parse(args.vae_tile)).check()


def cmd_upscale(args: argparse.Namespace) -> int:
    rank, world, local_rank = distributed_rank()
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    options = upscale_options(args)  # usage errors first: no torch, no model
    todo, skipped, refused = plan_jobs(args, rank, world)
    todo, unreadable = readable(todo, args.max_pixels, tag)  # image headers, before the model loads
    for job in skipped:
        _say(args, f"{tag}{job.source}: {job.target} exists, skipped")
    for job in refused:
        print(f"error: {tag}{job.source}: {job.target} already exists (use --overwrite to replace it, "
              "--skip-existing to skip)", file=sys.stderr)
    check_writable({job.target.parent for job in todo})
    failed = upscale_jobs(args, options, todo, tag, local_rank if world > 1 else None) if todo else 0
    failures = failed + len(refused) + unreadable
    total = len(todo) + len(skipped) + len(refused) + unreadable
    summary = f"{tag}{len(todo) - failed} of {total} images upscaled"
    summary += f", {len(skipped)} skipped (output exists)" if skipped else ""
    summary += f", {failures} failed" if failures else ""
    _say(args, summary)
    return EXIT_OK if failures == 0 else EXIT_SOME_FAILED


def upscale_jobs(args: argparse.Namespace, options, jobs: list[Job], tag: str, local_rank: int | None) -> int:
    """Load the model (after checking the device and the options against it) and run the jobs;
    returns the number that failed."""
    import torch

    from .devices import parse_device, parse_dtype

    device_name = args.device
    if device_name is None and local_rank is not None and torch.cuda.is_available():
        device_name = f"cuda:{local_rank}"
    device = parse_device(device_name)
    dtype = parse_dtype(args.dtype, device)

    from .checkpoint import peek_model
    from .checkpoint.default_model import default_model_path, resolve_model
    from .imageio import from_pil, open_image
    from .pipeline import SMFSRUpscaler
    from .text_encoders import DEFAULT_PROMPT

    model = resolve_model(args.model) if args.model else default_model_path()
    config, defaults = peek_model(model)
    options.resolve(defaults, int(config["patch_size"]))  # the model's limits, before its weights load
    sources = text_sources(args)
    if args.prompt_text is not None and sources is None:
        raise SMFSRError("--prompt-text needs SD3.5's text encoders to encode it: add --sd35 (or --clip-l --clip-g "
                         "--t5 --tokenizers); without them the model's stored prompt is used")
    if args.prompt and sources is not None:
        raise SMFSRError("give --prompt (an encoded prompt file) or the text encoders, not both")
    text = encode_text(sources, args.prompt_text or defaults.prompt or DEFAULT_PROMPT, args) if sources else None
    upscaler = SMFSRUpscaler.from_pretrained(model, device=device, dtype=dtype, vae=args.vae, prompt=args.prompt,
                                             weights=args.weights, block_swap=args.block_swap, compile=args.compile)
    if text is not None:
        upscaler.prompt_embeds, upscaler.prompt_pooled = text
    settings = upscaler.settings(options)
    failures = 0
    for index, job in enumerate(jobs, 1):
        label = f"{tag}[{index}/{len(jobs)}] {job.source}"
        try:
            image = from_pil(open_image(job.source, max_pixels=args.max_pixels))
            for note in image.notes:
                _say(args, f"{label}: {note}")
            with _progress_bar(args, label) as bar:
                result = upscaler.upscale_image(image, settings, progress=bar)
            if args.rgb:
                result = result.convert("RGBA" if "A" in result.getbands() else "RGB")
            try:
                write_png(result, job.target)
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
    """A tqdm bar over latent tiles, as a ``progress(done, total)`` callback."""

    def __init__(self, args: argparse.Namespace, label: str):
        self.args, self.label, self.bar = args, label, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.args.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=Path(self.label).name[:40], unit="tile", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def cmd_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SMFSRError("the app needs gradio: pip install 'smfsr[app]' (or pip install gradio)") from None
    from .app import serve

    serve(args.model, args.models_dir, args.host, args.port, args.device, args.dtype, weights=args.weights,
          block_swap=args.block_swap)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint.describe import describe

    print(describe(args.model))
    return EXIT_OK


def text_sources(args: argparse.Namespace):
    """The SD3.5 text encoders the user named (--sd35 / --clip-l --clip-g --t5 / --tokenizers), or None."""
    from .text_encoders import find_sources

    named = [getattr(args, k, None) for k in ("sd35", "clip_l", "clip_g", "t5")]
    if not any(named):
        return None
    return find_sources(args.sd35, clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5, tokenizers=args.tokenizers)


def encode_text(sources, text: str, args: argparse.Namespace):
    """(embeds, pooled) of ``text``; the encoders are freed when this returns."""
    import torch

    from .text_encoders import clip_truncated, encode_prompt, load_pipeline

    t5_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.t5_dtype]
    print(f"encoding the prompt with SD3.5's text encoders (T5-XXL in {args.t5_dtype} on {args.text_device}) ...",
          file=sys.stderr)
    pipe = load_pipeline(sources, t5_dtype=t5_dtype, device=args.text_device)
    if clip_truncated(pipe, text):
        print("note: CLIP reads the first 77 tokens of the prompt, T5 all of it (as SD3.5 always does)", file=sys.stderr)
    embeds, pooled = encode_prompt(pipe, text)
    del pipe
    return embeds, pooled


def cmd_encode_prompt(args: argparse.Namespace) -> int:
    from .text_encoders import DEFAULT_PROMPT, write_prompt_file

    if Path(args.output).exists() and not args.overwrite:
        raise SMFSRError(f"{args.output} already exists; choose another name or pass --overwrite")
    sources = text_sources(args)
    if sources is None:
        raise SMFSRError("name SD3.5's text encoders: --sd35 FOLDER_OR_CHECKPOINT, or --clip-l --clip-g --t5 with "
                         "--tokenizers")
    text = args.text if args.text is not None else DEFAULT_PROMPT
    embeds, pooled = encode_text(sources, text, args)
    path = write_prompt_file(args.output, embeds, pooled, text, overwrite=args.overwrite)
    print(f"wrote {path}: embeds {tuple(embeds.shape)}, pooled {tuple(pooled.shape)}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import Bundle, PipelineDefaults, import_official_transformer, import_vae, read_prompt_file, save_bundle
    from .text_encoders import DEFAULT_PROMPT

    if Path(args.output).exists() and not args.overwrite:
        raise SMFSRError(f"{args.output} already exists; choose another name or pass --overwrite")
    if args.prompt_embeds and args.sd35:
        raise SMFSRError("give --prompt-embeds or --sd35 (to encode --prompt-text), not both")
    sources = text_sources(args)  # checked before the large transformer loads
    if args.weights == "fp8":
        from .quant import fp8_supported

        if fp8_supported():
            raise SMFSRError(f"--weights fp8: {fp8_supported()}")
    source = None
    if Path(args.transformer).is_file():  # an existing bundle, e.g. to store it in fp8
        from .checkpoint import load_bundle

        source = load_bundle(args.transformer)
        transformer = source.transformer
    else:
        transformer = import_official_transformer(args.transformer)
    if args.weights == "fp8":
        from .quant import is_fp8, to_fp8

        if not is_fp8(transformer):
            to_fp8(transformer, args.fp8_scale)
    vae_source = args.vae or (args.sd35 if args.sd35 else None)
    vae = import_vae(vae_source) if vae_source else source.vae if source is not None else None
    embeds = pooled = None
    text = args.prompt_text
    if args.prompt_embeds:
        embeds, pooled = read_prompt_file(args.prompt_embeds)
    elif sources is not None:
        text = text if text is not None else DEFAULT_PROMPT
        embeds, pooled = encode_text(sources, text, args)
    elif source is not None:
        embeds, pooled, text = source.prompt_embeds, source.prompt_pooled, source.defaults.prompt
    if source is not None:
        defaults = source.defaults
        defaults.prompt = text or ""
    else:
        defaults = PipelineDefaults(upscale=args.upscale, prompt=text or "")
    if vae is not None:
        defaults.vae_scaling_factor = float(vae.config.scaling_factor)
        defaults.vae_shift_factor = float(vae.config.shift_factor or 0.0)
    license = args.license or (source.license if source is not None else "see the original model's licence")
    bundle = Bundle(transformer=transformer, vae=vae, prompt_embeds=embeds, prompt_pooled=pooled, defaults=defaults,
                    license=license, provenance=f"converted by smfsr {__version__} from {args.transformer}"
                    + (f" ({args.weights} weights)" if args.weights == "fp8" else ""))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    path = save_bundle(args.output, bundle, overwrite=args.overwrite, dtype=dtype)
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
    up.add_argument("--weights", choices=["auto", "fp8"], default="auto",
                    help="fp8: quantise the transformer blocks to fp8 on load (half of bf16's memory); auto: as stored")
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
    app.add_argument("--weights", choices=["auto", "fp8"], default="auto", help="as for upscale")
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
    conv.add_argument("--weights", choices=["auto", "fp8"], default="auto",
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
