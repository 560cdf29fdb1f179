"""SMFSR checkpoint bundles: one ``.safetensors`` file that every door loads (design.md).

Layout: tensors ``transformer.*`` (the velocity net), optional ``vae.*`` (a diffusers AutoencoderKL),
optional ``prompt.embeds`` (1, L, joint_dim) and ``prompt.pooled`` (1, pooled_dim); the safetensors
header metadata holds the format version, both configs as JSON, the pipeline defaults (upscale
factor, steps, VAE scale/shift, ...), licence and provenance.

Loading checks every key and shape against the config and says in one message what is missing,
extra or mis-shaped (the official loader's ``strict=False`` silently ignores all three). Only
safetensors is ever read: pickled checkpoints are refused, because unpickling runs code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .models.space_to_depth import SpaceToDepthVAE, is_space_to_depth
from .models.transformer import SMFSRTransformer

FORMAT_VERSION = 1
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
OFFICIAL_WEIGHTS = "diffusion_pytorch_model.safetensors"

# Tensors a file may lack: a buffer we can recompute, and modules the official code builds but
# never runs (method.md 5.4, 5.5, 6.5). Absent ones are filled (recomputed / zeros), never used.
OPTIONAL_TRANSFORMER_KEYS = re.compile(
    r"^(pos_embed\.pos_embed"
    r"|interval_embedder\.\d+\.(weight|bias)"
    r"|transformer_blocks\.\d+\.attn2\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\.(weight|bias))$"
)


@dataclass
class PipelineDefaults:
    """How a model is meant to be run; stored with it and overridable at every door."""

    upscale: int = 4
    steps: int = 1
    process_size: int = 512  # official: LR images are first resized so min side >= process_size / upscale
    vae_scaling_factor: float = 1.5305
    vae_shift_factor: float = 0.0609
    latent_tile: int = 64  # official: 64 latent px (512 px), overlap 24
    latent_overlap: int = 24
    color_fix: str = "adain"
    lr_latent: str = "sample"  # official: the LR posterior is sampled, not its mode
    flow_shift: float = 3.0  # Euler time shift when the model is a flow teacher (SD3.5: 3.0)
    prompt: str = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PipelineDefaults":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Bundle:
    """A loaded model: the networks plus what is needed to run them."""

    transformer: SMFSRTransformer
    vae: AutoencoderKL | SpaceToDepthVAE | None = None
    prompt_embeds: torch.Tensor | None = None
    prompt_pooled: torch.Tensor | None = None
    defaults: PipelineDefaults = field(default_factory=PipelineDefaults)
    license: str = ""
    provenance: str = ""
    source: str = ""


# --------------------------------------------------------------------------------------------
# reading files safely


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its header length (u64, little-endian) and then '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def looks_like_pickle(head: bytes) -> bool:
    """torch.save's zip container, or a raw pickle (protocol 2-5 starts with 0x80, protocol)."""
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def refuse_pickle(path: Path) -> None:
    """Raise if ``path`` looks like a pickled PyTorch checkpoint (by content, else by suffix)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if looks_like_safetensors(head, path.stat().st_size):
        return
    if looks_like_pickle(head) or path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickled PyTorch checkpoint. SMFSR only reads .safetensors files, because "
            "unpickling a file can run arbitrary code. If you trust the file, convert it once with:\n"
            "  python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"\n"
            "then pass the .safetensors file (official folders: `smfsr convert`)."
        )


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """Metadata and {name: (shape, dtype)} of a safetensors file, without loading tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a .safetensors file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish")
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}). It may be truncated (an unfinished "
            "download) or not a safetensors file at all; download or export it again."
        ) from None
    return metadata, shapes


def expected_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of a module, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_state(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    *,
    what: str,
    path: Path | str,
    optional: re.Pattern | None = None,
) -> None:
    """Raise one readable CheckpointError listing missing, unexpected and mis-shaped tensors."""
    missing = [k for k in expected if k not in found and not (optional and optional.match(k))]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return

    def listing(keys: list[str], show: Callable[[str], str]) -> str:
        shown = "\n".join(f"    {show(k)}" for k in keys[:8])
        return shown + (f"\n    ... and {len(keys) - 8} more" if len(keys) > 8 else "")

    parts = [f"{path} does not match the {what} it should contain:"]
    if missing:
        parts.append(f"  {len(missing)} missing: \n" + listing(missing, lambda k: f"{k} {list(expected[k])}"))
    if extra:
        parts.append(f"  {len(extra)} unexpected: \n" + listing(extra, lambda k: f"{k} {list(found[k])}"))
    if wrong:
        parts.append(
            f"  {len(wrong)} with the wrong shape:\n"
            + listing(wrong, lambda k: f"{k}: file {list(found[k])}, expected {list(expected[k])}")
        )
    parts.append(
        "The file may be damaged, belong to a different model, or come from an incompatible tool. "
        "Check `smfsr info` on it, or re-create it with `smfsr convert`."
    )
    raise CheckpointError("\n".join(parts))


# --------------------------------------------------------------------------------------------
# building models from configs


def _config_for(cls: type, config: dict[str, Any], what: str, path: Path | str) -> dict[str, Any]:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise CheckpointError(
            f"{path}: the {what} config has settings this SMFSR version does not know: {', '.join(unknown)}. "
            "It was probably written by a newer SMFSR; upgrade SMFSR."
        )
    return config


def _build(cls: type, config: dict[str, Any], what: str, path: Path | str):
    config = _config_for(cls, config, what, path)
    try:
        return cls(**config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build the {what} from its config ({e})") from None


def build_transformer(config: dict[str, Any], path: Path | str = "<config>") -> SMFSRTransformer:
    return _build(SMFSRTransformer, config, "transformer", path)


def build_vae(config: dict[str, Any], path: Path | str = "<config>") -> AutoencoderKL | SpaceToDepthVAE:
    """A diffusers ``AutoencoderKL``, or the parameter-free space-to-depth codec its config names."""
    if is_space_to_depth(config):
        return _build(SpaceToDepthVAE, {k: v for k, v in config.items() if k != "latent_channels"}, "VAE", path)
    return _build(AutoencoderKL, config, "VAE", path)


def _load_into(
    build: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor], fill: Callable[[str, torch.nn.Module], torch.Tensor]
) -> torch.nn.Module:
    """Build on meta, adopt the file's tensors, and fill any optional tensor the file lacked."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(tensors, strict=False, assign=True)
    for name, tensor in list(module.state_dict(keep_vars=True).items()):
        if tensor.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            value = fill(name, module)
            if isinstance(tensor, torch.nn.Parameter):
                setattr(owner, attr, torch.nn.Parameter(value, requires_grad=tensor.requires_grad))
            else:
                owner.register_buffer(attr, value)
    return module


def _fill_transformer(name: str, model: torch.nn.Module) -> torch.Tensor:
    if name == "pos_embed.pos_embed":
        embed = model.pos_embed
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        grid = embed.pos_embed_max_size
        pe = get_2d_sincos_pos_embed(embed.proj.out_channels, grid, base_size=embed.base_size,
                                     interpolation_scale=embed.interpolation_scale, output_type="pt")
        return pe.float().unsqueeze(0)
    shape = model.state_dict(keep_vars=True)[name].shape
    return torch.zeros(shape)  # an unused official module


def _fill_nothing(name: str, model: torch.nn.Module) -> torch.Tensor:
    raise CheckpointError(f"tensor {name} is missing")  # unreachable: check_state lists missing tensors first


# --------------------------------------------------------------------------------------------
# bundles


def _meta_json(metadata: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its metadata entry {key!r} is not valid JSON ({e}); re-export the file") from None


def is_bundle(metadata: dict[str, str]) -> bool:
    return "smfsr_format" in metadata


def save_bundle(
    path: str | os.PathLike,
    bundle: Bundle,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``bundle`` as one safetensors file, atomically; refuses to replace a file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    tensors = {f"transformer.{k}": cast(v) for k, v in bundle.transformer.state_dict().items()}
    metadata = {
        "smfsr_format": str(FORMAT_VERSION),
        "smfsr_transformer_config": json.dumps(dict(bundle.transformer.config)),
        "smfsr_pipeline": json.dumps(dataclasses.asdict(bundle.defaults)),
        "smfsr_license": bundle.license,
        "smfsr_provenance": bundle.provenance,
    }
    if bundle.vae is not None:
        tensors.update({f"vae.{k}": cast(v) for k, v in bundle.vae.state_dict().items()})
        metadata["smfsr_vae_config"] = json.dumps(dict(bundle.vae.config))
    if bundle.prompt_embeds is not None:
        tensors["prompt.embeds"] = cast(bundle.prompt_embeds)
        tensors["prompt.pooled"] = cast(bundle.prompt_pooled)
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a saved model should be like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _split(shapes: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def load_bundle(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Bundle:
    """Load and validate a bundle file. ``dtype`` casts floating tensors (default: as stored)."""
    path = Path(path)
    metadata, header = read_header(path)
    if not is_bundle(metadata):
        hint = ""
        if any(k.startswith("transformer_blocks.") for k in header):
            hint = (" It looks like a bare transformer state dict (the official release's "
                    f"{OFFICIAL_WEIGHTS}); pass the folder that holds transformer/config.json, "
                    "or make a bundle with `smfsr convert`.")
        raise CheckpointError(f"{path} is a safetensors file but not an SMFSR bundle (no smfsr metadata).{hint}")
    version = int(metadata["smfsr_format"])
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses bundle format {version}; this SMFSR reads up to {FORMAT_VERSION}. Upgrade SMFSR.")

    shapes = {k: v[0] for k, v in header.items()}
    t_config = _meta_json(metadata, "smfsr_transformer_config", path)
    if t_config is None:
        raise CheckpointError(f"{path}: bundle metadata lacks the transformer config; re-export the file")
    v_config = _meta_json(metadata, "smfsr_vae_config", path)
    defaults = PipelineDefaults.from_dict(_meta_json(metadata, "smfsr_pipeline", path) or {})

    def make_transformer() -> SMFSRTransformer:
        return build_transformer(t_config, path)

    def make_vae() -> AutoencoderKL | SpaceToDepthVAE:
        return build_vae(v_config, path)

    expected = {f"transformer.{k}": s for k, s in expected_shapes(make_transformer).items()}
    if v_config is not None:
        expected.update({f"vae.{k}": s for k, s in expected_shapes(make_vae).items()})
    prompt_keys = {k: shapes[k] for k in ("prompt.embeds", "prompt.pooled") if k in shapes}
    expected.update(prompt_keys)
    optional = re.compile(r"^transformer\.(" + OPTIONAL_TRANSFORMER_KEYS.pattern.strip("^$") + r")$")
    check_state(expected, shapes, what="SMFSR bundle", path=path, optional=optional)
    if len(prompt_keys) == 1:
        raise CheckpointError(f"{path} has only one of prompt.embeds / prompt.pooled; it needs both or neither")

    tensors = load_file(str(path), device="cpu")
    transformer = _load_into(make_transformer, _split(tensors, "transformer."), _fill_transformer)
    vae = _load_into(make_vae, _split(tensors, "vae."), _fill_nothing) if v_config is not None else None
    bundle = Bundle(
        transformer=transformer, vae=vae,
        prompt_embeds=tensors.get("prompt.embeds"), prompt_pooled=tensors.get("prompt.pooled"),
        defaults=defaults, license=metadata.get("smfsr_license", ""),
        provenance=metadata.get("smfsr_provenance", ""), source=str(path),
    )
    return to_device(bundle, device, dtype)


def to_device(bundle: Bundle, device: str | torch.device, dtype: torch.dtype | None) -> Bundle:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules these models lack
    for module in (bundle.transformer, bundle.vae):
        if module is not None:
            torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    bundle.prompt_embeds, bundle.prompt_pooled = move(bundle.prompt_embeds), move(bundle.prompt_pooled)
    return bundle


# --------------------------------------------------------------------------------------------
# importers: the official release layout and diffusers VAEs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the config ({e})") from None


def _find_weights(folder: Path) -> Path:
    weights = folder / OFFICIAL_WEIGHTS
    if weights.exists():
        return weights
    pickled = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        refuse_pickle(pickled[0])
    shards = sorted(folder.glob("*.safetensors.index.json"))
    if shards:
        raise CheckpointError(f"{folder} holds a sharded checkpoint ({shards[0].name}); merge the shards into {OFFICIAL_WEIGHTS} first")
    raise CheckpointError(f"{folder}: expected the weights file {weights.name} beside config.json")


def import_official_transformer(folder: str | os.PathLike) -> SMFSRTransformer:
    """An official SMFSR (or DiT4SR teacher) ``transformer/`` folder: config.json + weights.

    SMFSR vs DiT4SR is recognised from the keys (``time_text_embed_interval.*``), as is whether the
    file carries the official dead modules; behaviour switches are set to the official ones.
    """
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(
            f"{folder}: no config.json. Expected the official layout <dir>/transformer/config.json "
            f"+ <dir>/transformer/{OFFICIAL_WEIGHTS} (as downloaded from the SMFSR release)."
        )
    weights = _find_weights(folder)
    _, header = read_header(weights)
    shapes = {k: v[0] for k, v in header.items()}
    interval = any(k.startswith("time_text_embed_interval.") for k in shapes)
    config = {
        **_read_json(config_path),
        "interval_embedding": interval,
        "time_scale": 1.0 if interval else 1000.0,
        "lr_key_quirk": True,
        "control_scale": 1.2,
        "official_dead_modules": True,
    }
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = tuple(config["dual_attention_layers"])

    def make() -> SMFSRTransformer:
        return build_transformer(config, config_path)

    what = "official SMFSR transformer" if interval else "DiT4SR teacher transformer"
    check_state(expected_shapes(make), shapes, what=what, path=weights, optional=OPTIONAL_TRANSFORMER_KEYS)
    return _load_into(make, load_file(str(weights)), _fill_transformer)


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """An AutoencoderKL config from a diffusers-keyed VAE state dict (SD / SDXL / SD3 families)."""
    if "decoder.conv_in.weight" not in shapes:
        if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in shapes):
            raise CheckpointError(
                "this VAE uses the original (ldm) key names, not diffusers'. Use a diffusers VAE folder "
                "(config.json + diffusion_pytorch_model.safetensors), e.g. the vae/ folder of SD3.5-medium."
            )
        raise CheckpointError("this file does not look like a VAE (no decoder.conv_in.weight)")
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    latent = shapes["decoder.conv_in.weight"][1]
    blocks = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels)
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    scale, shift = (1.5305, 0.0609) if latent == 16 else (0.18215, 0.0)
    return dict(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=blocks,
        layers_per_block=layers, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), scaling_factor=scale, shift_factor=shift,
        use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
    )


def import_vae(path: str | os.PathLike) -> AutoencoderKL:
    """A diffusers VAE: a folder (``vae/`` or one holding config.json + weights) or a single file."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        weights = _find_weights(folder)
        config = _read_json(folder / "config.json") if (folder / "config.json").exists() else None
    else:
        weights, config = path, None
    _, header = read_header(weights)
    shapes = {k: v[0] for k, v in header.items()}
    if config is None:
        try:
            config = infer_vae_config(shapes)
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e}") from None
    else:
        config = {k: v for k, v in config.items() if k in inspect.signature(AutoencoderKL.__init__).parameters}

    def make() -> AutoencoderKL:
        return build_vae(config, weights)

    check_state(expected_shapes(make), shapes, what="diffusers AutoencoderKL", path=weights)
    return _load_into(make, load_file(str(weights)), _fill_nothing)


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Bundle:
    """Whatever a user points at: a bundle file, or an official folder (transformer/ [+ vae/])."""
    path = Path(path)
    if path.is_dir():
        transformer = import_official_transformer(path)
        vae = import_vae(path) if (path / "vae").is_dir() else None
        embeds = _official_prompt(path)
        defaults = PipelineDefaults()
        if vae is not None:
            defaults.vae_scaling_factor = float(vae.config.scaling_factor)
            defaults.vae_shift_factor = float(vae.config.shift_factor or 0.0)
        bundle = Bundle(transformer=transformer, vae=vae, prompt_embeds=embeds[0], prompt_pooled=embeds[1],
                        defaults=defaults, source=str(path))
        return to_device(bundle, device, dtype)
    return load_bundle(path, device=device, dtype=dtype)


def _official_prompt(folder: Path) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An optional ``prompt.safetensors`` beside the official folders with ``embeds`` and ``pooled``."""
    file = folder / "prompt.safetensors"
    if not file.exists():
        return None, None
    return read_prompt_file(file)


def read_prompt_file(file: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A safetensors file with ``embeds`` (1, L, D) and ``pooled`` (1, P): a precomputed prompt."""
    file = Path(file)
    _, header = read_header(file)
    missing = {"embeds", "pooled"} - set(header)
    if missing:
        raise CheckpointError(f"{file}: a prompt file needs tensors 'embeds' (1, L, D) and 'pooled' (1, P); missing {sorted(missing)}")
    tensors = load_file(str(file))
    embeds, pooled = tensors["embeds"], tensors["pooled"]
    if embeds.ndim == 2:
        embeds = embeds[None]
    if pooled.ndim == 1:
        pooled = pooled[None]
    return embeds, pooled


def random_bundle(transformer_preset: str = "tiny", vae_preset: str | None = None, *, seed: int = 0,
                  prompt_tokens: int = 3, **defaults: Any) -> Bundle:
    """A bundle with randomly initialised networks, for benchmarks and tests (speed does not depend
    on the weights). Not a model: its output is noise-like. The VAE preset defaults to the one
    with the network's latent channels."""
    from .models.presets import VAE_PRESETS, transformer_config, vae_config

    torch.manual_seed(seed)
    transformer = build_transformer(transformer_config(transformer_preset)).eval()
    if vae_preset is None:
        channels = transformer.config.in_channels
        vae_preset = next(name for name, cfg in VAE_PRESETS.items() if cfg["latent_channels"] == channels)
    vae_cfg = vae_config(vae_preset)
    vae = build_vae(vae_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    settings = dict(vae_scaling_factor=vae_cfg["scaling_factor"], vae_shift_factor=vae_cfg["shift_factor"])
    settings.update(defaults)
    return Bundle(
        transformer=transformer, vae=vae,
        prompt_embeds=torch.randn(1, prompt_tokens, c.joint_attention_dim, generator=g),
        prompt_pooled=torch.randn(1, c.pooled_projection_dim, generator=g),
        defaults=PipelineDefaults(**settings), license="none (random weights)", provenance="random_bundle",
    )


def describe(path: str | os.PathLike) -> str:
    """A human summary of a model file or folder, read from headers only (for ``smfsr info``)."""
    path = Path(path)
    if path.is_dir():
        bundle = load_model(path)
        lines = [f"{path}: official folder layout"]
        lines += _describe_parts(dict(bundle.transformer.config), bundle.defaults,
                                 dict(bundle.vae.config) if bundle.vae is not None else None,
                                 {f"transformer.{k}": (tuple(v.shape), str(v.dtype)) for k, v in bundle.transformer.state_dict().items()},
                                 bundle.prompt_embeds is not None)
        return "\n".join(lines)
    metadata, header = read_header(path)
    if not is_bundle(metadata):
        kind = "a bare transformer state dict" if any(k.startswith("transformer_blocks.") for k in header) else "not an SMFSR bundle"
        return f"{path}: safetensors, {len(header)} tensors, {kind}"
    t_config = _meta_json(metadata, "smfsr_transformer_config", path)
    v_config = _meta_json(metadata, "smfsr_vae_config", path)
    defaults = PipelineDefaults.from_dict(_meta_json(metadata, "smfsr_pipeline", path) or {})
    lines = [f"{path}: SMFSR bundle, format {metadata['smfsr_format']}, {path.stat().st_size / 2**20:.1f} MiB"]
    lines += _describe_parts(t_config, defaults, v_config, header, "prompt.embeds" in header)
    if metadata.get("smfsr_license"):
        lines.append(f"  license:     {metadata['smfsr_license']}")
    if metadata.get("smfsr_provenance"):
        lines.append(f"  provenance:  {metadata['smfsr_provenance']}")
    return "\n".join(lines)


def _describe_parts(t_config: dict, defaults: PipelineDefaults, v_config: dict | None,
                    header: dict[str, tuple[tuple[int, ...], str]], has_prompt: bool) -> list[str]:
    def count(prefix: str) -> int:
        total = 0
        for k, (shape, _) in header.items():
            if k.startswith(prefix) and k != "transformer.pos_embed.pos_embed":
                n = 1
                for d in shape:
                    n *= d
                total += n
        return total

    dtypes = sorted({str(d) for k, (_, d) in header.items() if k.startswith("transformer.")})
    kind = "SMFSR average-velocity (mean-flow) net" if t_config.get("interval_embedding", True) else "DiT4SR-style flow teacher"
    width = t_config["num_attention_heads"] * t_config["attention_head_dim"]
    lines = [
        f"  transformer: {kind}; {t_config['num_layers']} layers, width {width}, "
        f"{t_config['in_channels']} latent channels; {count('transformer.') / 1e6:.1f} M parameters; dtype {', '.join(dtypes)}",
        f"  behaviour:   time scale {t_config.get('time_scale')}, LR-key quirk {t_config.get('lr_key_quirk')}, "
        f"control scale {t_config.get('control_scale')}",
    ]
    if is_space_to_depth(v_config):
        lines.append(f"  vae:         lossless space-to-depth x{v_config['factor']}, {v_config['latent_channels']} channels, no parameters")
    elif v_config is not None:
        factor = 2 ** (len(v_config["block_out_channels"]) - 1)
        lines.append(f"  vae:         AutoencoderKL x{factor}, {v_config['latent_channels']} channels, {count('vae.') / 1e6:.1f} M parameters")
    else:
        lines.append("  vae:         none (supply one: the host's VAE or --vae)")
    lines.append(f"  prompt:      {'stored embedding' if has_prompt else 'none stored'}{f' ({defaults.prompt!r})' if defaults.prompt else ''}")
    lines.append(
        f"  defaults:    x{defaults.upscale}, {defaults.steps} step(s), VAE scale {defaults.vae_scaling_factor} shift "
        f"{defaults.vae_shift_factor}, latent tile {defaults.latent_tile}/{defaults.latent_overlap}, colour fix {defaults.color_fix}"
    )
    return lines
