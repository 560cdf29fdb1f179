"""``smfsr convert``: a bundle from official parts (a transformer folder, a VAE, a prompt), or an
existing bundle stored again (in fp8, another dtype, with another prompt)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..atomic import refuse_existing
from ..errors import SMFSRError
from ..memory import check_host_fits
from .bundle import Bundle, load_bundle, read_prompt_file, save_bundle
from .defaults import PipelineDefaults
from .official import import_official_transformer, import_vae

STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EncodeText = Callable[[str], tuple[torch.Tensor, torch.Tensor]]  # prompt text -> (embeds, pooled)


def convert(transformer: str | os.PathLike, output: str | os.PathLike, *, vae: str | os.PathLike | None = None,
            prompt_embeds: str | os.PathLike | None = None, prompt_text: str | None = None,
            encode_text: EncodeText | None = None, default_prompt: str = "", upscale: int = 4, weights: str = "auto",
            fp8_scale: str = "channel", dtype: str = "fp16", license: str | None = None,
            overwrite: bool = False) -> Path:
    """Write a bundle to ``output``. ``transformer`` is an official folder (or its transformer/)
    or a bundle; the prompt comes from ``prompt_embeds`` (a file), or ``encode_text`` of
    ``prompt_text`` (default ``default_prompt``), or the source bundle's."""
    output = refuse_existing(output, overwrite)
    weights = "fp8" if weights in ("fp8", "fp8_e4m3fn") else weights
    if prompt_embeds and encode_text:
        raise SMFSRError("give --prompt-embeds or the text encoders (to encode --prompt-text), not both")
    if weights == "fp8":
        from ..quant import fp8_supported

        if fp8_supported():
            raise SMFSRError(f"${{weights}} fp8: {fp8_supported()}")
    # the prompt first: its encoders (12.6 GiB at SD3.5's size) are freed before the transformer loads
    embeds = pooled = None
    text = prompt_text
    if prompt_embeds:
        embeds, pooled = read_prompt_file(prompt_embeds)
    elif encode_text is not None:
        text = text if text is not None else default_prompt
        embeds, pooled = encode_text(text)

    # read straight into the stored dtype (fp8 is quantized from the file's precision)
    storage = STORAGE_DTYPES[dtype]
    check_host_fits(transformer, storage, weights == "fp8", ["--dtype fp16 (half of fp32)"] * (storage == torch.float32),
                    doing="to convert", runs=False)
    read_as = None if weights == "fp8" else storage
    source = load_bundle(transformer, dtype=read_as) if Path(transformer).is_file() else None
    network = source.transformer if source is not None else import_official_transformer(transformer, read_as)
    if weights == "fp8":
        from ..quant import is_fp8, to_fp8

        if not is_fp8(network):
            to_fp8(network, fp8_scale)
    vae_module = import_vae(vae) if vae else source.vae if source is not None else None
    if source is not None and prompt_embeds is None and encode_text is None:  # kept from the bundle
        embeds, pooled, text = source.prompt_embeds, source.prompt_pooled, source.defaults.prompt

    defaults = source.defaults if source is not None else PipelineDefaults(upscale=upscale)
    defaults.prompt = text or ""
    if vae_module is not None:
        defaults.use_vae(vae_module, same_latent_space=vae is not None)  # a VAE given for the network: its own
    bundle = Bundle(transformer=network, vae=vae_module, prompt_embeds=embeds, prompt_pooled=pooled, defaults=defaults,
                    license=license or (source.license if source is not None else "see the original model's licence"),
                    provenance=f"converted by smfsr {__version__} from {transformer}"
                    + (f" ({weights} weights)" if weights == "fp8" else ""))
    return save_bundle(output, bundle, overwrite=overwrite, dtype=STORAGE_DTYPES[dtype])
