"""Photos for the default model, from Debian packages (no other download is possible offline).

    python smfsr_trainer/recipes/default/prepare_data.py --out data/photos

Downloads four wallpaper packages with ``apt-get download``, unpacks them with ``dpkg-deb -x``,
downscales each photo 2-4x (long side about 1024 px, antialiased: it removes the JPEG artefacts the
wallpapers carry) and writes PNGs to ``train/`` and ``val/``. The validation photos are a fixed
list, never used for training. ``SOURCES.md`` records every file's package and licence.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from PIL import Image

PACKAGES = {
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds/*.jpg", "CC-BY-4.0 / CC-BY-SA-4.0 (see the package's copyright file)"),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds/*.jpg", "CC-BY-SA-3.0 (see the package's copyright file)"),
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature/*.jpg", "GPL-2+ (see the package's copyright file)"),
    "plasma-workspace-wallpapers": ("usr/share/wallpapers/*/contents/images/2560x1600.jpg",
                                    "LGPL-3 / GPL-2+ / CC-BY-SA-4.0 (see the package's copyright file)"),
}
# Held out for evaluation: photos of different kinds (landscape, macro, animal, water, texture).
VALIDATION = {"Kleiber_by_Lukas_Baubkus", "Fossa_by_Jasper_Roks", "Storm", "YellowFlower", "BytheWater",
              "sunset_by_Aitzol_Berasategi", "Wood"}
# Not photographs (paintings, patterns, renders): left out.
EXCLUDE = {"Painting-Colors_by__herobrine7gamer", "analogpattern_by_Peter_Nerlich", "Infinite-Sea_by_Aury88", "Grey"}


def name_of(path: Path) -> str:
    if path.name == "2560x1600.jpg":  # plasma: the theme folder names the photo
        return path.parents[2].name
    return path.stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/photos")
    parser.add_argument("--long-side", type=int, default=1024, help="target long side after the 2-4x downscale")
    args = parser.parse_args()
    out = Path(args.out)
    debs, extract = out / "debs", out / "extract"
    debs.mkdir(parents=True, exist_ok=True)
    for sub in ("train", "val"):
        (out / sub).mkdir(exist_ok=True)
    sources = ["| file | set | package | licence |", "|---|---|---|---|"]
    for package, (pattern, licence) in PACKAGES.items():
        if not list(debs.glob(f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        deb = next(debs.glob(f"{package}_*.deb"))
        target = extract / package
        if not target.exists():
            target.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        for src in sorted(target.glob(pattern)):
            name = name_of(src)
            if name in EXCLUDE:
                continue
            split = "val" if name in VALIDATION else "train"
            with Image.open(src) as img:
                img = img.convert("RGB")
                factor = min(4, max(2, round(max(img.size) / args.long_side)))
                img = img.resize((img.width // factor, img.height // factor), Image.Resampling.LANCZOS)
                img.save(out / split / f"{name}.png")
            sources.append(f"| {split}/{name}.png | {split} | {package} ({deb.name}) | {licence} |")
            print(f"{split}/{name}.png  {img.width}x{img.height}  (/{factor})")
    (out / "SOURCES.md").write_text("# Photo sources\n\n" + "\n".join(sources) + "\n")


if __name__ == "__main__":
    main()
