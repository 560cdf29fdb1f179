"""``smfsr download``: the official weights from the Hugging Face hub, checked, resumable, and put
where each door looks. The only code in SMFSR that uses the network, and only when a user runs it:
no door downloads by itself (a missing file is an error that names the command).

What a download does, in order, each failure one clear line:
  1. offline (HF_HUB_OFFLINE=1), an unknown name: said at once, before any request;
  2. the repository's file listing (sizes, sha256 of LFS files, git blob ids of small files), with
     a timeout: an unreachable hub, a gated repository (how to accept the licence and log in), a
     missing one are told apart;
  3. the free disk space against what is still to fetch (GB), and a write probe of the destination;
  4. each file from the hub's resolve URL (huggingface_hub's URL, token and session) into a hidden
     staging folder, continuing a file an interrupted run left there (a Range request), then
     hashed and compared with the listing: a mismatch deletes the file and says so; a match is
     moved into place. So a file at its final name is always complete and checked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import probe_writable
from .errors import SMFSRError

HUB = "https://huggingface.co"
TIMEOUT = 10.0  # seconds for the listing request (a down hub fails in this time, not after retries)
SD35 = "stabilityai/stable-diffusion-3.5-medium"


@dataclass(frozen=True)
class Source:
    """Files of one hub repository that make one downloadable name."""

    name: str
    repo: str
    patterns: tuple[str, ...]  # hub paths to take (fnmatch)
    role: str  # "transformer" | "vae" | "encoders"
    what: str
    gated: bool = False


SOURCES = {s.name: s for s in (
    Source("smfsr_q", "zw121/SMFSR", ("smfsr_q/*",), "transformer", "the official SMFSR transformer, quality (about 5.5 GB)"),
    Source("smfsr_f", "zw121/SMFSR", ("smfsr_f/*",), "transformer", "the official SMFSR transformer, fidelity (about 5.5 GB)"),
    Source("sd35-medium-vae", SD35, ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"), "vae",
           "SD3.5-medium's VAE (about 170 MB; gated)", gated=True),
    Source("sd35-medium-encoders", SD35, ("text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors",
                                         "text_encoders/t5xxl_fp16.safetensors", "tokenizer/*", "tokenizer_2/*",
                                         "tokenizer_3/*"), "encoders",
           "SD3.5-medium's text encoders CLIP-L, CLIP-G, T5-XXL fp16 and their tokenizers (about 10.5 GB; gated)",
           gated=True),
    # what the smfsr_sd35 workflow loads: fits a 24 GB machine beside the SMFSR model (README, bench/RESULTS.md)
    Source("sd35-medium-encoders-fp8", SD35, ("text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors",
                                             "text_encoders/t5xxl_fp8_e4m3fn.safetensors", "tokenizer/*",
                                             "tokenizer_2/*", "tokenizer_3/*"), "encoders",
           "the same with T5-XXL in fp8 (about 6.6 GB; gated): half of T5's memory, what ComfyUI's smfsr_sd35 "
           "workflow loads", gated=True),
)}
DOORS = ("cli", "comfyui", "a1111")


def names_help() -> str:
    return "\n".join(f"  {s.name:22s} {s.what} ({s.repo})" for s in SOURCES.values())


def cache_dir() -> Path:
    """Where downloads go by default (and where shipped-model names also look): $SMFSR_CACHE or ~/.cache/smfsr."""
    return Path(os.environ.get("SMFSR_CACHE") or Path.home() / ".cache" / "smfsr") / "models"


# ------------------------------------------------------------------------------------------------
# where files go, per door


@dataclass(frozen=True)
class Layout:
    """The folders a door reads: its SMFSR models, VAEs and text encoders."""

    door: str
    models: Path
    vae: Path
    encoders: Path

    @classmethod
    def of(cls, door: str, out: str | None, comfyui_dir: str | None, a1111_dir: str | None) -> "Layout":
        if door == "comfyui":
            base = comfyui_dir or os.environ.get("COMFYUI_DIR")
            if not base:
                raise SMFSRError("--for comfyui needs the ComfyUI folder: --comfyui-dir PATH (or set COMFYUI_DIR)")
            models = Path(base) / "models"
            return cls(door, models / "smfsr", models / "vae", models / "text_encoders")
        if door == "a1111":
            base = a1111_dir or os.environ.get("A1111_DIR")
            if not base:
                raise SMFSRError("--for a1111 needs the web UI's folder: --a1111-dir PATH (or set A1111_DIR)")
            root = Path(out) if out else cache_dir()  # A1111 reads only bundles: the SD3.5 parts stay here
            return cls(door, Path(base) / "models" / "SMFSR", root / "sd3.5-medium", root / "sd3.5-medium")
        root = Path(out) if out else cache_dir()
        return cls(door, root, root / "sd3.5-medium", root / "sd3.5-medium")

    def wants(self, source: Source, hub_path: str) -> bool:
        """ComfyUI ships the tokenizers and reads a VAE from its weights file alone."""
        if self.door != "comfyui":
            return True
        return hub_path.endswith(".safetensors") if source.role in ("vae", "encoders") else True

    def target(self, source: Source, hub_path: str) -> Path:
        """Where one hub file goes."""
        if source.role == "transformer":  # an official folder: <models>/smfsr_q/transformer/...
            return self.models / source.name / hub_path.split("/", 1)[1]
        if self.door == "comfyui" and source.role == "vae":  # VAELoader lists single files
            return self.vae / "sd3.5_medium_vae.safetensors"
        if self.door == "comfyui" and source.role == "encoders":
            return self.encoders / Path(hub_path).name
        return (self.vae if source.role == "vae" else self.encoders) / hub_path


# ------------------------------------------------------------------------------------------------
# the listing, and what can go wrong with the hub


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git's sha1 of the blob, for small files

    def verify(self, local: Path) -> str | None:
        """Why ``local`` is not this file, or None."""
        size = local.stat().st_size
        if size != self.size:
            return f"it has {size} bytes, the hub lists {self.size}"
        if self.sha256:
            got = file_hash(local, hashlib.sha256())
            return None if got == self.sha256 else f"its sha256 is {got}, the hub lists {self.sha256}"
        if self.blob_id:
            got = file_hash(local, hashlib.sha1(b"blob %d\0" % size))
            return None if got == self.blob_id else f"its git blob id is {got}, the hub lists {self.blob_id}"
        return None


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def file_hash(path: Path, h) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def hub_error(e: Exception, source: Source, endpoint: str) -> SMFSRError:
    """A hub failure as one line that says what to do."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    page = f"{endpoint}/{source.repo}"
    if isinstance(e, OfflineModeIsEnabled):
        return offline_error()
    if isinstance(e, GatedRepoError) or (isinstance(e, HfHubHTTPError) and _status(e) in (401, 403)):
        return SMFSRError(f"{source.repo} is gated: open {page} while logged in and accept its licence, then log in "
                          "here with `hf auth login` (or set HF_TOKEN to a read token) and run this again")
    if isinstance(e, RepositoryNotFoundError):
        return SMFSRError(f"the hub has no repository {source.repo} ({page}: 404). The names SMFSR downloads: "
                          f"{', '.join(SOURCES)}")
    if isinstance(e, RevisionNotFoundError):
        return SMFSRError(f"{source.repo} has no such revision ({e}); leave out --revision for the newest")
    if isinstance(e, EntryNotFoundError):
        return SMFSRError(f"a file of {source.name} is gone from {source.repo} ({e}); try again, or report it")
    if isinstance(e, HfHubHTTPError):
        return SMFSRError(f"the hub answered {_status(e)} for {source.repo}: {str(e).splitlines()[0]}")
    if not network_failure(e):
        return None  # a bug or a version mismatch, not the network: passed on as it is, with its traceback
    return SMFSRError(f"cannot reach the hub at {endpoint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                      " check the network (and HF_ENDPOINT), then run this again")


# the connection's failures in the HTTP clients huggingface_hub has used (httpx, its fork httpx2,
# requests), by class name: which of them is installed varies with its version
NETWORK_ERRORS = {"TransportError", "RequestException", "ConnectionError", "TimeoutException", "Timeout"}


def network_failure(e: BaseException) -> bool:
    """A failure of the connection (refused, reset, timed out, DNS, TLS), as the socket or an HTTP
    client reports it, or anything raised while handling one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) or NETWORK_ERRORS & {k.__name__ for k in type(e).__mro__}:
            return True
        e = e.__cause__ or e.__context__
    return False


HUB_FLOOR = (1, 0)  # fetch_file streams with huggingface_hub's httpx session (get_session().stream), from 1.0


def check_hub() -> None:
    """Refuse, before anything is fetched, a huggingface_hub older than the API used here."""
    import importlib.metadata

    from .stack import release

    version = importlib.metadata.version("huggingface_hub")
    if release(version) < HUB_FLOOR:
        raise SMFSRError(f"smfsr download needs huggingface_hub >= {'.'.join(map(str, HUB_FLOOR))}, and this Python "
                         f"has {version}: run it from SMFSR's own environment (`pip install -e .` in a fresh venv), "
                         "not a web UI's, whose packages pin the older one")


def _status(e) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def offline_error() -> SMFSRError:
    return SMFSRError("downloads need the network and HF_HUB_OFFLINE=1 is set: unset it (`env -u HF_HUB_OFFLINE "
                      "smfsr download ...`), or copy the files by hand (README: Using the official SMFSR weights)")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def listing(source: Source, revision: str | None, endpoint: str) -> tuple[str, list[HubFile]]:
    """(the commit, the files of ``source`` with sizes and hashes) from the hub."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(source.repo, revision=revision, files_metadata=True,
                                                   timeout=TIMEOUT)
    except Exception as e:  # the hub's and the network's failures, told apart by hub_error; others pass
        error = hub_error(e, source, endpoint)
        if error is None:
            raise
        raise error from None
    files = []
    for s in info.siblings or []:
        if any(fnmatch.fnmatch(s.rfilename, p) for p in source.patterns):
            lfs = s.lfs.sha256 if s.lfs is not None else None
            files.append(HubFile(s.rfilename, int(s.size or (s.lfs.size if s.lfs else 0)), lfs, s.blob_id))
    if not files:
        raise SMFSRError(f"{source.repo} at {info.sha} has no files matching {', '.join(source.patterns)}; the "
                         "repository's layout changed: report it")
    return info.sha, files


# ------------------------------------------------------------------------------------------------
# the download


def check_room(folder: Path, needed: int) -> None:
    """The destination can take ``needed`` bytes and a new file (probed; nothing is created)."""
    existing = probe_writable(folder, "choose another -o / --comfyui-dir / --a1111-dir")
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise SMFSRError(f"not enough disk space in {existing}: the download needs {needed / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB are free; free some space or choose another -o")


def fetch(source: Source, layout: Layout, *, revision: str | None = None, endpoint: str | None = None,
          say=None) -> list[Path]:
    """Download ``source`` into ``layout``; returns the files' final paths."""
    say = say or (lambda message: print(message, file=sys.stderr))
    if offline():
        raise offline_error()
    check_hub()
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")
    commit, files = listing(source, revision, endpoint)
    files = [f for f in files if layout.wants(source, f.path)]
    todo = []
    for f in files:
        target = layout.target(source, f.path)
        if target.exists() and f.verify(target) is None:
            say(f"{target}: already there and checked")
        else:
            todo.append((f, target))
    if not todo:
        return [layout.target(source, f.path) for f in files]
    # the big files first, the config last: a folder a door lists (it has transformer/config.json)
    # is complete; partial files wait in a hidden staging folder beside the targets
    todo.sort(key=lambda item: -item[0].size)
    top = layout.models if source.role == "transformer" else Path(os.path.commonpath([str(t.parent) for _, t in todo]))
    staging = top / f".smfsr-download-{source.name}"
    check_room(staging, sum(f.size for f, _ in todo))
    total = sum(f.size for f, _ in todo)
    done = 0
    say(f"{source.name}: {len(todo)} file(s), {size_text(total)} from {endpoint}/{source.repo} at {commit[:12]}")
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{source.name} total", file=sys.stderr) as overall:
        for index, (f, target) in enumerate(todo, 1):
            overall.write(f"[{index}/{len(todo)}] {f.path} ({size_text(f.size)})", file=sys.stderr)
            partial = staging / (f.path + ".part")
            try:
                fetch_file(source.repo, f, commit, endpoint, partial, overall)
            except OSError as e:
                if getattr(e, "errno", None) == 28:  # ENOSPC
                    raise SMFSRError(f"the disk filled up while downloading {f.path}; the partial file is kept in "
                                     f"{staging} and resumes when you run this again with space freed") from None
                raise hub_error(e, source, endpoint) from None
            except SMFSRError:
                raise
            except Exception as e:
                error = hub_error(e, source, endpoint)
                if error is None:
                    raise
                have = partial.stat().st_size if partial.exists() else 0
                if not have:
                    raise error from None
                raise SMFSRError(f"the download of {f.path} stopped after {size_text(have)} of {size_text(f.size)} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no reason given'}); "
                                 "run this again: it continues from there") from None
            problem = f.verify(partial)
            if problem:
                partial.unlink()
                raise SMFSRError(f"{f.path} from {source.repo} failed its check ({problem}); the file was deleted. "
                                 "Run this again to download it afresh")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
            done += f.size
    shutil.rmtree(staging, ignore_errors=True)
    say(f"{source.name}: done, {size_text(done)} checked against the hub's hashes")
    return [layout.target(source, f.path) for f in files]


def fetch_file(repo: str, f: HubFile, commit: str, endpoint: str, partial: Path, overall) -> None:
    """One file into ``partial``, continuing what an interrupted run left there (an HTTP Range
    request; huggingface_hub's own download restarts a file in every new process). The URL, the
    login token and the session are huggingface_hub's."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
    from tqdm import tqdm

    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > f.size:  # not a prefix of this file
        partial.unlink()
        have = 0
    if have == f.size:
        return
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # the bytes as stored, so sizes and ranges agree
    if have:
        headers["Range"] = f"bytes={have}-"
    url = hf_hub_url(repo, f.path, revision=commit, endpoint=endpoint)
    with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if have and response.status_code != 206:  # the server ignored the range: start again
            have = 0
        overall.update(have)
        with open(partial, "ab" if have else "wb") as out, \
                tqdm(total=f.size, initial=have, unit="B", unit_scale=True, desc=Path(f.path).name[:30],
                     leave=False, file=sys.stderr) as bar:
            for chunk in response.iter_bytes():
                out.write(chunk)
                bar.update(len(chunk))
                overall.update(len(chunk))


def next_steps(source: Source, layout: Layout) -> str:
    """What to run (or pick) next, once ``source`` is in place."""
    if source.role == "transformer":
        folder = layout.models / source.name
        if layout.door == "a1111":
            return (f"A1111/Forge runs SMFSR bundles (the VAE and the prompt inside): `smfsr download {source.name} "
                    f"--bundle --for a1111 --a1111-dir {layout.models.parents[1]}`")
        if layout.door == "comfyui":
            return (f"in ComfyUI: SMFSR Model Loader -> model_name '{source.name}/' (official weights also need SD3.5's "
                    f"VAE and text encoders: `smfsr download sd35-medium-vae --for comfyui`, `smfsr download "
                    f"sd35-medium-encoders-fp8 --for comfyui`, what the smfsr_sd35 workflow loads), or one bundle: "
                    f"`smfsr download {source.name} --bundle --for comfyui`")
        return (f"one file for every door: `smfsr download {source.name} --bundle`; or run the folder directly: "
                f"`smfsr upscale photo.png -o out.png --model {folder} --vae {layout.vae / 'vae'} --prompt PROMPT_FILE`")
    if source.role == "vae":
        return f"use it with `--vae {layout.target(source, 'vae/config.json').parent}`" if layout.door != "comfyui" \
            else "in ComfyUI: Load VAE -> 'sd3.5_medium_vae.safetensors'"
    t5 = next(Path(p).name for p in source.patterns if Path(p).name.startswith("t5xxl"))
    if layout.door == "comfyui":
        return f"in ComfyUI: TripleCLIPLoader -> clip_l.safetensors, clip_g.safetensors, {t5}"
    e = layout.encoders / "text_encoders"
    return (f"encode a prompt with `smfsr encode-prompt -o prompt.safetensors --clip-l {e / 'clip_l.safetensors'} "
            f"--clip-g {e / 'clip_g.safetensors'} --t5 {e / t5} --tokenizers {layout.encoders}`")


def download(name: str, *, door: str = "cli", out: str | None = None, comfyui_dir: str | None = None,
             a1111_dir: str | None = None, bundle: bool = False, revision: str | None = None,
             endpoint: str | None = None, say=None) -> Path:
    """``smfsr download NAME``: returns the folder (or, with ``bundle``, the bundle file) made."""
    say = say or (lambda message: print(message, file=sys.stderr))
    if name not in SOURCES:
        raise SMFSRError(f"unknown download {name!r}; the names: {', '.join(SOURCES)}")
    if door not in DOORS:
        raise SMFSRError(f"--for must be one of {', '.join(DOORS)}, not {door!r}")
    source = SOURCES[name]
    layout = Layout.of(door, out, comfyui_dir, a1111_dir)
    if bundle and source.role != "transformer":
        raise SMFSRError(f"--bundle makes a model from a transformer (smfsr_q or smfsr_f), not from {name}")
    output = layout.models / f"{name}.safetensors"
    if bundle and output.exists():
        raise SMFSRError(f"{output} already exists; delete it first to make it again")
    fetch(source, layout, revision=revision, endpoint=endpoint, say=say)
    if not bundle:
        say("next: " + next_steps(source, layout))
        return layout.models / name if source.role == "transformer" else layout.vae
    sd35 = Layout("cli", layout.models, layout.vae if door != "comfyui" else cache_dir() / "sd3.5-medium",
                  layout.encoders if door != "comfyui" else cache_dir() / "sd3.5-medium")
    for part in ("sd35-medium-vae", "sd35-medium-encoders"):
        fetch(SOURCES[part], sd35, revision=None, endpoint=endpoint, say=say)
    path = make_bundle(source, layout.models / name, sd35, output, say)
    say("next: " + {"comfyui": f"in ComfyUI: SMFSR Model Loader -> model_name '{path.name}'",
                    "a1111": f"in A1111/Forge (after a restart): Extras -> Upscaler 'SMFSR x4 ({path.stem})'",
                    "cli": f"`smfsr upscale photo.png -o out.png --model {name if path.parent == cache_dir() else path}`"
                           " (the app and the Python API take the same)"}[door])
    return path


def make_bundle(source: Source, folder: Path, sd35: Layout, output: Path, say) -> Path:
    """The downloaded parts as one bundle (`smfsr convert` with the official prompt)."""
    from .checkpoint.convert import convert
    from .text_encoders import DEFAULT_PROMPT, encode_text, find_sources

    encoders = sd35.encoders / "text_encoders"
    sources = find_sources(None, clip_l=encoders / "clip_l.safetensors", clip_g=encoders / "clip_g.safetensors",
                           t5=encoders / "t5xxl_fp16.safetensors", tokenizers=sd35.encoders)
    say(f"converting into {output} (the prompt is encoded once; T5-XXL needs about 11 GB of RAM)")
    path = convert(folder, output, vae=sd35.vae / "vae", default_prompt=DEFAULT_PROMPT,
                   encode_text=lambda text: encode_text(sources, text, say=say),
                   license=f"see https://huggingface.co/{source.repo} and https://huggingface.co/{SD35}")
    say(f"wrote {path}")
    return path
