"""Training data: HR crops and their LR images (degraded on the fly, or pre-made pairs).

Every item is a deterministic function of (seed, epoch, index): the crop, the flip and the
degradation come from one generator, so a resumed run sees exactly the data it would have seen.
Unreadable images are reported once and replaced by another image; a run never crashes on one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from smfsr.degrade import bicubic_degrade, degrade
from smfsr.imageio import IMAGE_SUFFIXES

log = logging.getLogger("smfsr.trainer")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"data: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"data: no images in {folder}")
    return files


def load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        img.load()
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class SRPairs(Dataset):
    """(hr, lr) pairs: random ``crop`` x ``crop`` HR crops in [0, 1] and LR images of crop/scale."""

    def __init__(self, hr_dir: str, *, crop: int, scale: int, degradation: str = "realesrgan",
                 lr_dir: str | None = None, seed: int = 0, train: bool = True):
        self.files = list_images(hr_dir)
        self.lr_dir = Path(lr_dir) if lr_dir else None
        self.crop, self.scale, self.degradation, self.seed, self.train = crop, scale, degradation, seed, train
        self.epoch = 0
        self.bad: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, index: int) -> torch.Generator:
        epoch = self.epoch if self.train else 0
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            if path in self.bad:
                continue
            try:
                return self._item(path, self._generator(index))
            except (OSError, ValueError, SyntaxError) as e:
                self.bad.add(path)
                log.warning("skipping unreadable image %s (%s)", path, e)
        raise RuntimeError("data: no readable images left")

    def _item(self, path: Path, g: torch.Generator) -> dict[str, torch.Tensor]:
        hr = load_rgb(path)
        _, h, w = hr.shape
        if min(h, w) < self.crop:
            raise ValueError(f"{w}x{h} is smaller than the {self.crop}px crop")
        if self.train:
            y = int(torch.randint(h - self.crop + 1, (), generator=g)) // self.scale * self.scale
            x = int(torch.randint(w - self.crop + 1, (), generator=g)) // self.scale * self.scale
        else:  # validation: the centre crop
            y, x = (h - self.crop) // 2 // self.scale * self.scale, (w - self.crop) // 2 // self.scale * self.scale
        hr = hr[:, y : y + self.crop, x : x + self.crop]
        if self.lr_dir is not None:
            lr = load_rgb(self.lr_dir / path.name)
            s = self.scale
            lr = lr[:, y // s : (y + self.crop) // s, x // s : (x + self.crop) // s]
            if lr.shape[-1] * s != self.crop or lr.shape[-2] * s != self.crop:
                raise ValueError(f"the LR image for {path.name} is not 1/{s} of its HR image")
        if self.train and bool(torch.rand((), generator=g) < 0.5):
            hr = hr.flip(-1)
            if self.lr_dir is not None:
                lr = lr.flip(-1)
        if self.lr_dir is None:
            # "mixed": half the crops clean (bicubic), so one model serves both evaluation settings
            clean = self.degradation == "bicubic" or (
                self.degradation == "mixed" and bool(torch.rand((), generator=g) < 0.5))
            if clean:
                lr = bicubic_degrade(hr[None], self.scale)[0]
            else:
                lr = degrade(hr[None], self.scale, generator=g)[0]
        return {"hr": hr, "lr": lr}


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so runs and resumes see the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n
