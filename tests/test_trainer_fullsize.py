"""Trainer III: what a researcher needs before renting GPUs. The dry run of the SD3.5 config
(meta device: counts and per-GPU memory, small RSS), every stage as a LoRA with merged and
adapter-only export, FSDP on two CPU processes (gloo) with resume and an export that matches an
unsharded run, and config errors that come before any network is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from smfsr.pipeline import SMFSRUpscaler
from tests.helpers import TINY_TRAIN_CONFIG, photo_folder, train

REPO = Path(__file__).resolve().parents[1]
SD35 = str(REPO / "smfsr_trainer" / "configs" / "sd35-medium.yaml")
FSDP_CONFIG = str(REPO / "smfsr_trainer" / "configs" / "accelerate_fsdp.yaml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("photos"), 8)


@pytest.fixture(scope="module")
def teacher(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return train(photos, out, "--stage", "flow", "--max-steps", "6")


def run_trainer(*args: str, launch: list[str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "accelerate.commands.launch", *launch] if launch else [sys.executable]
    return subprocess.run([*prefix, str(REPO / "smfsr_trainer" / "train.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)


# --- the dry run ----------------------------------------------------------------------------------

def test_dry_run_of_the_sd35_config_counts_every_network_on_meta_in_seconds():
    # the trainer run as a script, then its own peak RSS
    script = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__'); "
              "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script, str(REPO / "smfsr_trainer" / "train.py"), "--config", SD35,
                             "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    # the student (official SMFSR shapes: the teacher's + the interval embedding) and the DiT4SR teacher
    assert "student                      2.731 B       2.514 B" in out  # less the modules it never runs
    assert "teacher                      2.717 B       0.000 B" in out
    assert "shapes of preset dit4sr-sd35-medium" in out and "shapes of VAE preset sd35" in out
    # full fine-tune, fp32 AdamW: 16 bytes per trained parameter, + the EMA's 4; the unused modules frozen in bf16
    assert "10.49 / 10.06 / 20.11 / 10.06" in out
    assert "on one GPU of 24 GB: does not fit; 48 GB: does not fit; 80 GB: fits" in out
    peak_kib = int(result.stderr.split("peak_rss_kib")[-1].split()[0])
    assert peak_kib < 4 * 1024 * 1024, f"dry run RSS {peak_kib / 1024:.0f} MiB"


def test_dry_run_shards_what_trains_and_counts_lora_and_the_shared_fake_score():
    from smfsr_trainer.config import load_config
    from smfsr_trainer.dry_run import GB, plan
    from smfsr_trainer.stages import get_stage

    def planned(*args, processes=1, sharding="none"):
        config, _ = load_config(["--config", SD35, *args])
        return plan(config, get_stage(config.stage), processes, sharding)

    full, sharded = planned(), planned(processes=8, sharding="fsdp")
    student = full.networks[0]
    assert sharded.networks[0].per_process(8, True)["optimizer"] == pytest.approx(
        student.per_process(1, False)["optimizer"] / 8)
    teacher = {n.name: n for n in sharded.networks}["teacher"]  # frozen: replicated on every GPU
    assert teacher.per_process(8, True)["weights"] == teacher.frozen_bytes == 2 * teacher.total  # bf16
    assert sharded.totals()["total"] < full.totals()["total"] / 3
    lora = planned("--trainable", "lora", "--lora-rank", "16")
    s = lora.networks[0]
    assert 0 < s.trainable < 0.03 * s.total and lora.totals()["total"] < 24 * 0.95 * GB
    # refine: the fake score is adapters on the teacher, so the teacher appears once
    refine = planned("--stage", "refine", "--trainable", "lora", "--weight-gan", "0.1", "--disc-backbone", "absent")
    names = [n.name for n in refine.networks]
    assert names.count("teacher + fake score") == 1 and "teacher" not in names
    fake = refine.networks[names.index("teacher + fake score")]
    assert 0 < fake.trainable < 0.02 * fake.total
    assert len(refine.activations) == 2  # the generator's turn and the fake score's


def test_the_dry_run_builds_any_stage_through_its_own_builder_reading_headers_only():
    """A stage the dry run has never heard of is planned from its own ``build`` and ``trained``: the
    networks it names, what trains and the forward it saves; the files it loads (here the shipped
    bundle, as refine's init) are read for their headers only, as meta tensors."""
    import resource

    from smfsr.checkpoint import load_model
    from smfsr.checkpoint.safe_read import planning
    from smfsr_trainer.config import load_config
    from smfsr_trainer.dry_run import plan
    from smfsr_trainer.networks import Networks, load_bundle_of_kind, with_frozen_parts
    from smfsr_trainer.stages.base import Stage

    shipped = REPO / "models" / "smfsr-small-x4.safetensors"

    class TwinStage(Stage):  # trains a copy of a bundle's network against the bundle's own
        name = "twin"
        exported_name = "twin"

        def build(self, config):
            source = load_bundle_of_kind(config.init, "init", average_velocity=True)
            twin = load_model(config.init).transformer.train().requires_grad_(True)
            return with_frozen_parts(config, twin, source.transformer, source)

        def batch(self, config, nets, batch, g, device):
            raise NotImplementedError

        def losses(self, config, nets, models):
            raise NotImplementedError

    config, _ = load_config(["--stage", "flow", "--init", str(shipped), "--train-dir", "x", "--crop", "128",
                             "--batch-size", "2"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    planned = plan(config, TwinStage(), 1, "none")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing loaded
    networks = {n.name: n for n in planned.networks}
    assert list(networks) == ["twin", "teacher", "vae"]
    assert networks["twin"].trainable == networks["twin"].total == networks["teacher"].total > 18_000_000
    assert networks["teacher"].trainable == 0 and networks["twin"].averaged and networks["twin"].sharded
    assert list(planned.activations) == ["twin forward with gradient"] and planned.activations["twin forward with gradient"] > 0
    with torch.device("meta"), planning():
        bundle = load_model(shipped)
    assert all(t.is_meta for t in bundle.transformer.state_dict().values())


def test_fsdp_with_one_process_is_refused_before_anything_is_built():
    result = run_trainer("--config", SD35, "--dry-run", "--sharding", "fsdp", "--processes", "1", timeout=120)
    assert result.returncode != 0 and "FSDP with one process shards nothing" in result.stderr


# --- LoRA in every stage ------------------------------------------------------------------------

def lora_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("stage", ["flow", "meanflow"])
def test_lora_trains_only_adapters_and_exports_merged_weights_and_the_adapter(stage, photos, teacher, tmp_path):
    from smfsr.checkpoint import load_model

    out = tmp_path / stage
    args = ["--stage", stage, "--max-steps", "3", "--trainable", "lora", "--lora-rank", "4", "--lora-alpha", "8",
            "--export-adapter", "true", "--learning-rate", "0.01"]
    if stage == "flow":
        args += ["--init", str(teacher)]
        base = load_file(str(teacher))
    else:
        args += ["--teacher", str(teacher)]
    path = train(photos, out, *args)
    exported = load_file(str(path))
    adapter, metadata = lora_tensors(out / f"{stage}-lora.safetensors")
    assert metadata["rank"] == "4" and float(metadata["alpha"]) == 8 and metadata["smfsr_format"] == "lora"
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert not any("lora" in k for k in exported)  # the bundle is a plain model every door loads
    if stage == "flow":
        # merged = base + (alpha / rank) B A, layer by layer, from the adapter file alone
        checked = 0
        for key in adapter:
            if ".lora_A." not in key:
                continue
            layer = key.replace(".lora_A.weight", "")
            a, b = adapter[key], adapter[f"{layer}.lora_B.weight"]
            weight = f"transformer.{layer}.weight"
            expected = base[weight].float() + 2.0 * (b @ a)
            assert torch.allclose(exported[weight].float(), expected, atol=1e-5), weight
            checked += 1
        assert checked > 10
        # and nothing outside the adapted layers moved
        adapted = {f"transformer.{k.replace('.lora_A.weight', '')}.weight" for k in adapter if ".lora_A." in k}
        assert all(torch.equal(exported[k], base[k]) for k in base if k.startswith("transformer.") and k not in adapted)
    else:  # the student's new interval embedding trains in full beside the adapters
        state = load_model(path, dtype=torch.float32).transformer
        assert state.is_average_velocity
    up = SMFSRUpscaler.from_pretrained(path, device="cpu")
    result = up(Image.open(next(photos.iterdir())).convert("RGB").crop((0, 0, 32, 32)))
    assert result.size == (128, 128)


# --- FSDP on two CPU processes ----------------------------------------------------------------------

FSDP_LAUNCH = ["--config_file", FSDP_CONFIG, "--num_processes", "2", "--mixed_precision", "no"]
DDP_LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


@pytest.mark.slow
def test_fsdp_on_two_gloo_processes_resumes_and_exports_what_an_unsharded_run_exports(photos, tmp_path):
    common = ["--config", TINY_TRAIN_CONFIG, "--train-dir", str(photos), "--stage", "flow", "--batch-size", "2",
              "--checkpoint-every", "100", "--learning-rate", "0.003"]
    sharded = tmp_path / "fsdp"
    first = run_trainer(*common, "--output-dir", str(sharded), "--max-steps", "3", launch=FSDP_LAUNCH)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = sorted((sharded / "flow").glob("checkpoint-*"))[-1]
    shards = sorted(p.name for p in checkpoint.rglob("*.distcp"))
    assert any(n.startswith("__0_") for n in shards) and any(n.startswith("__1_") for n in shards), shards
    (sharded / "flow.safetensors").unlink()
    resumed = run_trainer(*common, "--output-dir", str(sharded), "--max-steps", "6", "--resume", launch=FSDP_LAUNCH)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout

    plain = tmp_path / "ddp"
    straight = run_trainer(*common, "--output-dir", str(plain), "--max-steps", "6", launch=DDP_LAUNCH)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = load_file(str(sharded / "flow.safetensors")), load_file(str(plain / "flow.safetensors"))
    assert a.keys() == b.keys()
    moved = load_file(str(sorted((plain / "flow").glob("checkpoint-*"))[-1] / "ema.safetensors"))
    assert moved
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, f"FSDP+resume vs DDP: max difference {worst}"
    up = SMFSRUpscaler.from_pretrained(sharded / "flow.safetensors", device="cpu")
    assert up(Image.open(next(photos.iterdir())).convert("RGB").crop((0, 0, 32, 32))).size == (128, 128)


# --- config errors first ----------------------------------------------------------------------------

@pytest.fixture
def nothing_built(monkeypatch):
    """Building any stage's networks fails the test: the errors below must come first."""
    from smfsr_trainer.stages import STAGES

    def refuse(self, config):
        raise AssertionError("a network was built before the config error")

    for stage in STAGES.values():
        monkeypatch.setattr(type(stage), "build", refuse)


@pytest.mark.parametrize("content, args, message", [
    ("stage: flow\ntrain_dir: x\nlearning_rat: 0.1\n", [], "learning_rat: did you mean learning_rate"),
    ("stage: refine\ntrain_dir: x\ngenerator_lora_rank: 8\n", [], "replaced by trainable: lora with lora_rank"),
    ("stage: flow\ntrain_dir: x\ncrop: big\n", [], "crop must be a whole number, not 'big'"),
    ("stage: flow\ntrain_dir: x\nlearning_rate: [1]\n", [], "learning_rate must be a number"),
    ("stage: flow\ntrain_dir: x\ngradient_checkpointing: 2\n", [], "gradient_checkpointing must be true/false"),
    ("stage: flow\ntrain_dir: x\ntrainable: lora\nlora_rank: 0\n", [], "a LoRA needs rank >= 1"),
    ("stage: flow\ntrain_dir: x\ntrainable: some\n", [], "trainable must be 'all', 'control' or 'lora'"),
    ("stage: meanflow\ntrain_dir: x\n", ["--teacher", "missing.safetensors"], "needs a flow teacher"),
    ("stage: flow\ntrain_dir: x\n", ["--sharding", "fsdp", "--dry-run"], "FSDP with one process"),
])
def test_config_errors_name_the_key_and_the_fix_before_any_network_is_built(content, args, message, tmp_path,
                                                                             nothing_built):
    from smfsr_trainer.train import main

    config = tmp_path / "c.yaml"
    config.write_text(content)
    with pytest.raises(SystemExit) as raised:
        main(["--config", str(config), "--output-dir", str(tmp_path / "out"), *args])
    assert message in str(raised.value)


# --- DDP on the official layout, and Ctrl-C across ranks ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["all", "control"])
def test_ddp_trains_the_official_layout_past_its_second_step(photos, tmp_path, trainable):
    """The official layout builds modules it never runs (the interval embedder, attn2's text
    projections, to_k_control under lr_key_quirk). DDP (find_unused_parameters=False, its default)
    fails at step 2 on a parameter that needs a gradient and got none: the trainer freezes them.
    The teacher (flow) and the student (meanflow), each on 2 gloo processes."""
    common = ["--config", TINY_TRAIN_CONFIG, "--train-dir", str(photos), "--preset", "tiny-official",
              "--trainable", trainable, "--batch-size", "2", "--max-steps", "3", "--checkpoint-every", "100",
              "--output-dir", str(tmp_path)]
    for stage in ("flow", "meanflow"):
        run = run_trainer(*common, "--stage", stage, launch=DDP_LAUNCH)
        assert run.returncode == 0, (stage, run.stderr[-3000:])
        assert f"step 3/3" in run.stdout and (tmp_path / f"{stage}.safetensors").exists(), (stage, run.stdout[-1000:])


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_children(int(child))]
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
def test_ctrl_c_to_one_rank_stops_both_at_the_same_step_with_one_checkpoint(photos, tmp_path):
    """SIGINT reaches one process of two: the stop flag is all-reduced, so both stop after the same
    step and save one checkpoint together (each rank its own random state), instead of one waiting
    at the checkpoint's barrier and the other in the next step's all-reduce for ever."""
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *DDP_LAUNCH, str(REPO / "smfsr_trainer" / "train.py"),
           "--config", TINY_TRAIN_CONFIG, "--train-dir", str(photos), "--output-dir", str(out), "--batch-size", "2",
           "--max-steps", "100000", "--log-every", "1", "--checkpoint-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            start_new_session=True)  # its own process group: a hung run is killed whole
    try:
        for line in proc.stdout:  # rank 0 prints the steps
            if line.startswith("step 3/"):
                break
        rank1 = [pid for pid in _children(proc.pid) if _rank_of(pid) == 1]
        assert rank1, "no rank-1 worker found"
        os.kill(rank1[-1], signal.SIGINT)  # the deepest: the Python running train.py
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = [line for line in stdout.splitlines() if line.startswith("interrupted at step ")]
    assert said, (stdout[-2000:], stderr[-3000:])
    step = int(said[0].split()[3].split("/")[0])
    saved = out / "flow" / f"checkpoint-{step:08d}"
    assert sorted(p.name for p in saved.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert [p.name for p in (out / "flow").glob("checkpoint-*")] == [saved.name]
