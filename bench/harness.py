"""The benchmark harness: timing, peak memory in child processes, tables, and the results file."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import platform
import queue as queue_module
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).with_name("RESULTS.md")


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(target: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    try:
        queue.put(target(*args))
    except BaseException as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def in_child(target: Callable[..., dict], *args: Any, timeout: float = 1800) -> dict:
    """Run ``target(*args)`` in a fresh process (spawn) so its peak memory is its own.

    A child that dies before it reports (an import error, the out-of-memory killer) is reported at
    once as an error, not waited on."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, args, queue))
    proc.start()
    deadline = time.monotonic() + timeout
    result = None
    while result is None:
        try:
            result = queue.get(timeout=0.2)
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # it may have reported just before exiting
                    result = queue.get(timeout=1)
                except queue_module.Empty:
                    result = {"error": f"child exited with {proc.exitcode} before reporting "
                                       "(an import error or out of memory; see its stderr above)"}
            elif time.monotonic() > deadline:
                proc.kill()
                result = {"error": f"timed out after {timeout:.0f} s"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result = {"error": f"child exited with {proc.exitcode} (out of memory?)"}
    return result


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = torch.get_num_threads()
        tv = torch.__version__
    except Exception:  # pragma: no cover
        gpu, threads, tv = "?", "?", "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores ({threads} torch threads), {gpu}, torch {tv}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def report(tables: list[Table], write: bool = True) -> str:
    header = f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}\n\nMachine: {machine()}\n\n"
    text = header + "\n".join(t.markdown() for t in tables)
    print(text)
    if write:
        existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nNewest last. Produced by `python -m bench`.\n\n"
        RESULTS.write_text(existing + "\n" + text)
    return text


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"
