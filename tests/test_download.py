"""`smfsr download` against a loopback stand-in for the hub (tests/hubserver.py): files checked
against the hub's hashes, resumed after an interrupt, refused on a mismatch, and every failure one
line within seconds. Nothing here touches the internet: the hub is 127.0.0.1 or an unused port."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.hubserver import Hub, Repo

WEIGHTS = "smfsr_q/transformer/diffusion_pytorch_model.safetensors"
CONFIG = "smfsr_q/transformer/config.json"


def official_repo(size: int = 3_000_000, **switches) -> dict[str, Repo]:
    """zw121/SMFSR with a (random-byte) transformer of ``size`` bytes and its config."""
    files = {CONFIG: b'{"_class_name": "SD3Transformer2DModel"}', WEIGHTS: os.urandom(size),
             "smfsr_f/transformer/config.json": b"{}", "README.md": b"# SMFSR"}
    return {"zw121/SMFSR": Repo(files, lfs={WEIGHTS}, **switches),
            "stabilityai/stable-diffusion-3.5-medium": Repo({"vae/config.json": b"{}"}, gated=True)}


def smfsr(*args, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    environment.update({"PYTHONPATH": str(REPO), "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})})
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "smfsr.cli", *map(str, args)], capture_output=True, text=True,
                         env=environment, timeout=timeout)
    return run, time.monotonic() - start


def one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def no_model_files(folder: Path) -> bool:
    return not any(p.suffix == ".safetensors" for p in folder.rglob("*") if ".smfsr-download" not in str(p))


def test_help_lists_the_names():
    run, _ = smfsr("download", "--help")
    assert run.returncode == 0
    for name in ("smfsr_q", "smfsr_f", "sd35-medium-vae", "sd35-medium-encoders", "sd35-medium-encoders-fp8"):
        assert name in run.stdout


def test_a_download_is_checked_against_the_hubs_sha256_and_placed_for_the_cli(tmp_path):
    repos = official_repo()
    with Hub(repos) as hub:
        run, _ = smfsr("download", "smfsr_q", "-o", tmp_path / "models", "--endpoint", hub.url)
    assert run.returncode == 0, run.stderr[-3000:]
    weights = tmp_path / "models" / "smfsr_q" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = repos["zw121/SMFSR"].files[WEIGHTS]
    assert hashlib.sha256(weights.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert (weights.parent / "config.json").read_bytes() == repos["zw121/SMFSR"].files[CONFIG]
    assert not (tmp_path / "models" / "smfsr_q" / "README.md").exists()  # only the name's files
    assert "checked against the hub's hashes" in run.stderr and "next:" in run.stderr
    assert not list((tmp_path / "models").rglob(".smfsr-download-*"))  # the staging folder is gone


def test_comfyui_layout_puts_the_folder_where_the_loader_lists_it(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    with Hub(official_repo(size=1000)) as hub:
        run, _ = smfsr("download", "smfsr_q", "--for", "comfyui", "--comfyui-dir", comfy, "--endpoint", hub.url)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (comfy / "models" / "smfsr" / "smfsr_q" / "transformer" / "config.json").is_file()
    assert "model_name 'smfsr_q/'" in run.stderr


@pytest.mark.parametrize("encoders, t5", [("sd35-medium-encoders", "t5xxl_fp16.safetensors"),
                                          ("sd35-medium-encoders-fp8", "t5xxl_fp8_e4m3fn.safetensors")])
def test_comfyui_layout_puts_the_encoders_and_vae_where_its_loaders_list_them(tmp_path, encoders, t5):
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    files = {"text_encoders/clip_l.safetensors": b"l" * 100, "text_encoders/clip_g.safetensors": b"g" * 100,
             "text_encoders/t5xxl_fp16.safetensors": b"t" * 100, "text_encoders/t5xxl_fp8_e4m3fn.safetensors": b"8" * 50,
             "tokenizer/vocab.json": b"{}", "tokenizer_2/vocab.json": b"{}", "vae/config.json": b"{}",
             "vae/diffusion_pytorch_model.safetensors": b"v"}
    repos = {"stabilityai/stable-diffusion-3.5-medium": Repo(files, gated=True)}
    with Hub(repos) as hub:
        for name in ("sd35-medium-vae", encoders):
            run, _ = smfsr("download", name, "--for", "comfyui", "--comfyui-dir", comfy, "--endpoint", hub.url,
                           env={"HF_TOKEN": "hf_test_token"})
            assert run.returncode == 0, run.stderr[-2000:]
    models = comfy / "models"
    assert sorted(p.name for p in (models / "text_encoders").iterdir()) == [
        "clip_g.safetensors", "clip_l.safetensors", t5]  # only the T5 asked for; ComfyUI ships the tokenizers
    assert [p.name for p in (models / "vae").iterdir()] == ["sd3.5_medium_vae.safetensors"]
    assert f"TripleCLIPLoader -> clip_l.safetensors, clip_g.safetensors, {t5}" in run.stderr


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path):
    """The connection stalls mid-file and the process is killed; the next run asks only for the rest."""
    repos = official_repo(size=4_000_000, stall_once={WEIGHTS})
    out = tmp_path / "models"
    with Hub(repos) as hub:
        environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        environment["PYTHONPATH"] = str(REPO)
        first = subprocess.Popen([sys.executable, "-m", "smfsr.cli", "download", "smfsr_q", "-o", str(out),
                                  "--endpoint", hub.url], env=environment, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        assert hub.stalled.wait(60), "the download never started"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(p.stat().st_size >= 1_000_000 for p in out.rglob("*.part")):
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)  # killed mid-file, as a closed laptop or a Ctrl-C would
        first.wait(30)
        partial = next(out.rglob("*.part")).stat().st_size
        assert 1_000_000 <= partial <= 2_000_000
        weights = out / "smfsr_q" / "transformer" / "diffusion_pytorch_model.safetensors"
        assert not weights.exists()  # nothing at the final name looks complete
        hub.requests.clear()
        run, _ = smfsr("download", "smfsr_q", "-o", out, "--endpoint", hub.url)
    assert run.returncode == 0, run.stderr[-3000:]
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith(WEIGHTS)]
    assert ranges and ranges[-1] == f"bytes={partial}-", hub.requests  # only what was not on disk yet
    assert weights.read_bytes() == repos["zw121/SMFSR"].files[WEIGHTS]


def test_a_checksum_mismatch_deletes_the_file_and_says_so(tmp_path):
    with Hub(official_repo(corrupt={WEIGHTS})) as hub:
        run, seconds = smfsr("download", "smfsr_q", "-o", tmp_path / "models", "--endpoint", hub.url)
    line = one_line_error(run)
    assert "failed its check (its sha256 is" in line and "the file was deleted" in line
    assert no_model_files(tmp_path)


def test_a_gated_repository_says_how_to_accept_the_licence_and_log_in(tmp_path):
    with Hub(official_repo()) as hub:
        run, seconds = smfsr("download", "sd35-medium-vae", "-o", tmp_path / "models", "--endpoint", hub.url)
    line = one_line_error(run)
    assert "stabilityai/stable-diffusion-3.5-medium is gated" in line and "accept its licence" in line
    assert "hf auth login" in line and "HF_TOKEN" in line
    assert seconds < 20 and not (tmp_path / "models").exists()


def test_a_missing_repository_names_what_exists(tmp_path):
    repos = official_repo()
    repos.pop("zw121/SMFSR")
    with Hub(repos) as hub:
        run, seconds = smfsr("download", "smfsr_q", "-o", tmp_path / "models", "--endpoint", hub.url)
    line = one_line_error(run)
    assert "no repository zw121/SMFSR" in line and "404" in line
    assert "smfsr_q, smfsr_f, sd35-medium-vae, sd35-medium-encoders, sd35-medium-encoders-fp8" in line
    run, _ = smfsr("download", "smfsr_x")
    assert "unknown download 'smfsr_x'" in one_line_error(run) or "invalid choice" in run.stderr


def test_offline_and_an_unreachable_hub_fail_within_seconds_leaving_nothing(tmp_path):
    run, seconds = smfsr("download", "smfsr_q", "-o", tmp_path / "a", env={"HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE=1 is set" in one_line_error(run) and seconds < 20
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run, seconds = smfsr("download", "smfsr_q", "-o", tmp_path / "b", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    line = one_line_error(run)
    assert "cannot reach the hub at http://127.0.0.1:" in line and seconds < 20, (line, seconds)
    assert no_model_files(tmp_path) and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_not_enough_disk_or_an_unwritable_destination_is_said_before_downloading(tmp_path):
    from smfsr.download import check_room
    from smfsr.errors import SMFSRError

    with pytest.raises(SMFSRError, match=r"needs 1000000000.0 GB, [0-9.]+ GB are free"):
        check_room(tmp_path / "new", 10**18)
    (tmp_path / "a-file").write_text("not a folder")  # unwritable for root too
    with pytest.raises(SMFSRError, match="cannot write to .*a-file/models"):
        check_room(tmp_path / "a-file" / "models", 10)
    with Hub(official_repo(size=1000)) as hub:  # through the command: before any file is fetched
        run, _ = smfsr("download", "smfsr_q", "-o", tmp_path / "a-file" / "models", "--endpoint", hub.url)
    assert "cannot write to" in one_line_error(run)
    assert not any(path.endswith(WEIGHTS) for _, path, _ in hub.requests)


def test_doors_name_the_download_command_for_a_missing_official_model(tmp_path):
    run, seconds = smfsr("upscale", REPO / "samples" / "sunset_lr.png", "-o", tmp_path / "out.png",
                         "--model", "smfsr_q", env={"SMFSR_CACHE": str(tmp_path / "cache")})
    line = one_line_error(run)
    assert "smfsr download smfsr_q --bundle" in line and seconds < 20


def folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(folder)}": p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_bundle_downloads_both_publishers_parts_and_converts_them_into_one_file(tmp_path):
    """`--bundle`, end to end with tiny random networks in the real layouts: the transformer from
    zw121/SMFSR, SD3.5's VAE and single-file encoders + tokenizers from the gated repository (with a
    token), converted with the official prompt into a bundle that upscales."""
    from PIL import Image

    from smfsr.checkpoint import build_transformer
    from smfsr.models import transformer_config
    from smfsr.pipeline import SMFSRUpscaler
    from tests.helpers import TINY_TEXT, save_tiny_sd3_text_encoders, tiny_sd35_vae
    from tests.helpers import write_official_folder

    text = save_tiny_sd3_text_encoders(tmp_path / "text")
    network = build_transformer(transformer_config("tiny-official", joint_attention_dim=TINY_TEXT["t5"],
                                                   pooled_projection_dim=TINY_TEXT["clip_l"] + TINY_TEXT["clip_g"]))
    write_official_folder(tmp_path / "release" / "smfsr_q", network)
    tiny_sd35_vae().save_pretrained(tmp_path / "vae", safe_serialization=True)
    sd35 = {**folder_files(tmp_path / "vae", "vae"),
            **{f"text_encoders/{n}": text[k].read_bytes() for n, k in (("clip_l.safetensors", "clip_l"),
                                                                       ("clip_g.safetensors", "clip_g"),
                                                                       ("t5xxl_fp16.safetensors", "t5"))},
            **{name: data for t in ("tokenizer", "tokenizer_2", "tokenizer_3")
               for name, data in folder_files(text["sd35"] / t, t).items()}}
    official = folder_files(tmp_path / "release" / "smfsr_q", "smfsr_q")
    repos = {"zw121/SMFSR": Repo(official, lfs={k for k in official if k.endswith(".safetensors")}),
             "stabilityai/stable-diffusion-3.5-medium": Repo(sd35, gated=True,
                                                             lfs={k for k in sd35 if k.endswith(".safetensors")})}
    out = tmp_path / "models"
    with Hub(repos) as hub:
        run, _ = smfsr("download", "smfsr_q", "--bundle", "-o", out, "--endpoint", hub.url,
                       env={"HF_TOKEN": "hf_test_token"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = out / "smfsr_q.safetensors"
    assert f"wrote {bundle}" in run.stderr
    up = SMFSRUpscaler.from_pretrained(bundle, device="cpu", dtype="fp32")
    assert up.transformer.config.lr_key_quirk and up.prompt_embeds.shape == (1, 77 + 256, TINY_TEXT["t5"])
    assert up.defaults.prompt.startswith("Cinematic, hyper sharpness")  # the official prompt, encoded once
    assert up(Image.new("RGB", (32, 24), (90, 120, 150))).size == (128, 96)
    run, _ = smfsr("info", "smfsr_q", env={"SMFSR_CACHE": str(tmp_path)})  # the name finds the download
    assert run.returncode == 0 and "SMFSR bundle" in run.stdout, run.stderr


def test_a_hub_library_too_old_or_a_bug_is_not_called_a_network_failure(tmp_path, monkeypatch):
    """huggingface_hub before 1.0 has no httpx session (get_session().stream): refused by version
    before anything is fetched; a non-network error keeps its own type and traceback."""
    import importlib.metadata

    import huggingface_hub.utils

    from smfsr import download
    from smfsr.errors import SMFSRError

    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at its import
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.36.2" if name == "huggingface_hub" else real_version(name))
    with pytest.raises(SMFSRError, match=r"needs huggingface_hub >= 1\.0, and this Python has 0\.36\.2"):
        download.download("smfsr_q", out=str(tmp_path / "models"), endpoint="http://127.0.0.1:9", say=lambda m: None)
    monkeypatch.setattr(importlib.metadata, "version", real_version)

    class SessionWithoutStream:  # what an older huggingface_hub's requests session looks like here
        pass

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: SessionWithoutStream())
    with Hub(official_repo(size=1000)) as hub:
        with pytest.raises(AttributeError, match="stream"):
            download.download("smfsr_q", out=str(tmp_path / "models"), endpoint=hub.url, say=lambda m: None)
    # a refused connection is still the network's
    with pytest.raises(SMFSRError, match="cannot reach the hub"):
        download.download("smfsr_q", out=str(tmp_path / "models"), endpoint="http://127.0.0.1:9", say=lambda m: None)
