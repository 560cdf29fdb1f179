"""The official path at full size through the doors, on random weights in the real shapes:

    python -m bench fullsize --out DIR [--depth N] [--doors cli,python,comfyui] [--dtype auto|fp32|bf16|fp16|fp8]
                             [--layouts stability,stability_t5fp8,comfy_org,diffusers] [--comfyui-dir D]

writes the files users download (``bench.layouts``: the official SMFSR transformer folder,
Stability's sd3.5_medium.safetensors + text_encoders/, Comfy-Org's all-in-one, the diffusers
folder) under DIR (kept and reused: writing them takes minutes), then runs each
door on one 64x64 image to 256x256, each in a fresh process:
- cli: ``smfsr upscale`` with the layout's VAE and text encoders (the project's prompt encoding,
  ComfyUI's tokenizer files);
- python: ``SMFSRUpscaler.from_pretrained`` + ``text_encoders.encode_text``;
- comfyui: a real ComfyUI server through its HTTP API with the shipped SD3.5 workflow for the
  layout (smfsr_sd35 for Stability's files, smfsr_sd35_all_in_one for Comfy-Org's), ComfyUI's own
  loaders and tokenizers.
DIR/summary.json: per door and layout ok/error (the message), wall time, peak RSS, and the memory
the door's pre-load checks estimate (the SMFSR model's and the text encoders' loading peaks).
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

DOORS = ("cli", "python", "comfyui")
# stability_t5fp8: Stability's files with its t5xxl_fp8_e4m3fn instead of t5xxl_fp16 (in ComfyUI: picked in
# the shipped workflow's Triple CLIP loader)
LAYOUTS = ("stability", "stability_t5fp8", "comfy_org", "diffusers")
DOOR_LAYOUTS = {"cli": LAYOUTS, "python": LAYOUTS, "comfyui": LAYOUTS[:3]}
WORKFLOW = {"stability": "smfsr_sd35", "stability_t5fp8": "smfsr_sd35", "comfy_org": "smfsr_sd35_all_in_one"}
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
             "all_in_one": deep / "comfy_org" / L.COMFY_ORG_CHECKPOINT, "diffusers": shared / "diffusers"}

    def step(what: str, target: Path, write) -> None:
        if target.exists():
            return
        start = time.perf_counter()
        say(f"writing {what} ...")
        write()
        say(f"  {what}: {time.perf_counter() - start:.0f} s")

    step("the SMFSR transformer", paths["smfsr"] / "transformer" / "diffusion_pytorch_model.safetensors",
         lambda: L.write_smfsr(paths["smfsr"], depth))
    if {"stability", "stability_t5fp8"} & layouts:
        step(L.STABILITY_CHECKPOINT, paths["checkpoint"], lambda: L.write_stability(paths["checkpoint"], depth))
        for name in ("clip_l", "clip_g") + ("t5",) * ("stability" in layouts) + ("t5_fp8",) * ("stability_t5fp8" in layouts):
            step(L.ENCODER_FILES[name], paths[name], lambda name=name: L.write_encoder_file(paths[name], name))
    if "comfy_org" in layouts:
        step(L.COMFY_ORG_CHECKPOINT, paths["all_in_one"], lambda: L.write_comfy_org(paths["all_in_one"].parent, depth))
    if "diffusers" in layouts:
        step("the diffusers folder", paths["diffusers"] / "model_index.json",
             lambda: L.write_diffusers(paths["diffusers"], tokenizers))
    return paths


def encoder_args(layout: str, paths: dict[str, Path], tokenizers: Path) -> dict[str, str]:
    """The VAE and text-encoder options of the CLI for a layout."""
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
    model = memory.needed_bytes(memory.stored_tensors(paths["smfsr"]), parse_dtype(compute, torch.device("cpu")),
                                weights != "auto")[0]
    out = {"model_gib": round(model / GiB, 2)}
    if door != "comfyui":
        args = encoder_args(layout, paths, tokenizers)
        sources = text_encoders.find_sources(args.get("sd35"), clip_l=args.get("clip_l"), clip_g=args.get("clip_g"),
                                             t5=args.get("t5"), tokenizers=args.get("tokenizers"))
        out["encoders_gib"] = round(text_encoders.encoder_bytes(sources)["peak"] / GiB, 2)
    return out


# ------------------------------------------------------------------------------------------------
# the doors


def measured(command: list[str], log: Path, timeout: float) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of a command run in its own process."""
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
        command = [sys.executable, "-c", "import sys; from smfsr.cli import main; sys.exit(main(sys.argv[1:]))",
                   "upscale", str(image), "-o", str(output), "--model", str(paths["smfsr"]), "--device", "cpu",
                   "--dtype", compute, "--weights", weights]
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
    if layout.startswith("stability"):
        links["checkpoints/" + L.STABILITY_CHECKPOINT] = paths["checkpoint"]
        t5 = "t5_fp8" if layout == "stability_t5fp8" else "t5"
        links.update({f"text_encoders/{L.ENCODER_FILES[n]}": paths[n] for n in ("clip_l", "clip_g", t5)})
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
                    code = server.process.returncode
                    error = ("ComfyUI was killed (SIGKILL: most likely the OS out of memory)" if code == -9
                             else f"ComfyUI exited with status {code}") + f" while running the prompt ({error})"
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
    lines = ["| door | layout | ok | wall s | peak RSS GiB | estimated GiB (model / encoders) | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = f"{r.get('model_gib', '-')} / {r.get('encoders_gib', '-')}"
        lines.append(f"| {r['door']} | {r['layout']} | {'yes' if r['ok'] else 'no'} | {r.get('wall_s', '-')} | "
                     f"{r.get('peak_rss_gib', '-')} | {est} | {(r['error'] or '').replace('|', '/')[:200]} |")
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
    started = time.perf_counter()
    paths = write_weights(out, args.depth, set(args.layouts), tokenizers, say)
    image = input_image(out / "input.png")
    rows = []
    for door, layout in runs:
        say(f"{door} / {layout} ...")
        if door == "comfyui":
            row = run_comfyui(layout, paths, image, out, args.dtype, args.comfyui_dir, args.comfyui_python,
                              args.timeout)
        else:
            row = run_subprocess_door(door, layout, paths, tokenizers, image, out, args.dtype, args.timeout)
        row.update(announced(door, layout, paths, tokenizers, args.dtype))
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
