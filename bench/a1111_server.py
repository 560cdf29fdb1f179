"""A real AUTOMATIC1111 web UI (API only) with this extension, and a client for its API: what the
A1111 tests and ``bench.fullsize`` drive."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from bench.comfyui_server import REPO, free_port, peak_rss, stop


class WebUI:
    def __init__(self, url: str, data: Path, process: subprocess.Popen):
        self.url, self.data, self.process = url, data, process

    def call(self, path: str, payload: dict | None = None, timeout: float = 300):
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"},
                                         method="POST" if payload is not None else "GET")
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())

    def extras(self, image: Path, upscaler: str, scale: float, timeout: float = 300) -> bytes:
        """Extras -> one image through ``upscaler`` at ``scale``: the PNG bytes A1111 returns. (A failing
        upscaler still answers 200 with a Lanczos resize: compare the pixels to know it ran.)"""
        reply = self.call("/sdapi/v1/extra-single-image", {
            "resize_mode": 0, "upscaling_resize": scale, "upscaler_1": upscaler, "upscaler_2": "None",
            "extras_upscaler_2_visibility": 0,
            "image": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()}, timeout=timeout)
        return base64.b64decode(reply["image"])

    def log(self) -> str:
        return (self.data / "webui.log").read_text(errors="replace")

    def peak_rss(self) -> int:
        """The web UI's peak resident memory so far (bytes; Linux)."""
        return peak_rss(self.process.pid)


@contextmanager
def a1111(data: Path, a1111_dir: str | os.PathLike, python: str, *, no_half: bool = True, timeout: float = 240,
          forge: bool = False, extra_args: tuple[str, ...] = (), env: dict | None = None):
    """Start A1111, or Forge with ``forge`` (CPU, API only), on the data folder ``data`` with this
    repository as its only extension; yields a ``WebUI`` client, stops the server afterwards. Models
    go in data/models/SMFSR; ``env`` adds to the environment (HF_HOME for an offline CLIP, say)."""
    (data / "extensions").mkdir(parents=True, exist_ok=True)
    (data / "models" / "SMFSR").mkdir(parents=True, exist_ok=True)
    if not (data / "extensions" / "smfsr").exists():
        os.symlink(REPO, data / "extensions" / "smfsr")
    port = free_port()
    log = open(data / "webui.log", "w")
    proc = subprocess.Popen(
        [python, "launch.py", "--skip-prepare-environment", "--skip-install", "--no-download-sd-model",
         "--skip-torch-cuda-test", "--use-cpu", "all", *(["--no-half"] if no_half else []), "--api", "--nowebui",
         "--port", str(port), "--data-dir", str(data), "--skip-version-check", "--server-name", "127.0.0.1",
         # Forge asks CUDA for its device at import unless told to stay on the CPU
         *(["--always-cpu"] if forge else []), *extra_args],
        cwd=str(a1111_dir), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    server = WebUI(f"http://127.0.0.1:{port}", data, proc)
    deadline = time.time() + timeout
    try:
        while True:
            try:
                server.call("/sdapi/v1/upscalers", timeout=30)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("A1111 did not start:\n" + (data / "webui.log").read_text()[-4000:])
                time.sleep(1)
        yield server
    finally:
        stop(proc)
        log.close()
