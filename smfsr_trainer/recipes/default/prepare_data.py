"""Photos for the default model, from Debian packages (no other download is possible offline).

    python smfsr_trainer/recipes/default/prepare_data.py --out data/photos

Downloads four wallpaper packages with ``apt-get download``, unpacks them with ``dpkg-deb -x``,
downscales each photo 2-4x (long side about 1024 px, antialiased: it removes the JPEG artefacts the
wallpapers carry) and writes PNGs to ``train/`` and ``val/``. The validation photos are a fixed
list, never used for training. ``SOURCES.md`` records every file's package, author and licence
(from the package's copyright file, or the KDE wallpaper's metadata.json).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
from pathlib import Path

from PIL import Image

PACKAGES = {  # package: the photos it installs
    "lomiri-wallpapers-16.04": "usr/share/backgrounds/*.jpg",
    "lomiri-wallpapers-20.04": "usr/share/backgrounds/*.jpg",
    "mate-backgrounds": "usr/share/backgrounds/mate/nature/*.jpg",
    "plasma-workspace-wallpapers": "usr/share/wallpapers/*/contents/images/2560x1600.jpg",
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


def dep5_stanzas(copyright_file: Path) -> list[dict[str, str]]:
    """The ``Files`` stanzas of a machine-readable Debian copyright file. A field's continuation
    lines (indented) extend ``Files``; other fields keep their first line."""
    stanzas = []
    for block in copyright_file.read_text(errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1].isspace() and key == "Files":
                fields[key] += " " + line.strip()
            elif ":" in line and not line[:1].isspace():
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Files" in fields:
            stanzas.append(fields)
    return stanzas


def attribution(root: Path, package: str, src: Path) -> tuple[str, str]:
    """(author, licence) of one photo: KDE wallpapers carry metadata.json; the others are found in
    the package's copyright file (the last matching ``Files`` stanza wins, as DEP-5 says)."""
    metadata = src.parents[2] / "metadata.json"
    if metadata.is_file():
        plugin = json.loads(metadata.read_text())["KPlugin"]
        return ", ".join(a["Name"] for a in plugin.get("Authors", [])), plugin.get("License", "?")
    author, licence = "?", "?"
    for stanza in dep5_stanzas(root / "usr/share/doc" / package / "copyright"):
        patterns = [p for p in stanza["Files"].split() if not p.startswith("debian/")]
        if any(fnmatch.fnmatch(src.name, p.rsplit("/", 1)[-1]) for p in patterns):
            author, licence = stanza.get("Copyright", "?"), stanza.get("License", "?")
    return author, licence


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
    sources = ["| file | set | package | author (copyright) | licence |", "|---|---|---|---|---|"]
    for package, pattern in PACKAGES.items():
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
            author, licence = attribution(target, package, src)
            sources.append(f"| {split}/{name}.png | {split} | {deb.name} | {author} | {licence} |")
            print(f"{split}/{name}.png  {img.width}x{img.height}  (/{factor})")
    (out / "SOURCES.md").write_text("# Photo sources\n\n" + "\n".join(sources) + "\n")


if __name__ == "__main__":
    main()
