"""Images in and out: PIL and files <-> the core's (3, H, W) float tensors in [0, 1].

Every mode PIL opens is accepted. Transparency is kept: the alpha channel is split off, upscaled
on its own with bicubic interpolation (the network only sees RGB) and put back. A grayscale input
gives a grayscale output (the network sees it as RGB). 16-bit grayscale is read at full precision;
16-bit colour PNGs reach PIL as 8 bits per channel, and the caller is told. Outputs are 8-bit.
torch is imported only by the functions that make tensors, so listing files stays light.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

if TYPE_CHECKING:
    import torch

MIN_SIDE = 8
MAX_INPUT_PIXELS = 8192 * 8192  # larger inputs are almost certainly a mistake at x4 (a 1 GP output)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".tga", ".ppm", ".pgm"}


@dataclass
class RGBAlpha:
    """An image as the core sees it, plus what was split off on the way in."""

    rgb: torch.Tensor  # (3, H, W) float32 in [0, 1]
    alpha: torch.Tensor | None = None  # (1, H, W) float32 in [0, 1], None when opaque
    notes: list[str] = field(default_factory=list)  # what was converted, for the user
    gray: bool = False  # a grayscale input: the result is written as grayscale too


def check_size(width: int, height: int, name: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> None:
    if width == 0 or height == 0:
        raise ImageError(f"{name} is empty ({width}x{height} pixels)")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name} is {width}x{height} pixels; SMFSR needs at least {MIN_SIDE} pixels on each side")
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {_pixels(width * height)}, over the input limit of {_pixels(max_pixels)}. "
            "Split it into parts, downscale it, or raise the limit (--max-pixels) if you really mean it."
        )


def _pixels(n: int) -> str:
    return f"{n / 1e6:.0f} MP" if n >= 10**6 else f"{n:,} pixels"


def open_image(path: str | os.PathLike, max_pixels: int = MAX_INPUT_PIXELS, *, decode: bool = True) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a clear ImageError.
    ``decode=False`` reads the header only: a fast check of a file before any work starts."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            check_size(*image.size, name=str(path), max_pixels=max_pixels)
            if not decode:
                return image
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file that can be read (PNG, JPEG, WebP, TIFF, BMP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path} is too large to decode safely; check the file or downscale it") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path} could not be decoded ({e}); the file may be truncated or damaged") from None
    note = _colour_depth_note(path)
    image = ImageOps.exif_transpose(image)  # honour camera orientation, as viewers do
    if note:
        image.info["smfsr_note"] = note
    return image


def _colour_depth_note(path: Path) -> str | None:
    """A 16-bit colour PNG (IHDR bit depth 16, colour type 2 or 6): PIL decodes it to 8 bits."""
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6):
        return "16-bit colour PNG: read at 8 bits per channel (PIL cannot decode 16-bit colour); the output is 8-bit"
    return None


def _high_depth_gray(image: Image.Image) -> "torch.Tensor":
    import torch

    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 1.0 if array.max(initial=0) <= 1.0 else 255.0 if array.max() <= 255 else 65535.0
    else:
        scale = 65535.0
    return torch.from_numpy(np.clip(array / scale, 0, 1)).float()[None].expand(3, -1, -1).clone()


GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def from_pil(image: Image.Image) -> RGBAlpha:
    """Any PIL mode -> RGB (+ alpha), with notes on what was done."""
    import torch

    notes: list[str] = [image.info["smfsr_note"]] if "smfsr_note" in image.info else []
    check_size(*image.size)
    mode = image.mode
    gray = mode in GRAY_MODES
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        notes.append(f"{mode} (high bit depth grayscale) was read at full precision; the output is 8-bit grayscale")
        return RGBAlpha(_high_depth_gray(image), None, notes, gray=True)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        array = torch.from_numpy(np.asarray(rgba, dtype=np.float32) / 255.0).permute(2, 0, 1)
        rgb, alpha = array[:3].contiguous(), array[3:].contiguous()
        if bool((alpha >= 1.0).all()):
            notes.append(f"{mode}: the alpha channel is fully opaque and was dropped")
            alpha = None
        else:
            notes.append(f"{mode}: the alpha channel was upscaled separately (bicubic) and kept")
        return RGBAlpha(rgb, alpha, notes, gray=gray)
    if mode not in ("RGB", "L"):
        notes.append(f"{mode} was converted to RGB")
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return RGBAlpha(rgb, None, notes, gray=gray)


def to_pil(rgb: "torch.Tensor", alpha: "torch.Tensor | None" = None, *, gray: bool = False) -> Image.Image:
    """(3, H, W) [+ (1, H, W)] in [0, 1] -> 8-bit PIL image (rounded, not truncated): RGB or RGBA,
    or with ``gray`` L or LA (ITU-R 601 luma, as PIL converts)."""
    import torch

    channels = rgb if alpha is None else torch.cat([rgb, alpha], 0)
    array = (channels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(array, "RGB" if alpha is None else "RGBA")
    if gray:
        image = image.convert("L" if alpha is None else "LA")
    return image


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
