"""The SMFSR model inside ComfyUI: its model folder, loading, and ComfyUI's memory manager.

Only imported inside ComfyUI (it imports ``folder_paths`` and ``comfy``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch

from smfsr.checkpoint import Bundle
from smfsr.checkpoint.official import LDM_VAE_PREFIXES
from smfsr.checkpoint.safe_read import load_tensors, read_header
from smfsr.errors import CheckpointError, SMFSRError
from smfsr.checkpoint.default_model import DEFAULT, REPO_MODELS, SHIPPED, shipped
from smfsr.pipeline import SMFSRUpscaler, load_prepared
from smfsr.runtime import FirstCallTimer, Runtime

FOLDER = "smfsr"
EXTENSIONS = {".safetensors", ".sft"}


def register_model_folder() -> None:
    """models/smfsr (+ the repository's models/), filtered to safetensors. Paths that
    extra_model_paths.yaml already registered are kept, and their extension filter gains ours."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
        paths = list(paths) + ([default] if default not in paths else [])
        extensions = set(extensions) | EXTENSIONS if extensions else set(EXTENSIONS)
    else:
        paths, extensions = [default], set(EXTENSIONS)
    if REPO_MODELS.is_dir() and str(REPO_MODELS) not in paths:
        paths.append(str(REPO_MODELS))
    folder_paths.folder_names_and_paths[FOLDER] = (paths, extensions)


def model_names() -> list[str]:
    """Bundles, plus official folders (``<name>/transformer/config.json``) as ``<name>/``."""
    names = list(folder_paths.get_filename_list(FOLDER))
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            names += sorted(f"{d}/" for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "transformer", "config.json")))
    return names


def checkpoint_vae_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Only the VAE's tensors of a single-file checkpoint (``first_stage_model.*``, or a bundle's
    ``vae.*``), prefix removed: what ComfyUI's VAE reads, without loading the rest of the file."""
    _, header = read_header(path)  # refuses pickles, truncated and foreign files with a clear message
    prefix = next((p for p in LDM_VAE_PREFIXES if any(k.startswith(p + "decoder.") for k in header)), None)
    if prefix is None:
        raise CheckpointError(f"{Path(path).name} holds no VAE (no first_stage_model.* tensors); choose a checkpoint "
                              "with one (Stability's sd3.5_medium.safetensors has it), or use Load VAE")
    return load_tensors(path, prefix=prefix)


def checkpoint_text_encoder_states(path: str | os.PathLike) -> list[dict[str, torch.Tensor]]:
    """The text encoders of an all-in-one checkpoint (Comfy-Org's ``text_encoders.clip_l/clip_g/t5xxl``),
    one state dict each in the names of their own files (what ComfyUI's CLIP loaders read), without
    the MMDiT and the VAE the file also holds."""
    from smfsr.text_encoders import CHECKPOINT_PREFIXES

    _, header = read_header(path)
    prefixes = [p for p in CHECKPOINT_PREFIXES.values() if any(k.startswith(p) for k in header)]
    if not prefixes:
        raise CheckpointError(f"{Path(path).name} holds no text encoders (no text_encoders.* tensors): Stability's "
                              "sd3.5_medium.safetensors is the MMDiT and the VAE only; load its encoders with "
                              "TripleCLIPLoader (models/text_encoders/clip_l, clip_g, t5xxl_fp8_e4m3fn), or choose "
                              "Comfy-Org's sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors")
    return [load_tensors(path, prefix=p) for p in prefixes]


def default_name() -> str | None:
    """The shipped default model, selected first in a new loader node."""
    names = model_names()
    return f"{DEFAULT}.safetensors" if f"{DEFAULT}.safetensors" in names else (names[0] if names else None)


def model_path(name: str) -> Path:
    """A name from the loader's list; a shipped model's bare name (``smfsr-small-x4``) works too."""
    if name in SHIPPED and name not in model_names():
        return shipped(name)
    if name.endswith("/"):
        for root in folder_paths.get_folder_paths(FOLDER):
            if os.path.isdir(os.path.join(root, name)):
                return Path(root, name)
        raise FileNotFoundError(f"SMFSR model folder {name} not found in {folder_paths.get_folder_paths(FOLDER)}")
    return Path(folder_paths.get_full_path_or_raise(FOLDER, name))


@dataclass
class SMFSRModel:
    """What an SMFSR_MODEL socket carries: the loaded bundle and ModelPatchers for ComfyUI's
    memory manager (the transformer, and the bundle's own VAE when it has one)."""

    bundle: Bundle
    patchers: list
    name: str
    compiled: bool = False
    # one upscaler per VAE it runs with, kept with the model: its warm-up timings (estimate.py) and
    # torch.compile's first-call timer last as long as the loaded model, not one run
    upscalers: dict = field(default_factory=dict, repr=False)

    def _upscaler(self, vae_module, sampling_only: bool = False) -> SMFSRUpscaler:
        key = ("sampling", None) if sampling_only else ("vae", id(vae_module))  # the entry keeps the module alive
        if key not in self.upscalers:
            up = SMFSRUpscaler(self.bundle, vae=vae_module, sampling_only=sampling_only)
            up.compiled, up.first_call = self.compiled, FirstCallTimer(self.compiled)
            self.upscalers[key] = up
        return self.upscalers[key]

    @property
    def defaults(self):
        return self.bundle.defaults

    def upscaler_for(self, vae=None) -> SMFSRUpscaler:
        """This model on its device, with a core VAE (its ldm ``first_stage_model``) or its own."""
        load_on_device(self.patchers + ([vae.patcher] if vae is not None else []))
        if vae is None and self.bundle.vae is None:
            raise SMFSRError(f"the SMFSR model {self.name} has no VAE of its own: connect the VAE from your "
                             "SD3.5 checkpoint loader (or Load VAE) to the node's vae input; `smfsr download "
                             "sd35-medium-vae --for comfyui` puts SD3.5's VAE in models/vae")
        return self._upscaler(vae.first_stage_model if vae is not None else None)

    def sampler(self) -> SMFSRUpscaler:
        """For sampling only: needs the latent scale/shift, not a VAE."""
        load_on_device(self.patchers)
        return self._upscaler(None, sampling_only=True)

    def vae_module(self):
        """The bundle's own VAE, on its device, or None."""
        if self.bundle.vae is None:
            return None
        load_on_device(self.patchers)
        return self.bundle.vae


class Managed(torch.nn.Module):
    """What a ModelPatcher manages: it assigns ``.device`` on its model, which diffusers models
    expose read-only, so the network sits inside this holder (moving the holder moves it).

    ComfyUI sees the network without its swapped blocks (smfsr.offload.BlockSwap streams those
    itself): ModelPatcher sizes a model by its state dict and moves it module by module, parameter
    by parameter, which would put swapped blocks on the GPU for good (or leave their stored copies
    orphaned). The rest is loaded whole (``load_on_device``): these are plain torch layers, not
    ComfyUI's cast-weights ops, so a partial load would leave some of them on the CPU."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.device = next(module.parameters()).device

    def _hidden(self) -> tuple[str, ...]:
        swap = getattr(self.module, "block_swap", None)
        return tuple(f"module.transformer_blocks.{i}." for i in swap.swapped) if swap is not None else ()

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        hidden = tuple(f"{prefix}.{h}" if prefix else h for h in self._hidden())
        for name, module in super().named_modules(memo, prefix, remove_duplicate):
            if not (name + ".").startswith(hidden):
                yield name, module

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        hidden = self._hidden()
        return {k: v for k, v in state.items() if not k.startswith(hidden)} if hidden else state


def load_on_device(patchers: list) -> None:
    """ComfyUI's memory manager makes room and loads the SMFSR networks whole (see ``Managed``)."""
    mm.load_models_gpu(patchers, force_full_load=True)


def load(name: str, dtype: str, weights: str = "auto", block_swap: int = 0, compile: bool = False) -> SMFSRModel:
    """The core's loader with the widgets as a Runtime, the weights left on the CPU: ComfyUI's memory
    manager then moves them (other models are freed before it runs, and it is unloaded when later
    nodes need room). Under --lowvram / --novram, block swap is on by itself."""
    device = mm.get_torch_device()
    runtime = Runtime.from_widgets(device, dtype, weights=weights, block_swap=block_swap, compile=compile,
                                   low_memory=mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM))
    bundle = load_prepared(model_path(name), runtime, place=False)  # an official folder has no VAE: fine here
    patchers = [comfy.model_patcher.ModelPatcher(Managed(bundle.transformer), load_device=device,
                                                 offload_device=mm.unet_offload_device())]
    if bundle.vae is not None and any(True for _ in bundle.vae.parameters()):  # not the lossless codec
        patchers.append(comfy.model_patcher.ModelPatcher(Managed(bundle.vae), load_device=device,
                                                         offload_device=mm.vae_offload_device()))
    return SMFSRModel(bundle, patchers, name, compiled=runtime.compile)
