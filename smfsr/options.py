"""Per-call settings, one path for every door: what a user asks for (``UpscaleOptions``, where
``None`` means "the model's default") and what then runs (``Settings``, every value concrete).

Doors build ``UpscaleOptions`` (GUI widgets through :meth:`UpscaleOptions.from_widgets`, where 0 and
"auto" mean the model's default), the pipeline resolves them against the model's stored defaults
once, and every stage reads the resulting ``Settings``. Nothing here imports torch, so a door can
check a user's values before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import SMFSRError

COLOR_FIXES = ("adain", "wavelet", "none")
MAX_SCALE = 16.0


@dataclass(frozen=True)
class Range:
    """A numeric setting's range as every door offers it (0 means the model's default)."""

    minimum: float
    maximum: float
    step: float


# What the doors offer, defined once: ComfyUI's widgets, A1111's settings, the app's sliders and
# the CLI's choices render these (tests/test_widgets.py compares them).
STEPS = Range(0, 50, 1)  # a flow teacher takes many Euler steps; a one-step model refuses more than 1, saying why
LATENT_TILE = Range(0, 512, 2)  # latent cells, a multiple of the model's patch size
LATENT_TILE_OVERLAP = Range(0, 256, 2)
VAE_TILE = Range(0, 1024, 8)  # latent cells; 0 = automatic
SCALE = Range(0, MAX_SCALE, 0.25)  # 0 = the model's factor
BLOCK_SWAP = Range(-1, 64, 1)  # -1 = from free VRAM
MAX_SEED = 2**64 - 1
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
COLOR_FIX_CHOICES = ("auto", *COLOR_FIXES)


@dataclass(frozen=True)
class VAETiling:
    """How the VAE is tiled (always exactly: tiled == untiled, tiling/vae.py). ``tile`` is the
    decoder's tile core in latent px; the encoder's is the same area in image px (x the codec's own
    downscale factor). ``tile=None`` chooses the size from free memory and tiles only images above
    ``threshold_pixels``; an explicit tile always tiles."""

    tile: int | None = None
    enabled: bool = True  # False: never tile
    memory_budget: int | None = None  # bytes for one tile's activations; None: free CUDA memory / 2, or 1 GiB on CPU
    threshold_pixels: int = 1024 * 1024  # automatic tiling starts above this many image pixels

    def __post_init__(self):
        if self.tile is not None and self.tile < 1:
            raise SMFSRError(f"${{vae_tile}} must be at least 1 latent cell, got {self.tile}")

    @classmethod
    def off(cls) -> "VAETiling":
        return cls(enabled=False)

    def tiles(self, image_pixels: int) -> bool:
        """Whether an image of this many pixels is decoded (or encoded) in tiles."""
        return self.enabled and (self.tile is not None or image_pixels > self.threshold_pixels)

    @classmethod
    def parse(cls, value: str | int | None) -> "VAETiling":
        """'auto' / 0 / None: automatic; 'off': never; N: tile N latent px."""
        if value in (None, "auto", 0, "0"):
            return cls()
        if value == "off":
            return cls(enabled=False)
        try:
            tile = int(value)
        except (TypeError, ValueError):
            raise SMFSRError(f"${{vae_tile}} must be 'auto', 'off' or a number of latent cells, not {value!r}") from None
        return cls(tile=tile)


@dataclass(frozen=True)
class UpscaleOptions:
    """What one call asks for; ``None`` means the model's stored default."""

    scale: float | None = None  # output size / input size
    seed: int = 0
    steps: int | None = None
    tile_size: int | None = None  # latent px; 0 = the whole latent at once (no tiling)
    tile_overlap: int | None = None  # latent px; default: the model's overlap, in proportion to the tile
    color_fix: str | None = None
    vae_tiling: VAETiling | None = None  # None: automatic

    @classmethod
    def from_widgets(cls, *, scale: float = 0, seed: int = 0, steps: int = 0, tile_size: int = 0,
                     tile_overlap: int = 0, color_fix: str = "auto", vae_tile: int | str = 0) -> "UpscaleOptions":
        """Options as GUI doors (ComfyUI, A1111, the app) hold them: 0 and "auto" mean the model's default."""
        return cls(scale=float(scale) or None, seed=int(seed), steps=int(steps) or None,
                   tile_size=int(tile_size) or None, tile_overlap=int(tile_overlap) or None,
                   color_fix=None if color_fix in (None, "", "auto") else str(color_fix),
                   vae_tiling=VAETiling.parse(vae_tile))

    def check(self) -> "UpscaleOptions":
        """Every value on its own (no model needed); raises SMFSRError. Returns self."""
        if self.scale is not None and not 0 < self.scale <= MAX_SCALE:
            raise SMFSRError(f"${{scale}} must be greater than 0 and at most {MAX_SCALE:g}, got {self.scale:g}")
        if self.steps is not None and self.steps < 1:
            raise SMFSRError(f"${{steps}} must be at least 1, got {self.steps}")
        if self.tile_size is not None and self.tile_size < 0:
            raise SMFSRError(f"${{latent_tile}} must be 0 (no tiling) or positive, got {self.tile_size}")
        if self.tile_overlap is not None and self.tile_overlap < 0:
            raise SMFSRError(f"${{latent_tile_overlap}} must be 0 or positive, got {self.tile_overlap}")
        if self.tile_size and self.tile_overlap is not None and self.tile_overlap >= self.tile_size:
            raise SMFSRError(f"${{latent_tile_overlap}} ({self.tile_overlap}) must be smaller than ${{latent_tile}} ({self.tile_size})")
        if self.color_fix is not None and self.color_fix not in COLOR_FIXES:
            raise SMFSRError(f"unknown ${{color_fix}} {self.color_fix!r}; choose one of {', '.join(COLOR_FIXES)}")
        if not -(2**63) <= int(self.seed) < 2**64:
            raise SMFSRError(f"${{seed}} must fit in 64 bits, got {self.seed}")
        return self

    def resolve(self, defaults, patch_size: int) -> "Settings":
        """The concrete settings for a model with these ``PipelineDefaults`` and transformer patch
        size. Raises SMFSRError for any value the model cannot run with."""
        self.check()
        steps = self.steps or defaults.steps
        if defaults.max_steps and steps > defaults.max_steps:
            raise SMFSRError(f"this model was trained for {defaults.max_steps} step(s) only and gives poor results "
                             f"with more; set ${{steps}} to {defaults.max_steps} (or leave it at the model's default)")
        tile = defaults.latent_tile if self.tile_size is None else self.tile_size
        if self.tile_overlap is not None:
            overlap = self.tile_overlap
        elif self.tile_size is None or not defaults.latent_tile:
            overlap = defaults.latent_overlap
        else:  # a tile of the user's with the model's overlap ratio
            overlap = round(defaults.latent_overlap * tile / defaults.latent_tile)
        if tile and tile % patch_size:
            raise SMFSRError(f"${{latent_tile}} {tile} must be a multiple of the model's patch size {patch_size}")
        if tile and overlap >= tile:
            raise SMFSRError(f"${{latent_tile_overlap}} ({overlap}) must be smaller than ${{latent_tile}} ({tile})")
        return Settings(scale=float(self.scale or defaults.upscale), seed=int(self.seed), steps=int(steps),
                        tile=int(tile), overlap=int(overlap), color_fix=self.color_fix or defaults.color_fix,
                        vae_tiling=self.vae_tiling or VAETiling())


@dataclass(frozen=True)
class Settings:
    """Resolved options: what runs."""

    scale: float
    seed: int
    steps: int
    tile: int  # latent px, 0 = no tiling
    overlap: int
    color_fix: str
    vae_tiling: VAETiling

    def with_tile(self, tile: int) -> "Settings":
        """The same settings with a smaller latent tile (the out-of-memory retry)."""
        return replace(self, tile=tile, overlap=min(self.overlap, tile // 2))
