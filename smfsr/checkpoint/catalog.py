"""Finding models in folders, for doors that list them (A1111's upscaler list, the app's menu)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .peek import is_bundle, read_json
from .safe_read import read_header


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    factor: int
    kind: str  # "bundle" | "official folder"
    max_steps: int = 0  # 0: any number of steps; 1: a one-step-only model
    patch: int = 2  # the transformer's patch size: latent tiles are multiples of it

    @property
    def name(self) -> str:
        stem = self.path.name.rstrip("/") if self.kind != "bundle" else self.path.stem
        return f"SMFSR x{self.factor} ({stem})"


def find_models(folders: list[str | os.PathLike]) -> list[ModelEntry]:
    """SMFSR bundles and official folders in ``folders`` (not recursive), read from headers only;
    other files are ignored. Duplicates (the same file through two folders) are listed once."""
    seen, found = set(), []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        # by stem, so "name.safetensors" lists before its variants ("name-q.safetensors")
        for path in sorted(folder.iterdir(), key=lambda p: (p.stem, p.name)):
            key = path.resolve()
            if key in seen:
                continue
            entry = _entry(path)
            if entry is not None:
                seen.add(key)
                found.append(entry)
    return found


def _entry(path: Path) -> ModelEntry | None:
    if path.is_dir():
        if (path / "transformer" / "config.json").is_file():
            try:
                patch = int(read_json(path / "transformer" / "config.json").get("patch_size", 2))
            except CheckpointError:
                return None
            return ModelEntry(path, 4, "official folder", patch=patch)  # the official release is x4
        return None
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return None
    try:
        metadata, _ = read_header(path)
    except CheckpointError:
        return None
    if not is_bundle(metadata):
        return None
    try:
        pipeline = json.loads(metadata.get("smfsr_pipeline", "{}"))
        patch = json.loads(metadata.get("smfsr_transformer_config", "{}")).get("patch_size", 2)
    except json.JSONDecodeError:
        return None
    return ModelEntry(path, int(pipeline.get("upscale", 4)), "bundle", int(pipeline.get("max_steps", 0)), int(patch))
