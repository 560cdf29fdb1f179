"""A loopback stand-in for the Hugging Face hub, for the download tests: the two things
huggingface_hub asks of it, a repository's file listing with sizes and hashes
(``GET /api/models/{repo}/revision/{rev}``) and the files themselves (``HEAD``/``GET
/{repo}/resolve/{rev}/{path}``, with ``Range`` for resuming). It serves only 127.0.0.1 and stops
with the test. Failures a real hub gives are switches: a gated repository (401), a missing one
(404), a connection cut mid-file, a file whose bytes do not match the hash it announces."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "a" * 40


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    lfs: set[str] = field(default_factory=set)  # files served as LFS (sha256 in the listing and the ETag)
    corrupt: set[str] = field(default_factory=set)  # served with other bytes than their announced hash
    cut_once: set[str] = field(default_factory=set)  # the first GET sends half the file, then hangs up
    stall_once: set[str] = field(default_factory=set)  # the first GET sends half the file, then stalls


class Hub:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.stalled = threading.Event()  # a stall_once file has sent its first half
        self.closing = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve(self, body=False)

            def do_GET(self):
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hub":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    # ----------------------------------------------------------------------------------------
    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((h.command, path, h.headers.get("Range")))
        if path.startswith("/api/models/"):
            repo_id, _, _ = path[len("/api/models/"):].partition("/revision/")
            return self.listing(h, repo_id)
        repo_id, sep, rest = path.lstrip("/").partition("/resolve/")
        if not sep:
            return self.error(h, 404, "EntryNotFound", "no such route")
        _, _, filename = rest.partition("/")
        return self.file(h, repo_id, filename, body)

    def check_repo(self, h, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self.error(h, 404, "RepoNotFound", f"Repository Not Found for url: {h.path}")
            return None
        if repo.gated and not (h.headers.get("Authorization") or "").startswith("Bearer "):
            self.error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                            "and be authenticated to access it. Please log in.")
            return None
        return repo

    def listing(self, h, repo_id: str) -> None:
        repo = self.check_repo(h, repo_id)
        if repo is None:
            return
        siblings = []
        for name, data in repo.files.items():
            entry = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
            if name in repo.lfs:
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            siblings.append(entry)
        self.json(h, {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                      "gated": "manual" if repo.gated else False, "siblings": siblings})

    def file(self, h, repo_id: str, filename: str, body: bool) -> None:
        repo = self.check_repo(h, repo_id)
        if repo is None:
            return
        if filename not in repo.files:
            return self.error(h, 404, "EntryNotFound", f"{filename} not found in {repo_id}")
        data = repo.files[filename]
        etag = hashlib.sha256(data).hexdigest() if filename in repo.lfs else git_blob_sha1(data)
        served = bytes(b ^ 0xFF for b in data) if filename in repo.corrupt else data
        start = 0
        if h.headers.get("Range", "").startswith("bytes="):
            start = int(h.headers["Range"][len("bytes="):].split("-")[0] or 0)
        part = served[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{etag}"')
        if filename in repo.lfs:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Content-Length", str(len(part)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(served) - 1}/{len(served)}")
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if not body:
            return
        if filename in repo.stall_once:
            repo.stall_once.discard(filename)
            h.wfile.write(part[: len(part) // 2])
            h.wfile.flush()
            self.stalled.set()
            self.closing.wait(60)  # until the client is killed and the test ends
            return
        if filename in repo.cut_once:
            repo.cut_once.discard(filename)
            h.wfile.write(part[: len(part) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the connection drops mid-file
            return
        h.wfile.write(part)

    @staticmethod
    def json(h, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def error(h, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
