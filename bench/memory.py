"""Each door's memory estimate against the peak it reaches:

    python -m bench memory --out DIR [--models small,small_q,sd35_d2,sd35_d24]
                           [--doors cli,python,comfyui,a1111,forge,app] [--no-write]

runs every door, each in a fresh process (a web UI or ComfyUI: a fresh server), on one 64x64 image to
256x256 with each model: the two shipped ones and the SD3.5-sized bundle (random weights in the real
shapes, made as ``python -m bench fullsize`` makes it: the official folder converted with
Stability's files and the fp8 T5) at depth 2 and 24 (the real one). The estimate is the one the
door itself logs before the model loads (``smfsr.memory.Estimate``: the process before the load +
the larger of the load's peak and the loaded networks plus the working memory at the model's
process size); the measured peak is the process's peak RSS (for a server, over its whole life:
start-up included). A row is within bounds when the estimate is -10% to +25% of the measured peak.
The table goes to bench/RESULTS.md (unless --no-write) and DIR/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import fullsize as F
from bench.harness import Table, report

REPO = Path(__file__).resolve().parents[1]
DOORS = ("cli", "python", "comfyui", "a1111", "forge", "app")
SHIPPED = {"small": REPO / "models" / "smfsr-small-x4.safetensors",
           "small_q": REPO / "models" / "smfsr-small-x4-q.safetensors"}
MODELS = (*SHIPPED, "sd35_d2", "sd35_d24")
BOUNDS = (-0.10, 0.25)  # the estimate against the measured peak
ESTIMATE = re.compile(r"peaks at about ([\d.]+) GiB")

PYTHON_DOOR = """
import json, logging, sys
from PIL import Image
from smfsr.pipeline import SMFSRUpscaler
logging.basicConfig(level=logging.WARNING)
logging.getLogger("smfsr").setLevel(logging.INFO)
a = json.loads(sys.argv[1])
up = SMFSRUpscaler.from_pretrained(a["model"], device="cpu")
up(Image.open(a["image"])).save(a["output"])  # seed 0, every door's default
"""


def sd35_bundle(out: Path, depth: int, tokenizers: Path, timeout: float, say) -> Path:
    """The SD3.5-sized bundle at ``depth``, made once under DIR (as ``bench fullsize`` makes it)."""
    paths = F.write_weights(out, depth, {"bundle"}, tokenizers, say)
    if not paths["bundle"].exists():
        say(f"converting the depth-{depth} folder into a bundle ...")
        row = F.run_convert(paths, tokenizers, out, timeout)
        if not row["ok"]:
            raise RuntimeError(f"smfsr convert failed: {row['error']}")
    return paths["bundle"]


def run_process(door: str, model: Path, tag: str, image: Path, work: Path, timeout: float) -> dict:
    """The CLI (``smfsr upscale --verbose``) or the Python API in a fresh process."""
    output = work / f"{door}-{tag}.png"
    output.unlink(missing_ok=True)
    if door == "cli":
        command = [sys.executable, "-c", F.CLI, "upscale", str(image), "-o", str(output), "--model", str(model),
                   "--device", "cpu", "--seed", str(F.SEED), "--verbose"]
    else:
        command = [sys.executable, "-c", PYTHON_DOOR,
                   json.dumps({"model": str(model), "image": str(image), "output": str(output)})]
    log = work / f"{door}-{tag}.log"
    status, wall, rss = F.measured(command, log, timeout)
    row = {"door": door, "layout": tag, "wall_s": round(wall, 1), "peak_rss_gib": round(rss / F.GiB, 2)}
    return {**row, **F.check_output(output, status, log)}


def run_comfyui(model: Path, tag: str, image: Path, work: Path, comfyui_dir: str, python: str, timeout: float) -> dict:
    """The shipped ``smfsr_upscale`` workflow (loader + all-in-one node) in a real ComfyUI."""
    from bench.comfyui_server import comfyui, error_message, link_models, prepare_base

    base = prepare_base(work / f"comfyui-{tag}")
    link_models(base, {f"smfsr/{model.name}": model})
    shutil.copy(image, base / "input" / "input.png")
    prompt = json.loads((REPO / "workflows" / "api" / "smfsr_upscale.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "SMFSRModelLoader":
            node["inputs"]["model_name"] = model.name
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "input.png"
    output = work / f"comfyui-{tag}.png"
    output.unlink(missing_ok=True)
    row, error = {"door": "comfyui", "layout": tag}, None
    try:
        with comfyui(base, comfyui_dir, python) as server:
            started = time.perf_counter()
            try:
                entry = server.run(prompt, timeout=timeout)
                error = error_message(entry)
                if error is None:
                    output.write_bytes(server.output_file(entry))
            except (RuntimeError, TimeoutError, AssertionError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
            row["wall_s"] = round(time.perf_counter() - started, 1)
            row["peak_rss_gib"] = round(server.peak_rss() / F.GiB, 2)
    except RuntimeError as e:
        error = str(e)[-600:]
    (work / f"comfyui-{tag}.log").write_text((base / "comfyui.log").read_text(errors="replace"))
    return {**row, **F.check_output(output, 0, None, error)}


def logged_estimate(log: Path) -> float | None:
    """The last estimate the door logged (GiB)."""
    if not log.exists():
        return None
    found = ESTIMATE.findall(log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the SD3.5-sized weights (tens of GB with depth 24), "
                        "the outputs and the logs")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--doors", default=",".join(DOORS), help=f"comma-separated, of {', '.join(DOORS)}")
    parser.add_argument("--no-write", action="store_true", help="print, don't append to bench/RESULTS.md")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per door run")
    for host in ("comfyui", "a1111", "forge"):
        parser.add_argument(f"--{host}-dir", default=os.environ.get(f"{host.upper()}_DIR"))
        parser.add_argument(f"--{host}-python", default=os.environ.get(f"{host.upper()}_PYTHON", sys.executable))
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.doors = [d for d in args.doors.split(",") if d]
    if any(m not in MODELS for m in args.models) or any(d not in DOORS for d in args.doors):
        parser.error(f"--models takes {', '.join(MODELS)}; --doors takes {', '.join(DOORS)}")
    for host in ("comfyui", "a1111", "forge"):
        folder = getattr(args, f"{host}_dir")
        needed = host in args.doors or (host == "comfyui" and any(m.startswith("sd35") for m in args.models))
        if needed and not (folder and Path(folder).is_dir()):
            parser.error(f"the {host} door (and, for ComfyUI, the SD3.5 tokenizer files) needs --{host}-dir or "
                         f"${host.upper()}_DIR: `eval \"$(../shared/hosts/setup.sh comfyui a1111-stock forge)\"`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    work = out / "memory"
    work.mkdir(parents=True, exist_ok=True)
    image = F.input_image(out / "input.png")

    def say(message: str) -> None:
        print(message, flush=True)

    rows = []
    for name in args.models:
        model = SHIPPED.get(name) or sd35_bundle(out, int(name.split("_d")[1]), Path(args.comfyui_dir),
                                                 args.timeout, say)
        for door in args.doors:
            say(f"{door} / {name} ...")
            if door in ("cli", "python"):
                row = run_process(door, model, name, image, work, args.timeout)
            elif door == "comfyui":
                row = run_comfyui(model, name, image, work, args.comfyui_dir, args.comfyui_python, args.timeout)
            elif door in ("a1111", "forge"):
                row = F.run_a1111({}, image, work, "auto", getattr(args, f"{door}_dir"),
                                  getattr(args, f"{door}_python"), args.timeout, door, model=model, tag=name)
            else:
                row = F.run_app({}, image, work, "auto", args.timeout, model=model, tag=name)
            row["estimated_gib"] = logged_estimate(work / f"{door}-{name}.log")
            if row["estimated_gib"] and row.get("peak_rss_gib"):
                row["error_vs_measured"] = round(row["estimated_gib"] / row["peak_rss_gib"] - 1, 3)
            say(f"  {'ok' if row['ok'] else 'FAILED: ' + str(row['error'])}: peak {row.get('peak_rss_gib')} GiB, "
                f"estimated {row['estimated_gib']} GiB")
            rows.append(row)
            (out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = Table("Memory: each door's estimate against its measured peak RSS (64x64 -> 256x256, CPU, fp32)",
                  ["door", "model", "ok", "peak RSS GiB", "estimated GiB", "estimate vs peak", "within -10% / +25%"])
    for r in rows:
        error = r.get("error_vs_measured")
        within = error is not None and BOUNDS[0] <= error <= BOUNDS[1]
        table.add(r["door"], r["layout"], "yes" if r["ok"] else f"no: {str(r['error'])[:120]}",
                  str(r.get("peak_rss_gib", "-")), str(r.get("estimated_gib") or "-"),
                  f"{error:+.1%}" if error is not None else "-", "yes" if within else "NO")
    table.notes.append(f"`python -m bench memory {' '.join(argv or sys.argv[2:])}`; each door in a fresh process, "
                       "its estimate as it logs it before the model loads")
    report([table], write=not args.no_write)
    ok = all(r["ok"] and r.get("error_vs_measured") is not None and BOUNDS[0] <= r["error_vs_measured"] <= BOUNDS[1]
             for r in rows)
    return 0 if rows and ok else 1


if __name__ == "__main__":
    sys.exit(main())
