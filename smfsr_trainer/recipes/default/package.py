"""Turn a recipe's last export into a shipped model.

    python smfsr_trainer/recipes/default/package.py runs/default/refine.safetensors models/smfsr-small-x4.safetensors
    python smfsr_trainer/recipes/default/package.py runs/quality/refine.safetensors models/smfsr-small-x4-q.safetensors --recipe quality

Stores the weights in fp16 (half the size; the pipeline computes in fp32 on CPU), and writes the
licence and a provenance line that names the recipe; the export's defaults (a one-step model says
so) are kept, ``--max-steps 1`` marks a model one-step only. Refuses to replace an existing file
unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # run from a checkout without installing

from smfsr.checkpoint import load_bundle, save_bundle  # noqa: E402

RECIPES = {
    "default": "SMFSR fidelity model, recipe smfsr_trainer/recipes/default (flow -> meanflow -> refine, mixed then "
               "clean inputs)",
    "quality": "SMFSR quality model, recipe smfsr_trainer/recipes/quality (the fidelity model refined with a GAN on "
               "ST-LPIPS VGG-16 features + LPIPS)",
}
LICENCE = ("Apache-2.0 (weights trained by the SMFSR project's trainer on Debian wallpaper photos; "
           "their authors and licences: models/README.md)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the recipe's export (refine.safetensors)")
    parser.add_argument("target", help="where the default model goes (models/smfsr-small-x4.safetensors)")
    parser.add_argument("--recipe", choices=list(RECIPES), default="default")
    parser.add_argument("--max-steps", type=int, help="record the most steps the model runs well with (1: one-step only)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    bundle = load_bundle(args.source)
    if not bundle.transformer.is_average_velocity:
        raise SystemExit(f"{args.source} is a flow teacher; package the one-step student (refine or meanflow export)")
    bundle.license = LICENCE
    bundle.provenance = f"{RECIPES[args.recipe]}; {bundle.provenance}"
    if args.max_steps is not None:
        bundle.defaults.max_steps = args.max_steps
    path = save_bundle(args.target, bundle, overwrite=args.overwrite, dtype=torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
