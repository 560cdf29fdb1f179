"""The ST-LPIPS networks as safetensors, from the PyPI wheel ``stlpips-pytorch`` (nothing to install).

    pip download --no-deps stlpips-pytorch==0.0.2 -d weights/
    python smfsr_trainer/recipes/quality/convert_stlpips.py weights/stlpips_pytorch-0.0.2-py3-none-any.whl weights/

A wheel is a zip: the two .pth files are read from it with ``torch.load(weights_only=True)``, the
tensor-only loader that cannot run code, once, here; the trainer and the benchmark read only the
safetensors this writes: ``stlpips-vgg16.safetensors`` (VGG-16 features with anti-aliased pooling +
LPIPS's per-channel weights, the refine stage's backbone and perceptual loss) and
``stlpips-alexnet.safetensors`` (the AlexNet variant, the benchmark's perceptual distance).
Weights: BSD-2-Clause, (c) 2022 Abhijay Ghildyal, Feng Liu ("Shift-tolerant Perceptual Similarity
Metric", ECCV 2022); the VGG-16 / AlexNet trunks were trained on ImageNet by them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

FILES = {"vgg16-st": "stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth",
         "alexnet-st": "stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth"}
OUTPUT = {"vgg16-st": "stlpips-vgg16.safetensors", "alexnet-st": "stlpips-alexnet.safetensors"}
LICENSE = ("BSD-2-Clause. Copyright (c) 2022, Abhijay Ghildyal, Feng Liu (ST-LPIPS, ECCV 2022, "
           "https://github.com/abhijay9/ShiftTolerant-LPIPS); converted from the PyPI wheel stlpips-pytorch")


def rename(key: str) -> str | None:
    """The published names -> ours: net.sliceK.I.* -> layers.I.*, linK.model.1.weight -> lin.K.weight,
    scaling_layer.{shift,scale} -> {shift,scale}."""
    if m := re.fullmatch(r"net\.slice\d+\.(\d+)\.(weight|bias|filt)", key):
        return f"layers.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"lin(\d+)\.model\.1\.weight", key):
        return f"lin.{m[1]}.weight"
    if m := re.fullmatch(r"scaling_layer\.(shift|scale)", key):
        return m[1]
    return None


def convert(wheel: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(wheel) as archive:
        version = next((n.split("-")[1] for n in archive.namelist() if n.endswith(".dist-info/METADATA")), "?")
        for arch, member in FILES.items():
            data = archive.read(member)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            tensors = {rename(k): v.contiguous() for k, v in state.items() if rename(k)}
            unknown = sorted(k for k in state if rename(k) is None)
            if unknown:
                raise SystemExit(f"{member}: tensors this converter does not know: {unknown}")
            path = out / OUTPUT[arch]
            save_file(tensors, str(path), metadata={
                "smfsr_feature_net": arch, "license": LICENSE,
                "source": f"stlpips-pytorch {version} wheel, {member}, sha256 {hashlib.sha256(data).hexdigest()}"})
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    for path in convert(args.wheel, args.out):
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
