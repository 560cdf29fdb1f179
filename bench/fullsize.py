"""The official path at full size through the doors, on random weights in the real shapes:

    python -m bench fullsize --out DIR [--depth N] [--doors cli,python,comfyui,a1111,forge,app]
                             [--layouts stability,stability_t5fp8,comfy_org,diffusers,bundle,dual_clip]
                             [--dtype auto|fp32|bf16|fp16|fp8] [--comfyui-dir D] [--a1111-dir D]

writes the files users download (``bench.layouts``: the official SMFSR transformer folder,
Stability's sd3.5_medium.safetensors + text_encoders/, Comfy-Org's all-in-one, the diffusers
folder) under DIR (kept and reused: writing them takes minutes), then runs each
door on one 64x64 image to 256x256, each in a fresh process:
- cli: ``smfsr upscale`` with the layout's VAE and text encoders (the project's prompt encoding,
  ComfyUI's tokenizer files), or with the bundle;
- python: ``SMFSRUpscaler.from_pretrained`` + ``text_encoders.encode_text``;
- comfyui: a real ComfyUI server through its HTTP API with the shipped SD3.5 workflow for the
  layout (smfsr_sd35 for Stability's files, smfsr_sd35_all_in_one for Comfy-Org's, smfsr_sd35_dual_clip
  for dual_clip: Stability's checkpoint with CLIP-L/G only), ComfyUI's own loaders and tokenizers;
- a1111, forge, app: a real A1111 or Forge web UI through its API (Extras) and the app (``smfsr app``) through
  gradio's client, on the bundle: the layout ``bundle``, made from Stability's files (fp8 T5) by
  ``smfsr convert`` (measured as the row ``convert``), as `smfsr download --bundle` makes it.
DIR/summary.json: per door and layout ok/error (the message), wall time, peak RSS, the memory the
door's pre-load checks estimate (the SMFSR model's and the text encoders' loading peaks) and, for
the doors on the bundle, the largest pixel difference from the CLI's output on it (same seed).
Exit status 0 when every run is ok. ``--depth`` keeps every width and key pattern but only N blocks
of the SMFSR transformer and the MMDiT (the text encoders keep their real size); the default is
the real depth, 24.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOORS = ("cli", "python", "comfyui", "a1111", "forge", "app")
# stability_t5fp8: Stability's files with its t5xxl_fp8_e4m3fn instead of t5xxl_fp16 (the smfsr_sd35
# workflow's default); bundle: `smfsr convert` of the official folder with Stability's files (fp8 T5)
# dual_clip: Stability's checkpoint with CLIP-L/G only (ComfyUI's smfsr_sd35_dual_clip workflow, no T5)
LAYOUTS = ("stability", "stability_t5fp8", "comfy_org", "diffusers", "bundle", "dual_clip")
DOOR_LAYOUTS = {"cli": LAYOUTS[:5], "python": LAYOUTS[:4], "comfyui": LAYOUTS[:3] + ("dual_clip",), "a1111": ("bundle",),
                "forge": ("bundle",),
                "app": ("bundle",)}
WORKFLOW = {"stability": "smfsr_sd35", "stability_t5fp8": "smfsr_sd35", "comfy_org": "smfsr_sd35_all_in_one",
            "dual_clip": "smfsr_sd35_dual_clip"}
BUNDLE_NAME = "smfsr_q"  # A1111 lists it as "SMFSR x4 (smfsr_q)", as the app does
SEED = 0
CLI = "import sys; from smfsr.cli import main; sys.exit(main(sys.argv[1:]))"
# how the SMFSR transformer runs: (the doors' dtype, weights); auto is every door's default (fp32 on a CPU)
DTYPES = {"auto": ("auto", "auto"), "fp32": ("fp32", "auto"), "bf16": ("bf16", "auto"), "fp16": ("fp16", "auto"),
          "fp8": ("bf16", "fp8_e4m3fn")}
SIZE_IN, SIZE_OUT = 64, 256
GiB = 2**30


# ------------------------------------------------------------------------------------------------
# the weights


def write_weights(out: Path, depth: int, layouts: set[str], tokenizers: Path, say) -> dict[str, Path]:
    """Every file the chosen layouts need, skipped where an earlier run wrote it: those with
    transformer blocks under DIR/weights-d{depth}/, the rest (text encoders, diffusers folder) under
    DIR/weights/, shared by every depth."""
    from bench import layouts as L

    shared, deep = out / "weights", out / f"weights-d{depth}"
    paths = {"smfsr": deep / "smfsr" / "smfsr_q", "checkpoint": deep / "stability" / L.STABILITY_CHECKPOINT,
             **{name: shared / "stability" / "text_encoders" / file for name, file in L.ENCODER_FILES.items()},
             "all_in_one": deep / "comfy_org" / L.COMFY_ORG_CHECKPOINT, "diffusers": shared / "diffusers",
             "bundle": deep / "bundle" / f"{BUNDLE_NAME}.safetensors"}  # made by the convert door

    def step(what: str, target: Path, write) -> None:
        if target.exists():
            return
        start = time.perf_counter()
        say(f"writing {what} ...")
        write()
        say(f"  {what}: {time.perf_counter() - start:.0f} s")

    step("the SMFSR transformer", paths["smfsr"] / "transformer" / "diffusion_pytorch_model.safetensors",
         lambda: L.write_smfsr(paths["smfsr"], depth))
    if {"stability", "stability_t5fp8", "bundle", "dual_clip"} & layouts:
        fp8 = bool({"stability_t5fp8", "bundle"} & layouts)
        step(L.STABILITY_CHECKPOINT, paths["checkpoint"], lambda: L.write_stability(paths["checkpoint"], depth))
        for name in ("clip_l", "clip_g") + ("t5",) * ("stability" in layouts) + ("t5_fp8",) * fp8:
            step(L.ENCODER_FILES[name], paths[name], lambda name=name: L.write_encoder_file(paths[name], name))
    if "comfy_org" in layouts:
        step(L.COMFY_ORG_CHECKPOINT, paths["all_in_one"], lambda: L.write_comfy_org(paths["all_in_one"].parent, depth))
    if "diffusers" in layouts:
        step("the diffusers folder", paths["diffusers"] / "model_index.json",
             lambda: L.write_diffusers(paths["diffusers"], tokenizers))
    return paths


def encoder_args(layout: str, paths: dict[str, Path], tokenizers: Path) -> dict[str, str]:
    """The VAE and text-encoder options of the CLI for a layout (none for the bundle: it holds both)."""
    if layout == "bundle":
        return {}
    if layout.startswith("stability"):
        return {"vae": str(paths["checkpoint"]), "clip_l": str(paths["clip_l"]), "clip_g": str(paths["clip_g"]),
                "t5": str(paths["t5_fp8" if layout == "stability_t5fp8" else "t5"]), "tokenizers": str(tokenizers)}
    if layout == "comfy_org":
        return {"vae": str(paths["all_in_one"]), "sd35": str(paths["all_in_one"]), "tokenizers": str(tokenizers)}
    return {"vae": str(paths["diffusers"]), "sd35": str(paths["diffusers"])}


def announced(door: str, layout: str, paths: dict[str, Path], tokenizers: Path, dtype: str) -> dict[str, float]:
    """What the door's pre-load checks estimate (GiB): the SMFSR model's loading peak and, for the
    doors that encode the prompt themselves, the text encoders'."""
    import torch

    from smfsr import memory, text_encoders
    from smfsr.devices import parse_dtype

    compute, weights = DTYPES[dtype]
    compute = parse_dtype(compute, torch.device("cpu"))
    if door == "convert":  # reads the folder into fp16, the bundle's dtype
        compute, weights, layout = torch.float16, "auto", "stability_t5fp8"
    model_path = paths["bundle"] if layout == "bundle" else paths["smfsr"]
    if not Path(model_path).exists():
        return {}
    model = memory.needed_bytes(memory.stored_tensors(model_path), compute, weights != "auto")[0]
    out = {"model_gib": round(model / GiB, 2)}
    if door in ("cli", "python", "convert") and layout != "bundle":
        args = encoder_args(layout, paths, tokenizers)
        sources = text_encoders.find_sources(args.get("sd35"), clip_l=args.get("clip_l"), clip_g=args.get("clip_g"),
                                             t5=args.get("t5"), tokenizers=args.get("tokenizers"))
        out["encoders_gib"] = round(text_encoders.encoder_bytes(sources)["peak"] / GiB, 2)
    return out


# ------------------------------------------------------------------------------------------------
# the doors


def measured(command: list[str], log: Path, timeout: float) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of a command run in its own process. (Linux's
    ru_maxrss also keeps the peak of the process that forked it, this bench's: about 0.35 GiB,
    below every door's own.)"""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + timeout
        while True:  # wait4: the exit status and this process's own resource usage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error") or "Error" in line or "Killed" in line]
    return (errors or lines or ["(no output)"])[-1][:600]


PYTHON_DOOR = """
import json, sys
from PIL import Image
from smfsr.pipeline import SMFSRUpscaler
from smfsr.text_encoders import encode_text, find_sources
a = json.loads(sys.argv[1])
sources = find_sources(a.get("sd35"), clip_l=a.get("clip_l"), clip_g=a.get("clip_g"), t5=a.get("t5"),
                       tokenizers=a.get("tokenizers"))
embeds, pooled = encode_text(sources, a["prompt"], say=print)
up = SMFSRUpscaler.from_pretrained(a["model"], device="cpu", dtype=a["dtype"], weights=a["weights"], vae=a["vae"])
up.prompt_embeds, up.prompt_pooled = embeds, pooled
up(Image.open(a["image"])).save(a["output"])
"""


def run_subprocess_door(door: str, layout: str, paths: dict[str, Path], tokenizers: Path, image: Path, work: Path,
                        dtype: str, timeout: float) -> dict:
    compute, weights = DTYPES[dtype]
    args = encoder_args(layout, paths, tokenizers)
    output = work / f"{door}-{layout}.png"
    output.unlink(missing_ok=True)
    if door == "cli":
        model = paths["bundle"] if layout == "bundle" else paths["smfsr"]
        command = [sys.executable, "-c", CLI, "upscale", str(image), "-o", str(output), "--model", str(model),
                   "--device", "cpu", "--dtype", compute, "--weights", weights, "--seed", str(SEED)]
        for key, value in args.items():
            command += [f"--{key.replace('_', '-')}", value]
    else:
        from smfsr.text_encoders import DEFAULT_PROMPT

        command = [sys.executable, "-c", PYTHON_DOOR, json.dumps(
            {**args, "model": str(paths["smfsr"]), "dtype": compute, "weights": weights, "image": str(image),
             "output": str(output), "prompt": DEFAULT_PROMPT})]
    log = work / f"{door}-{layout}.log"
    status, wall, rss = measured(command, log, timeout)
    row = {"door": door, "layout": layout, "wall_s": round(wall, 1), "peak_rss_gib": round(rss / GiB, 2)}
    return {**row, **check_output(output, status, log)}


def run_convert(paths: dict[str, Path], tokenizers: Path, work: Path, timeout: float) -> dict:
    """`smfsr convert` of the official folder with Stability's files (fp8 T5) into the bundle the
    a1111 and app doors load, made anew each run (it is measured)."""
    bundle = paths["bundle"]
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.unlink(missing_ok=True)
    command = [sys.executable, "-c", CLI, "convert", "--transformer", str(paths["smfsr"]), "-o", str(bundle)]
    for key, value in encoder_args("stability_t5fp8", paths, tokenizers).items():
        command += [f"--{key.replace('_', '-')}", value]
    log = work / "convert.log"
    status, wall, rss = measured(command, log, timeout)
    row = {"door": "convert", "layout": "stability_t5fp8", "wall_s": round(wall, 1), "peak_rss_gib": round(rss / GiB, 2)}
    if status != 0 or not bundle.exists():
        return {**row, "ok": False, "error": f"exit status {status}: {last_error(log)}"}
    return {**row, "ok": True, "error": None, "bundle_gib": round(bundle.stat().st_size / GiB, 2)}


def run_a1111(paths: dict[str, Path], image: Path, work: Path, dtype: str, a1111_dir: str, python: str,
              timeout: float, door: str = "a1111", model: Path | None = None, tag: str = "bundle") -> dict:
    """Extras in a real A1111, or Forge with ``door`` "forge" (API only, CPU), with the bundle (or
    ``model``, its rows and files named by ``tag``) in models/SMFSR, seed fixed."""
    from bench.a1111_server import a1111
    from bench.comfyui_server import link_models

    compute, weights = DTYPES[dtype]
    model = model or paths["bundle"]
    data = work / door
    link_models(data, {f"SMFSR/{model.name}": model})
    output = work / f"{door}-{tag}.png"
    output.unlink(missing_ok=True)
    row, error = {"door": door, "layout": tag}, None
    host = "Forge" if door == "forge" else "A1111"
    start = time.perf_counter()
    try:
        with a1111(data, a1111_dir, python, no_half=compute in ("auto", "fp32"), forge=door == "forge") as server:
            row["startup_s"] = round(time.perf_counter() - start, 1)
            settings = {"upscaling_max_images_in_cache": 0, "smfsr_seed": SEED, "smfsr_weights": weights,
                        "smfsr_dtype": compute if compute != "fp32" else "auto"}  # fp32: --no-half
            server.call("/sdapi/v1/options", settings)
            said_before = len(server.log())
            started = time.perf_counter()
            try:
                output.write_bytes(server.extras(image, f"SMFSR x4 ({model.stem})", SIZE_OUT / SIZE_IN,
                                                 timeout=timeout))
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
                if server.process.poll() is not None:
                    error = killed_or_exited(host, server.process.returncode, error)
            row["wall_s"] = round(time.perf_counter() - started, 1)
            said = server.log()[said_before:]
            try:
                row["peak_rss_gib"] = round(server.peak_rss() / GiB, 2)
            except (OSError, StopIteration):
                row["peak_rss_gib"] = None
    except RuntimeError as e:
        error, said = str(e)[-600:], ""
    log = work / f"{door}-{tag}.log"
    log.write_text((data / "webui.log").read_text(errors="replace"))
    if error is None and output.exists() and "Traceback" in said and is_lanczos(output, image):
        # A1111 answers a failed upscaler with a Lanczos resize and HTTP 200: the error is in its log
        # (an output close to Lanczos alone is no failure: a smooth input upscales close to it)
        error = f"{host} fell back to Lanczos: {last_error(log)}"
    return {**row, **check_output(output, 0, None, error)}


def run_app(paths: dict[str, Path], image: Path, work: Path, dtype: str, timeout: float, model: Path | None = None,
            tag: str = "bundle") -> dict:
    """The app as a user starts it (`smfsr app --model BUNDLE`, or ``model``, its rows and files named
    by ``tag``), driven through gradio's client."""
    from gradio_client import Client, handle_file

    from bench.comfyui_server import free_port, peak_rss, stop

    compute, weights = DTYPES[dtype]
    model = model or paths["bundle"]
    output = work / f"app-{tag}.png"
    output.unlink(missing_ok=True)
    port = free_port()
    log_path = work / f"app-{tag}.log"
    row, error = {"door": "app", "layout": tag}, None
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CLI, "app", "--model", str(model), "--device", "cpu",
                                 "--dtype", compute, "--weights", weights, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        start, client = time.perf_counter(), None
        try:
            while client is None:
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                except Exception:
                    if proc.poll() is not None or time.perf_counter() - start > 180:
                        raise RuntimeError(f"the app did not start: {last_error(log_path)}") from None
                    time.sleep(1)
            row["startup_s"] = round(time.perf_counter() - start, 1)
            started = time.perf_counter()
            try:
                _, downloads, status = client.predict([handle_file(str(image))], f"SMFSR x4 ({model.stem})",
                                                      SIZE_OUT / SIZE_IN, SEED, 0, 0, "auto", api_name="/upscale")
                output.write_bytes(Path(downloads[0]).read_bytes())
            except Exception as e:  # gradio_client raises its own AppError with the page's message
                error = f"{type(e).__name__}: {e}"[:600]
                if proc.poll() is not None:
                    error = killed_or_exited("the app", proc.returncode, error)
            row["wall_s"] = round(time.perf_counter() - started, 1)
            try:
                row["peak_rss_gib"] = round(peak_rss(proc.pid) / GiB, 2)
            except (OSError, StopIteration):
                row["peak_rss_gib"] = None
        except RuntimeError as e:
            error = str(e)
        finally:
            stop(proc)
    return {**row, **check_output(output, 0, None, error)}


def killed_or_exited(host: str, code: int, error: str) -> str:
    return (f"{host} was killed (SIGKILL: most likely the OS out of memory)" if code == -9
            else f"{host} exited with status {code}") + f" while running ({error})"


def is_lanczos(output: Path, image: Path) -> bool:
    """Within one level of a Lanczos resize of the input almost everywhere (A1111's fallback)."""
    import numpy as np
    from PIL import Image

    got = np.asarray(Image.open(output).convert("RGB")).astype(int)
    with Image.open(image) as im:
        lanczos = np.asarray(im.convert("RGB").resize(got.shape[1::-1], Image.Resampling.LANCZOS)).astype(int)
    return got.shape == lanczos.shape and (np.abs(got - lanczos) > 1).mean() < 0.01


def max_difference(a: Path, b: Path) -> int | None:
    """The largest per-channel difference (0-255) of two images of one size, None if either is absent."""
    import numpy as np
    from PIL import Image

    if not (a.exists() and b.exists()):
        return None
    x, y = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (a, b))
    return int(np.abs(x - y).max()) if x.shape == y.shape else None


def check_output(output: Path, status: int, log: Path | None, error: str | None = None) -> dict:
    """ok when the door exited 0 and wrote a 256x256 image."""
    if status != 0 or error is not None:
        return {"ok": False, "error": error or f"exit status {status}: {last_error(log)}"}
    if not output.exists():
        return {"ok": False, "error": f"no output image ({output.name})"}
    from PIL import Image

    size = Image.open(output).size
    if size != (SIZE_OUT, SIZE_OUT):
        return {"ok": False, "error": f"output is {size[0]}x{size[1]}, expected {SIZE_OUT}x{SIZE_OUT}"}
    return {"ok": True, "error": None}


def comfyui_links(layout: str, paths: dict[str, Path]) -> dict[str, Path]:
    from bench import layouts as L

    links = {"smfsr/smfsr_q": paths["smfsr"]}
    if layout.startswith("stability") or layout == "dual_clip":
        links["checkpoints/" + L.STABILITY_CHECKPOINT] = paths["checkpoint"]
        t5 = () if layout == "dual_clip" else ("t5_fp8",) if layout == "stability_t5fp8" else ("t5",)
        links.update({f"text_encoders/{L.ENCODER_FILES[n]}": paths[n] for n in ("clip_l", "clip_g", *t5)})
    else:
        links["checkpoints/" + L.COMFY_ORG_CHECKPOINT] = paths["all_in_one"]
    return links


def comfyui_prompt(layout: str, dtype: str) -> dict:
    """The shipped workflow as a user runs it: the official folder picked in the loader, the image."""
    from bench.comfyui_server import REPO

    prompt = json.loads((REPO / "workflows" / "api" / f"{WORKFLOW[layout]}.json").read_text())
    compute, weights = DTYPES[dtype]
    for node in prompt.values():
        if node["class_type"] == "SMFSRModelLoader":
            node["inputs"].update(model_name="smfsr_q/", dtype=compute, weights=weights)
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "input.png"
        if node["class_type"] == "TripleCLIPLoader" and layout == "stability_t5fp8":
            node["inputs"]["clip_name3"] = "t5xxl_fp8_e4m3fn.safetensors"
    return prompt


def run_comfyui(layout: str, paths: dict[str, Path], image: Path, work: Path, dtype: str, comfyui_dir: str,
                python: str, timeout: float) -> dict:
    import shutil

    from bench.comfyui_server import comfyui, error_message, link_models, prepare_base

    base = prepare_base(work / f"comfyui-{layout}")
    link_models(base, comfyui_links(layout, paths))
    shutil.copy(image, base / "input" / "input.png")
    output = work / f"comfyui-{layout}.png"
    output.unlink(missing_ok=True)
    row = {"door": "comfyui", "layout": layout, "workflow": WORKFLOW[layout]}
    start = time.perf_counter()
    try:
        with comfyui(base, comfyui_dir, python) as server:
            row["startup_s"] = round(time.perf_counter() - start, 1)
            started = time.perf_counter()
            try:
                entry = server.run(comfyui_prompt(layout, dtype), timeout=timeout)
                error = error_message(entry)
                if error is None:
                    output.write_bytes(server.output_file(entry))
            except (RuntimeError, TimeoutError, AssertionError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
                if server.process.poll() is not None:  # a server that dies stops answering first
                    error = killed_or_exited("ComfyUI", server.process.returncode, error)
            row["wall_s"] = round(time.perf_counter() - started, 1)
            try:
                row["peak_rss_gib"] = round(server.peak_rss() / GiB, 2)
            except (OSError, StopIteration):
                row["peak_rss_gib"] = None  # the server died (the OS may have killed it)
    except RuntimeError as e:
        error = str(e)[-600:]
    log = (base / "comfyui.log").read_text(errors="replace")
    (work / f"comfyui-{layout}.log").write_text(log)
    # ComfyUI's own loaders list the weights they expected and did not find (at --depth < 24, the
    # MMDiT blocks left out); at full depth there must be none
    row["host_missing"] = [line.strip()[:300] for line in log.splitlines() if "missing:" in line]
    if error and "exited" in error:
        error += f" (its log: {last_error(base / 'comfyui.log')})"
    return {**row, **check_output(output, 0, None, error)}


# ------------------------------------------------------------------------------------------------


def input_image(path: Path) -> Path:
    """A 64x64 crop of the shipped sample photo."""
    from PIL import Image

    from bench.comfyui_server import REPO

    if not path.exists():
        with Image.open(REPO / "samples" / "sunset_lr.png") as im:
            im.convert("RGB").crop((0, 0, SIZE_IN, SIZE_IN)).save(path)
    return path


def table(rows: list[dict]) -> str:
    lines = ["| door | layout | ok | wall s | peak RSS GiB | estimated GiB (model / encoders) | max diff vs CLI | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = f"{r.get('model_gib', '-')} / {r.get('encoders_gib', '-')}"
        lines.append(f"| {r['door']} | {r['layout']} | {'yes' if r['ok'] else 'no'} | {r.get('wall_s', '-')} | "
                     f"{r.get('peak_rss_gib', '-')} | {est} | {r.get('max_diff_vs_cli', '-')} | "
                     f"{(r['error'] or '').replace('|', '/')[:200]} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench fullsize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the weights (tens of GB at full depth) and results")
    parser.add_argument("--depth", type=int, default=24, help="transformer blocks of the SMFSR transformer and the "
                        "MMDiT (default 24, the real depth)")
    parser.add_argument("--doors", default=",".join(DOORS), help=f"comma-separated, of {', '.join(DOORS)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)} "
                        "(stability_t5fp8: Stability's files with t5xxl_fp8_e4m3fn)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="how the SMFSR transformer runs "
                        "(default auto, each door's default: fp32 on a CPU; fp8: fp8_e4m3fn weights, bf16 compute; "
                        "fp16 needs a GPU)")
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"), help="a ComfyUI checkout (default "
                        "$COMFYUI_DIR); its tokenizer files serve every door")
    parser.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON", sys.executable))
    parser.add_argument("--a1111-dir", default=os.environ.get("A1111_DIR"), help="an A1111 checkout for the a1111 "
                        "door (default $A1111_DIR)")
    parser.add_argument("--a1111-python", default=os.environ.get("A1111_PYTHON", sys.executable))
    parser.add_argument("--forge-dir", default=os.environ.get("FORGE_DIR"), help="a Forge checkout for the forge door "
                        "(default $FORGE_DIR)")
    parser.add_argument("--forge-python", default=os.environ.get("FORGE_PYTHON", sys.executable))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per door run")
    args = parser.parse_args(argv)
    args.doors = [d for d in args.doors.split(",") if d]
    args.layouts = [x for x in args.layouts.split(",") if x]
    unknown = [d for d in args.doors if d not in DOORS]
    if unknown:
        parser.error(f"unknown door(s) {', '.join(unknown)}; this bench runs {', '.join(DOORS)}")
    if any(x not in LAYOUTS for x in args.layouts):
        parser.error(f"--layouts takes {', '.join(LAYOUTS)}")
    if not 1 <= args.depth <= 24:
        parser.error("--depth is 1 to 24")
    if "a1111" in args.doors and not (args.a1111_dir and (Path(args.a1111_dir) / "launch.py").exists()):
        parser.error("the a1111 door needs an A1111 checkout (--a1111-dir or $A1111_DIR) with this extension's "
                     "requirements installed in its Python (--a1111-python, `python install.py`)")
    if "forge" in args.doors and not (args.forge_dir and (Path(args.forge_dir) / "launch.py").exists()):
        parser.error("the forge door needs a Forge checkout (--forge-dir or $FORGE_DIR) with this extension's "
                     "requirements installed in its Python (--forge-python, `python install.py`)")
    if {"a1111", "forge", "app"} & set(args.doors) and "bundle" not in args.layouts:
        parser.error("the a1111, forge and app doors run the bundle: add bundle to --layouts")
    if not args.comfyui_dir or not (Path(args.comfyui_dir) / "comfy" / "sd1_tokenizer").is_dir():
        parser.error("needs a ComfyUI checkout (--comfyui-dir or $COMFYUI_DIR): its tokenizer files serve every "
                     "door, and the comfyui door runs it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizers = Path(args.comfyui_dir)

    def say(message: str) -> None:
        print(message, flush=True)

    runs = [(door, layout) for door in args.doors for layout in DOOR_LAYOUTS[door] if layout in args.layouts]
    if any(layout == "bundle" for _, layout in runs):  # made first, by the CLI's convert
        runs.insert(min(i for i, (_, layout) in enumerate(runs) if layout == "bundle"), ("convert", "bundle"))
    if ("cli", "bundle") not in runs:  # the reference pixels must come from this run
        (out / "cli-bundle.png").unlink(missing_ok=True)
    started = time.perf_counter()
    paths = write_weights(out, args.depth, set(args.layouts), tokenizers, say)
    image = input_image(out / "input.png")
    rows = []
    for door, layout in runs:
        say(f"{door} / {layout} ...")
        if door == "comfyui":
            row = run_comfyui(layout, paths, image, out, args.dtype, args.comfyui_dir, args.comfyui_python,
                              args.timeout)
        elif door == "convert":
            row = run_convert(paths, tokenizers, out, args.timeout)
        elif door == "a1111":
            row = run_a1111(paths, image, out, args.dtype, args.a1111_dir, args.a1111_python, args.timeout)
        elif door == "forge":
            row = run_a1111(paths, image, out, args.dtype, args.forge_dir, args.forge_python, args.timeout, "forge")
        elif door == "app":
            row = run_app(paths, image, out, args.dtype, args.timeout)
        else:
            row = run_subprocess_door(door, layout, paths, tokenizers, image, out, args.dtype, args.timeout)
        row.update(announced(door, layout, paths, tokenizers, args.dtype))
        if layout == "bundle" and door in ("a1111", "forge", "app"):  # the same bundle and seed as the CLI's row
            row["max_diff_vs_cli"] = max_difference(out / f"{door}-bundle.png", out / "cli-bundle.png")
        say(f"  {'ok' if row['ok'] else 'FAILED: ' + row['error']} ({row.get('wall_s')} s, "
            f"peak {row.get('peak_rss_gib')} GiB)")
        rows.append(row)
        summary = {"depth": args.depth, "dtype": args.dtype, "size": f"{SIZE_IN}->{SIZE_OUT}", "runs": rows,
                   "minutes": round((time.perf_counter() - started) / 60, 1)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # after each run: hours at full size
    print(table(rows))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
