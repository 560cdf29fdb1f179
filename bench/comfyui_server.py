"""A real ComfyUI server with this pack, and a client for its HTTP API (``POST /prompt``,
``/history``, ``/view``): what the ComfyUI tests and ``bench.fullsize`` drive."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, url: str, base: Path, process: subprocess.Popen | None = None):
        self.url, self.base, self.process = url, base, process

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
        return json.loads(data) if r.headers.get_content_type() == "application/json" else data

    def post(self, path: str, payload: dict | None = None):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        status, reply = self.post("/prompt", {"prompt": prompt, "client_id": "smfsr"})
        if status != 200:
            raise AssertionError(f"ComfyUI refused the prompt: {reply}")
        return self.wait(reply["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited (status {self.process.returncode}) while running the prompt")
            history = self.get(f"/history/{prompt_id}")
            status = history.get(prompt_id, {}).get("status", {})
            if status.get("completed") or status.get("status_str") == "error":
                return history[prompt_id]
            time.sleep(0.3)
        raise TimeoutError(prompt_id)

    def output_file(self, entry: dict) -> bytes:
        for output in entry["outputs"].values():
            for image in output.get("images", []):
                return self.get(f"/view?filename={image['filename']}&subfolder={image['subfolder']}"
                                f"&type={image['type']}")
        raise AssertionError(f"no image in {entry['outputs']}")

    def peak_rss(self) -> int:
        """The server's peak resident memory so far (bytes; Linux)."""
        return peak_rss(self.process.pid)


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (bytes; Linux's VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """Terminate a server, killing it if it has not exited after ``grace`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()


def error_message(entry: dict) -> str | None:
    """The exception message of a prompt that failed, None if it succeeded."""
    if entry["status"]["status_str"] == "success":
        return None
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return str(entry["status"]["messages"])


def prepare_base(base: Path) -> Path:
    """A ComfyUI base directory (models/, input/, output/) with this pack as its only custom node."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "smfsr"
    if not link.exists():
        os.symlink(REPO, link)
    (base / "input").mkdir(exist_ok=True)
    return base


@contextmanager
def comfyui(base: Path, comfyui_dir: str | os.PathLike, python: str, timeout: float = 180,
            other_packs: tuple[str, ...] = ()):
    """Start ComfyUI (CPU) on ``base`` with this pack and ``other_packs`` (folders in its custom_nodes/)
    as its only custom nodes; yields a ``Comfy`` client, stops the server afterwards."""
    prepare_base(base)
    port = free_port()
    log = open(base / "comfyui.log", "w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--disable-api-nodes", "--base-directory", str(base), "--disable-all-custom-nodes",
         "--whitelist-custom-nodes", "smfsr", *other_packs, "--database-url", "sqlite:///:memory:"],
        cwd=str(comfyui_dir), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    server = Comfy(f"http://127.0.0.1:{port}", base, proc)
    deadline = time.time() + timeout
    try:
        while True:
            try:
                server.get("/object_info/SMFSRUpscale")
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ComfyUI did not start:\n" + (base / "comfyui.log").read_text()[-4000:])
                time.sleep(0.5)
        yield server
    finally:
        stop(proc)
        log.close()


def link_models(base: Path, links: dict[str, Path]) -> None:
    """``links``: a path under models/ (e.g. ``checkpoints/x.safetensors``) -> the file or folder."""
    for rel, target in links.items():
        dest = base / "models" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink() if not dest.is_dir() or dest.is_symlink() else shutil.rmtree(dest)
        os.symlink(target, dest)
