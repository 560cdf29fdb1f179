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

from .arguments import build_parser
from .atomic import refuse_existing
from .errors import SMFSRError

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


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
            if args.compare:
                _write_comparison(args, label, job, result)
        except SMFSRError as e:
            failures += 1
            print(f"error: {label}: {e}", file=sys.stderr)
        except Exception as e:  # keep going: one bad image must not stop a folder
            failures += 1
            print(f"error: {label}: unexpected {type(e).__name__}: {e}", file=sys.stderr)
            if args.debug:
                traceback.print_exc()
    return failures


def _write_comparison(args: argparse.Namespace, label: str, job, result) -> None:
    """The side-by-side beside the result; one the user has is kept unless --overwrite."""
    from .batch import write_png
    from .compare import compare_path, side_by_side
    from .imageio import open_image

    target = compare_path(job.target)
    if target.exists() and not args.overwrite:
        print(f"warning: {label}: {target} already exists, not replaced (use --overwrite)", file=sys.stderr)
        return
    try:
        write_png(side_by_side(open_image(job.source, max_pixels=args.max_pixels), result), target)
    except OSError as e:
        raise SMFSRError(f"could not write {target} ({e.strerror or e})") from None
    _say(args, f"{label} -> {target} (bicubic | SMFSR)")


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

    return encode_text(sources, text, t5_dtype=args.t5_dtype, device=args.text_device, t5_tokens=args.t5_tokens,
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


def cmd_download(args: argparse.Namespace) -> int:
    from .download import download

    download(args.name, door=args.door, out=args.output, comfyui_dir=args.comfyui_dir, a1111_dir=args.a1111_dir,
             bundle=args.bundle, revision=args.revision, endpoint=args.endpoint)
    return EXIT_OK


COMMANDS = {"upscale": cmd_upscale, "app": cmd_app, "encode_prompt": cmd_encode_prompt, "info": cmd_info,
            "convert": cmd_convert, "download": cmd_download}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command != "download":  # the one command that uses the network, when the user runs it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if getattr(args, "verbose", False) or args.command == "app":  # a server says what it loads on its console
        logging.getLogger("smfsr").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except SMFSRError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `smfsr info ... | head`: the reader left; nothing to say
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
