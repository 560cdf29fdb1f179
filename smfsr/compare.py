"""A side-by-side of an upscale: the input resized with bicubic | the result, each labelled, so the
difference SMFSR makes is seen at a glance (``smfsr upscale --compare``)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

GAP = 8  # px of white between the panels


def side_by_side(source: Image.Image, result: Image.Image) -> Image.Image:
    """(input resized to the result's size with bicubic | result), RGB, labelled in their corners."""
    result = result.convert("RGB")
    bicubic = source.convert("RGB").resize(result.size, Image.Resampling.BICUBIC)
    width, height = result.size
    canvas = Image.new("RGB", (2 * width + GAP, height), "white")
    canvas.paste(bicubic, (0, 0))
    canvas.paste(result, (width + GAP, 0))
    draw = ImageDraw.Draw(canvas)
    try:  # Pillow >= 10.1: a scalable font, readable on a large output
        font = ImageFont.load_default(size=max(11, height // 40))
    except TypeError:
        font = ImageFont.load_default()
    for x, label in ((0, "bicubic"), (width + GAP, "SMFSR")):
        left, top, right, bottom = draw.textbbox((x + 6, 6), label, font=font)
        draw.rectangle((left - 4, top - 3, right + 4, bottom + 3), fill="black")
        draw.text((x + 6, 6), label, fill="white", font=font)
    return canvas


def compare_path(target):
    """Where the side-by-side of ``target`` goes: beside it, ``<name>_compare.png``."""
    return target.with_name(f"{target.stem}_compare.png")
