"""A batch of images to upscale: inputs (files, folders, globs) -> output paths, existing outputs,
unreadable inputs and output folders, all checked before the model loads (no torch here).

Output folders are probed, never created here: a refused run leaves nothing behind, and a folder
appears only when its first result is written (``atomic.write_atomically``)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import probe_writable, write_atomically
from .errors import SMFSRError
from .imageio import is_image_path, open_image


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path


@dataclass
class Batch:
    todo: list[Job]
    skipped: list[Job]  # the output exists and --skip-existing was given
    refused: list[Job]  # the output exists and neither --overwrite nor --skip-existing
    unreadable: int = 0


def expand_inputs(items: list[str]) -> list[tuple[Path, Path]]:
    """(file, path relative to its root) for files, folders (recursive) and globs."""
    found: list[tuple[Path, Path]] = []
    for item in items:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise SMFSRError(f"{item}: no files match")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p))
                if not files:
                    raise SMFSRError(f"{path}: the folder has no images")
                found += [(f, f.relative_to(path)) for f in files]
            elif path.exists():
                found.append((path, Path(path.name)))
            else:
                raise SMFSRError(f"{path}: no such file or folder")
    return found


def output_path(source_rel: Path, out: Path, single: bool) -> Path:
    """A single input may name its output file; otherwise ``out`` is a folder and names are kept."""
    if single and is_image_path(out):
        return out
    return out / source_rel.with_suffix(".png")


def plan(inputs: list[str], output: str, *, overwrite: bool, skip_existing: bool, rank: int = 0,
         world: int = 1) -> Batch:
    """This process's share of the jobs (every ``world``-th under accelerate/torchrun)."""
    found = expand_inputs(inputs)
    single = len(found) == 1
    jobs = [Job(src, output_path(rel, Path(output), single)) for src, rel in found]
    targets = [job.target for job in jobs]
    if len(set(targets)) != len(targets):
        raise SMFSRError("two inputs would write the same output file (same name in different folders?); use folders")
    jobs = jobs[rank::world]
    exists = [job for job in jobs if job.target.exists() and not overwrite]
    todo = [job for job in jobs if job not in exists]
    return Batch(todo, exists if skip_existing else [], [] if skip_existing else exists)


def keep_readable(jobs: list[Job], max_pixels: int, report) -> tuple[list[Job], int]:
    """The jobs whose input opens as an image of a size SMFSR takes (header only); ``report(message)``
    for each other one. Returns (the readable jobs, how many were not)."""
    good = []
    for job in jobs:
        try:
            open_image(job.source, max_pixels, decode=False).close()
            good.append(job)
        except SMFSRError as e:
            report(str(e))  # the message names the file
    return good, len(jobs) - len(good)


def check_writable(folders: set[Path]) -> None:
    """Each output folder can take a new file (probed in it, or in its nearest existing parent when
    it does not exist yet). Nothing is created."""
    for folder in sorted(folders):
        probe_writable(folder, "choose another -o")


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment accelerate/torchrun set."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def write_png(image, target: Path) -> None:
    """Through a temporary file in the target's folder (made now if need be): a failed write leaves
    nothing behind and never a half-written file in place of one the user had."""
    write_atomically(target, lambda tmp: image.save(tmp, format="PNG"))
