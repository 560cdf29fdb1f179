"""fp8 weights on this CPU, side by side (issue 17):

(a) the SD3.5-medium-sized SMFSR transformer with random weights built directly in the target dtype,
    stored as a bf16 bundle and as an fp8 one: file size, peak RSS while loading (each in its own
    process), load time, one forward on a 64x64 latent (512 px) in bf16, and how far fp8's output is
    from bf16's;
(b) the shipped models in fp8 (quantised on load) against fp32: PSNR between the outputs on the
    held-out crops, and the scale granularity measured (per output channel vs per tensor).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .harness import Table, in_child, peak_rss_bytes, rss_bytes

LATENT = 64  # 64x64 latent = 512x512 output


def _make(path: str, fp8: bool) -> dict:
    """Random SD3.5-sized weights built in bf16 (never fp32: 11 GB), optionally fp8, saved as a bundle."""
    from smfsr.checkpoint import Bundle, save_bundle
    from smfsr.checkpoint.build import build_transformer, fill_transformer
    from smfsr.models.presets import transformer_config
    from smfsr.quant import to_fp8

    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_transformer(transformer_config("sd35-medium"))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
            else:
                p.copy_(torch.ones_like(p) if "norm" in name else torch.zeros_like(p))
        # the one buffer is the sin-cos position table: the standard one, which bundles leave out
        model.pos_embed.pos_embed.copy_(fill_transformer("pos_embed.pos_embed", model))
    if fp8:
        to_fp8(model)
    c = model.config
    bundle = Bundle(transformer=model, prompt_embeds=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                    prompt_pooled=torch.randn(1, c.pooled_projection_dim, generator=g), license="random weights")
    save_bundle(path, bundle, overwrite=True)
    return {"bytes": Path(path).stat().st_size}


def _load_and_run(path: str, out: str) -> dict:
    from smfsr.checkpoint import load_bundle

    base = rss_bytes()
    start = time.perf_counter()
    bundle = load_bundle(path, dtype=None)
    load_seconds = time.perf_counter() - start
    load_peak = peak_rss_bytes() - base
    model = torch.nn.Module.to(bundle.transformer, dtype=torch.bfloat16)  # bf16 compute; fp8 data stays
    c = model.config
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, c.in_channels, LATENT, LATENT, generator=g, dtype=torch.bfloat16)
    lr = torch.randn(1, c.in_channels, LATENT, LATENT, generator=g, dtype=torch.bfloat16)
    embeds, pooled = bundle.prompt_embeds.to(torch.bfloat16), bundle.prompt_pooled.to(torch.bfloat16)
    t, r = torch.tensor([1.0]), torch.tensor([0.0])
    with torch.no_grad():
        start = time.perf_counter()
        u = model(z, lr, embeds, pooled, t, r)
        forward = time.perf_counter() - start
    from safetensors.torch import save_file

    save_file({"u": u.float().contiguous()}, out)
    return {"load_s": load_seconds, "load_peak": load_peak, "forward_s": forward, "peak": peak_rss_bytes() - base}


def _bytes_by_dtype(path: str) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """From the safetensors header alone: bytes per dtype, and the largest tensors not in fp8."""
    import json
    import struct

    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    totals: dict[str, int] = {}
    others = []
    for name, entry in header.items():
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        totals[entry["dtype"]] = totals.get(entry["dtype"], 0) + size
        if entry["dtype"] != "F8_E4M3":
            others.append((size, name))
    return totals, sorted(others, reverse=True)[:4]


def sd35_table() -> Table:
    table = Table("fp8 vs bf16: the SD3.5-medium-sized transformer (random weights) on this CPU",
                  ["weights", "file", "peak RSS loading", "peak RSS load + forward", "peak / file", "load (s)",
                   "forward 64x64 latent (s)", "output vs bf16"])
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        runs, outputs = {}, {}
        for label, fp8 in (("bf16", False), ("fp8 e4m3fn, scale per channel", True)):
            name = "fp8" if fp8 else "bf16"
            path, out = f"{tmp}/{name}.safetensors", f"{tmp}/{name}-output.safetensors"
            made = in_child(_make, path, fp8)
            runs[label] = {**made, **in_child(_load_and_run, path, out)}
            outputs[label] = load_file(out)["u"] if Path(out).exists() else None
            if fp8 and Path(path).exists():
                totals, largest = _bytes_by_dtype(path)
                table.notes.append("fp8 file by dtype: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in
                                   sorted(totals.items(), key=lambda kv: -kv[1])) + "; largest tensors kept "
                                   "in higher precision: " + ", ".join(f"{n} ({b / 2**20:.0f} MiB)" for b, n in largest))
            Path(path).unlink(missing_ok=True)
        ref = outputs["bf16"]
        for label, r in runs.items():
            if "error" in r or outputs[label] is None:
                table.add(label, r.get("error", "no output"), "", "", "", "", "", "")
                continue
            rel = ((outputs[label] - ref).norm() / ref.norm()).item()
            table.add(label, f"{r['bytes'] / 2**30:.2f} GiB", f"{r['load_peak'] / 2**30:.2f} GiB",
                      f"{r['peak'] / 2**30:.2f} GiB", f"{r['peak'] / r['bytes']:.2f}", f"{r['load_s']:.1f}",
                      f"{r['forward_s']:.1f}",
                      "reference" if label == "bf16" else f"relative L2 {rel:.4f}")
    table.notes.append("Each row loads and runs in its own process; peak RSS over that process's start. The "
                       "bundle is read through a memory map, so loading alone touches little; the forward reads "
                       "every weight, so its peak is the one that counts (peak / file). Compute in "
                       "bf16; the fp8 layers are upcast one at a time as they run (so the forward also pays the "
                       "dequantisation on this CPU). Targets: fp8 file <= 3.0 GB, peak <= 1.3x its size.")
    return table


def small_table(mode: str) -> Table:
    from smfsr.checkpoint import load_model
    from smfsr.checkpoint.default_model import REPO_MODELS
    from smfsr.options import UpscaleOptions, VAETiling
    from smfsr.pipeline import SMFSRUpscaler
    from smfsr.quant import to_fp8

    from .eval_model import held_out

    heldout = Path(__file__).resolve().parents[1] / "tests" / "data" / "heldout"
    _, lr = held_out(heldout, 128 if mode == "quick" else 256, "bicubic")
    table = Table("fp8 vs fp32: the shipped models on the held-out crops (x4, bicubic inputs)",
                  ["model", "fp8 scale", "PSNR fp8 vs fp32 output (dB)", "target"])
    options = UpscaleOptions(vae_tiling=VAETiling.off())
    for path in sorted(REPO_MODELS.glob("*.safetensors")):
        reference = SMFSRUpscaler(load_model(path, dtype=torch.float32))(lr, options, seeds=list(range(len(lr))))
        for granularity in ("channel", "tensor"):
            bundle = load_model(path, dtype=torch.float32)
            to_fp8(bundle.transformer, granularity)
            out = SMFSRUpscaler(bundle)(lr, options, seeds=list(range(len(lr))))
            value = (10 * torch.log10(1 / (out - reference).pow(2).mean())).item()
            table.add(path.stem, granularity, f"{value:.1f}", ">= 40")
    return table


def run(mode: str = "default") -> list[Table]:
    tables = [small_table(mode)]
    if mode != "quick":
        tables.insert(0, sd35_table())
    return tables

