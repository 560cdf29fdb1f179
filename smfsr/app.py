"""A local web page for SMFSR (gradio): ``smfsr app [--model PATH] [--host 127.0.0.1] [--port N]``.

Drop one image or several, choose the model, scale, seed (the dice draws one), steps, tile and
colour fix; see before and after with a comparison slider at the same zoom; download PNGs. The
work runs in gradio's queue, one job at a time, with a per-tile progress bar and a Cancel button.
The sliders offer what the chosen model takes (steps up to its limit, tiles in its patch size);
every error is one readable line on the page, never a traceback or a temporary path.

API (``gradio_client``): one endpoint, ``/upscale``, with the inputs in the page's order (files,
model name, scale, seed, steps, latent tile, colour fix) -> (before/after pair, PNG paths, status).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
from pathlib import Path

from .checkpoint.catalog import ModelEntry, find_models
from .checkpoint.default_model import REPO_MODELS
from .errors import SMFSRError, door_message
from .options import COLOR_FIX_CHOICES, LATENT_TILE, SCALE, STEPS

LOOPBACK = "127.0.0.1"

log = logging.getLogger("smfsr")
# how an option the core names is called on the page, for messages (errors.door_message)
PAGE_NAMES = {"steps": "the Steps slider", "latent_tile": "the Latent tile slider", "scale": "the Scale slider",
              "seed": "the Seed", "color_fix": "the Colour fix", "model": "the Model menu",
              "vae_input": "a bundle's VAE (`smfsr convert --vae`)",
              "encoders_input": "a bundle's prompt (`smfsr convert --sd35`)"}


class Models:
    """The model menu and the loaded upscalers (one at a time is kept: they can be large)."""

    def __init__(self, entries: list[ModelEntry], runtime):
        self.entries = {e.name: e for e in entries}
        self.runtime = runtime
        self.loaded: tuple[str, object] | None = None
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str):
        from .pipeline import SMFSRUpscaler

        if name not in self.entries:
            raise SMFSRError(f"unknown model {name!r}; choose one from the list")
        with self.lock:
            if self.loaded is None or self.loaded[0] != name:
                self.loaded = None
                self.loaded = (name, SMFSRUpscaler.from_pretrained(self.entries[name].path, runtime=self.runtime))
            return self.loaded[1]


def model_entries(model: str | None, models_dir: str | None) -> list[ModelEntry]:
    """--model (or $SMFSR_MODEL) first, then the models in --models-dir and the repository's models/."""
    model = model or os.environ.get("SMFSR_MODEL")
    entries = find_models(([Path(models_dir)] if models_dir else []) + [REPO_MODELS])
    if model:
        from .checkpoint.default_model import resolve_model

        path = resolve_model(model).resolve()
        chosen = [e for e in find_models([path.parent]) if e.path.resolve() == path]
        if not chosen:
            raise SMFSRError(f"{model} is not an SMFSR bundle or official folder (`smfsr info {model}` says what it is)")
        entries = chosen + [e for e in entries if e.path.resolve() != path]
    if not entries:
        raise SMFSRError("no SMFSR models found: pass --model FILE or --models-dir DIR")
    return entries


def upscale_files(models: Models, files: list, model_name: str, scale: float, seed: int, steps: int, tile: int,
                  color_fix: str, progress) -> tuple:
    """The Run button: upscale every file; return (before, after) of the first, the PNGs, a note."""
    import gradio as gr

    from .imageio import from_pil, open_image, to_pil
    from .options import UpscaleOptions
    from .pipeline import resize

    if not files:
        raise gr.Error("Drop or pick an image first.")
    try:
        upscaler = models.get(model_name)
    except SMFSRError as e:
        raise gr.Error(f"The model could not be loaded: {one_line(e)}") from None
    try:
        settings = upscaler.settings(UpscaleOptions.from_widgets(scale=scale, seed=seed, steps=steps, tile_size=tile,
                                                                 color_fix=color_fix))
    except SMFSRError as e:
        raise gr.Error(one_line(e)) from None
    out_dir = Path(tempfile.mkdtemp(prefix="smfsr-app-"))
    results, notes, slider = [], [], None
    for index, file in enumerate(files):
        path = Path(file if isinstance(file, str) else file.name)
        try:
            image = from_pil(open_image(path))
        except SMFSRError as e:
            notes.append(f"**{path.name}**: {one_line(e, path)}")
            continue
        plan = upscaler.announcement(*image.rgb.shape[-2:], settings)
        if plan:
            progress(index / len(files), desc=f"{path.name}: {plan}")

        def tick(done: int, total: int, i=index) -> None:
            progress((i + done / total) / len(files), desc=f"{path.name}: tile {done}/{total}")

        try:
            result = upscaler.upscale_image(image, settings, progress=tick)
        except SMFSRError as e:
            notes.append(f"**{path.name}**: {one_line(e, path)}")
            continue
        target = out_dir / f"{path.stem}_smfsr_x{settings.scale:g}.png"
        result.save(target)
        results.append(str(target))
        notes += [f"{path.name}: {n}" for n in image.notes]
        if slider is None:  # before = the input, bicubic to the output size: the same zoom
            before = to_pil(resize(image.rgb[None], result.height, result.width)[0])
            slider = (before, result.convert("RGB"))
    if not results:
        raise gr.Error("No image could be upscaled. " + " ".join(n.replace("**", "") for n in notes))
    note = f"Upscaled {len(results)} of {len(files)} image(s) with seed {settings.seed}, {settings.steps} step(s)."
    return slider, results, "\n\n".join([note] + notes)


def one_line(error: Exception, path: Path | None = None) -> str:
    """An error as one line for the page: its first line, in the page's terms (its sliders, not the
    command line's flags), an uploaded file named by its name (not gradio's temporary path)."""
    text = door_message(error, PAGE_NAMES).strip()
    text = text.splitlines()[0] if text else type(error).__name__
    return text.replace(str(path), path.name) if path is not None else text


def run_safely(models: Models, *inputs, progress) -> tuple:
    """The Run button: every failure becomes one readable line on the page (gr.Error); anything
    unexpected is logged with its traceback on the console and named in one line."""
    import gradio as gr

    try:
        return upscale_files(models, *inputs, progress)
    except gr.Error:
        raise
    except SMFSRError as e:
        raise gr.Error(one_line(e)) from None
    except Exception as e:
        log.exception("the app's upscale failed")
        raise gr.Error(f"Unexpected {type(e).__name__}: {one_line(e)} (the console that runs the app has "
                       "the details)") from None


def slider_limits(entry: ModelEntry) -> tuple[dict, dict]:
    """(steps, tile) slider settings for a model: steps up to what it takes, tiles in its patch size."""
    top = entry.max_steps or STEPS.maximum
    steps = dict(minimum=0, maximum=top, step=1,
                 label="Steps (0 = the model's default)" + (" - this model takes one step only" if top == 1 else ""))
    tile = dict(minimum=0, maximum=LATENT_TILE.maximum // entry.patch * entry.patch, step=entry.patch,
                label=f"Latent tile (latent px, multiples of {entry.patch}; 0 = the model's default)")
    return steps, tile


def build(models: Models):
    import gradio as gr

    first = models.entries[models.names()[0]]
    with gr.Blocks(title="SMFSR") as demo:
        gr.Markdown("# SMFSR: one-step super-resolution\nDrop images, choose settings, press **Upscale**.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="smfsr-input")
                model = gr.Dropdown(models.names(), value=first.name, label="Model")
                scale = gr.Slider(SCALE.step, SCALE.maximum, value=first.factor, step=SCALE.step, label="Scale")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                    dice = gr.Button("Random seed", scale=0, min_width=90, elem_id="smfsr-dice")
                steps_limits, tile_limits = slider_limits(first)
                steps = gr.Slider(value=0, **steps_limits)
                tile = gr.Slider(value=0, **tile_limits)
                color = gr.Radio(list(COLOR_FIX_CHOICES), value="auto",
                                 label="Colour fix (auto = the model's default)")
                with gr.Row():
                    run = gr.Button("Upscale", variant="primary", elem_id="smfsr-run")
                    cancel = gr.Button("Cancel", elem_id="smfsr-cancel")
            with gr.Column(scale=2):
                compare = gr.ImageSlider(label="Before / after", type="pil", format="png", elem_id="smfsr-result")
                downloads = gr.File(label="Download (PNG)", file_count="multiple", elem_id="smfsr-downloads")
                status = gr.Markdown(elem_id="smfsr-status")

        def go(files, model, scale, seed, steps, tile, color, progress=gr.Progress()):
            return run_safely(models, files, model, scale, seed, steps, tile, color, progress=progress)

        def limits(name):  # the sliders follow the chosen model
            entry = models.entries.get(name, first)
            steps_limits, tile_limits = slider_limits(entry)
            return gr.update(value=0, **steps_limits), gr.update(value=0, **tile_limits), gr.update(value=entry.factor)

        model.change(limits, model, [steps, tile, scale], api_name=False)

        job = run.click(go, [files, model, scale, seed, steps, tile, color], [compare, downloads, status],
                        api_name="upscale", concurrency_limit=1)
        cancel.click(None, cancels=[job])
        dice.click(lambda: random.randrange(2**31), None, seed, api_name=False)
    return demo


def serve(model: str | None, models_dir: str | None, host: str, port: int | None, device: str | None,
          dtype: str | None, block: bool = True, weights: str = "auto", block_swap: int | str = 0):
    from .runtime import Runtime

    entries = model_entries(model, models_dir)  # names and files first: no torch needed
    runtime = Runtime(device, dtype, weights, block_swap).resolved()  # then the device, before the page starts
    models = Models(entries, runtime)
    if host != LOOPBACK:
        print(f"warning: serving on {host}: anyone who can reach this machine can use the app (there is no login)")
    demo = build(models)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=not block)
    return demo
