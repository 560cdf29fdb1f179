"""SMFSR as an A1111/Forge upscaler: one entry per model in the Extras tab, Hires. fix and the API.

Imports only A1111's stable modules (modules.upscaler, modules.shared, modules.sd_models); Forge's
memory manager is used when present (``backend.memory_management``)."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import torch
from PIL import Image

from modules import shared
from modules.upscaler import Upscaler, UpscalerData

from smfsr.errors import SMFSRError, door_message
from smfsr.imageio import from_pil
from smfsr.pipeline import SMFSRUpscaler

from . import logic

log = logging.getLogger("smfsr")


class Interrupted(Exception):
    """Raised from the per-tile progress callback when the user presses Interrupt or Skip."""


class UpscalerSMFSR(Upscaler):  # the name gives --smfsr-models-path (cmd_opts.smfsr_models_path)
    def __init__(self, dirname: str | None = None):
        self.name = "SMFSR"
        self.user_path = dirname
        super().__init__()
        self.cached: tuple[tuple, SMFSRUpscaler] | None = None
        self.scalers = [UpscalerData(entry.name, str(entry.path), self, entry.factor)
                        for entry in logic.discover(shared.models_path, dirname)]

    def load_model(self, path: str) -> SMFSRUpscaler:
        runtime = logic.runtime(settings(), self.device, bool(shared.cmd_opts.no_half), low_vram())
        key = (path, runtime)
        if self.cached is None or self.cached[0] != key:
            self.cached = None
            with host_model_load_finished():
                self.cached = (key, SMFSRUpscaler.from_pretrained(path, runtime=runtime))
        return self.cached[1]

    def do_upscale(self, img: Image.Image, selected_model: str) -> Image.Image:
        s = settings()
        try:
            with room_on_the_gpu(self.device):
                upscaler = self.load_model(selected_model)
                options = logic.options(s, self.scale)
                line = upscaler.announcement(img.height, img.width, options)
                if line:  # a long job: said on the console and in the progress text before it starts
                    log.warning("%s", line)
                    shared.state.textinfo = f"SMFSR: {line}"
                return upscaler.upscale_image(from_pil(img), options, progress=report_progress)
        except Interrupted:
            return img  # A1111 sees state.interrupted and stops; the input comes back unchanged
        except SMFSRError as e:
            # A1111 would show nothing useful (Extras falls back to a plain resize): say why, in its terms
            message = door_message(e, logic.SETTING_NAMES)
            shared.state.textinfo = f"SMFSR: {message}"
            raise SMFSRError(message) from None


def console_log() -> None:
    """SMFSR's messages on the web UI's console, "SMFSR: "-prefixed, information included (A1111
    leaves logging unconfigured unless asked: only warnings would show, unprefixed)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("SMFSR: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


console_log()


def host_model_load_finished():
    """A1111 builds its SD model under InitializeOnMeta, which puts the weights of every Linear and
    Conv2d made meanwhile, in any thread, on the meta device; it loads the model in a background
    thread at start-up, holding ``model_data.lock``. An upscale right after start-up would build SMFSR
    with meta weights ("Cannot copy out of meta tensor"): its networks are built under the same lock,
    so after that load."""
    from contextlib import nullcontext

    from modules import sd_models

    lock = getattr(getattr(sd_models, "model_data", None), "lock", None)  # Forge loads differently
    return lock if lock is not None else nullcontext()


def settings() -> dict:
    return {key: getattr(shared.opts, key, default) for key, default in logic.DEFAULTS.items()}


def report_progress(done: int, total: int) -> None:
    """Per-tile progress for the web UI's bar and /sdapi/v1/progress; stops on Interrupt/Skip."""
    shared.state.sampling_steps = total
    shared.state.sampling_step = done
    if shared.state.interrupted or shared.state.skipped:
        raise Interrupted


def low_vram() -> bool:
    return bool(getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False))


@contextmanager
def room_on_the_gpu(device):
    """Forge: its memory manager unloads its models, on any device (it loads them again when it
    next needs them). A1111: its SD model leaves the GPU only under --lowvram/--medvram, and comes
    back after (logic.host_model_aside)."""
    try:
        from backend import memory_management  # Forge
    except ImportError:
        memory_management = None
    if memory_management is not None:
        memory_management.unload_all_models()
        memory_management.soft_empty_cache()
        print("SMFSR: Forge's memory manager unloaded its models", flush=True)
        yield
        return
    if device is None or torch.device(device).type != "cuda":
        yield
        return
    from modules import sd_models

    with logic.host_model_aside(getattr(shared, "sd_model", None), low_vram(), sd_models.send_model_to_cpu,
                                sd_models.send_model_to_device):
        yield


def clear_extras_cache() -> None:
    """A1111's Extras tab caches results without our settings in the key: drop it when they change."""
    for module in list(sys.modules.values()):
        cache = getattr(module, "upscale_cache", None)
        if isinstance(cache, dict) and getattr(module, "__file__", "").endswith("postprocessing_upscale.py"):
            cache.clear()


def register_settings() -> None:
    import gradio as gr

    components = {"slider": gr.Slider, "number": gr.Number, "radio": gr.Radio}
    for s in logic.SETTINGS:
        shared.opts.add_option(s.key, shared.OptionInfo(s.default, s.label, components[s.kind], s.args,
                                                        onchange=clear_extras_cache, section=logic.SECTION))
    api_models = sys.modules.get("modules.api.models")
    if api_models is not None:
        # Forge imports the API's options model before extension scripts load; it is built from the
        # settings known then, and /sdapi/v1/options answers only its fields. Extended here, before
        # the API's routes are made (A1111 builds it later, from every registered setting).
        from typing import Optional

        from pydantic import Field, create_model

        fields = {s.key: (Optional[shared.opts.typemap.get(type(s.default), type(s.default))],
                          Field(default=s.default, description=s.label)) for s in logic.SETTINGS}
        api_models.OptionsModel = create_model("Options", __base__=api_models.OptionsModel, **fields)


# Registered when the script loads, not in on_ui_settings: API-only web UIs (--nowebui) never run
# that callback, and /sdapi/v1/options would not list (or accept) the settings. A value saved in
# config.json is kept (add_option only fills in a default).
register_settings()
