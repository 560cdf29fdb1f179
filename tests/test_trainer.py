"""Trainer I: the flow and meanflow stages on tiny configs (CPU), resume, export, DDP, and the
method itself on a toy problem with a known answer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions
from tests.helpers import TINY_TRAIN_CONFIG, build_networks, photo_folder, photo_like, stage_loss, train

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN_CONFIG


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("photos"), 6)


@pytest.fixture(scope="module")
def teacher_run(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(photos, out, "--stage", "flow", "--max-steps", "30")
    return out


def fixed_batch_loss(config_args: list[str], photos: Path, out: Path, state: dict | None = None):
    """The stage loss on one fixed batch, for a model with the given weights."""
    from smfsr_trainer.config import load_config
    from smfsr_trainer.data import SRPairs
    from smfsr_trainer.train import step_generator

    config, _ = load_config(["--config", TINY, "--train-dir", str(photos), "--output-dir", str(out), *config_args])
    nets = build_networks(config)
    if state is not None:
        nets.trained.load_state_dict(state)
    data = SRPairs(str(photos), crop=64, scale=4, degradation="bicubic", seed=0)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("hr", "lr")}
    return nets, stage_loss(config, nets, batch, step_generator(config, 12345, 0))


def exported_transformer_state(path: Path) -> dict:
    """The exported transformer's full state dict, through the bundle loader (a bundle leaves out
    the standard position table, which the loader recomputes)."""
    from smfsr.checkpoint import load_bundle

    return load_bundle(path).transformer.state_dict()


def test_flow_stage_lowers_its_loss_and_exports_a_working_teacher(teacher_run, photos, tmp_path):
    assert (teacher_run / "flow.safetensors").exists()
    _, (before, _) = fixed_batch_loss(["--stage", "flow", "--null-text-prob", "0"], photos, tmp_path)
    trained = exported_transformer_state(teacher_run / "flow.safetensors")
    _, (after, _) = fixed_batch_loss(["--stage", "flow", "--null-text-prob", "0"], photos, tmp_path, trained)
    assert after.item() < 0.7 * before.item(), (before.item(), after.item())
    up = SMFSRUpscaler.from_pretrained(teacher_run / "flow.safetensors", device="cpu")
    assert not up.transformer.is_average_velocity
    assert up(Image.open(next(photos.iterdir())), UpscaleOptions(steps=4)).size == (512, 384)


def test_meanflow_stage_lowers_its_loss_and_exports_an_upscaler(teacher_run, photos):
    out = teacher_run
    path = train(photos, out, "--stage", "meanflow", "--max-steps", "30")
    args = ["--stage", "meanflow", "--teacher", str(out / "flow.safetensors")]
    nets, (before, _) = fixed_batch_loss(args, photos, out)
    _, (after, parts) = fixed_batch_loss(args, photos, out, exported_transformer_state(path))
    assert after.item() < 0.7 * before.item(), (before.item(), after.item())
    assert set(parts) <= {"loss_boundary", "loss_isc"}
    up = SMFSRUpscaler.from_pretrained(path, device="cpu")
    assert up.transformer.is_average_velocity and up.defaults.steps == 1
    image = up(Image.open(next(photos.iterdir())))
    assert image.size == (512, 384)


def test_gradients_reach_only_what_trains(teacher_run, photos, tmp_path):
    args = ["--stage", "meanflow", "--teacher", str(teacher_run / "flow.safetensors"), "--trainable", "control"]
    nets, (loss, _) = fixed_batch_loss(args, photos, tmp_path)
    loss.backward()
    with_grad = {n for n, p in nets.trained.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("control" in n or "interval_embedder" in n for n in with_grad)
    assert all(p.grad is None for p in nets.teacher.parameters())  # the frozen teacher
    assert all(p.grad is None for p in nets.codec.vae.parameters())


def test_resume_continues_exactly(photos, tmp_path, capsys):
    """With a warmup + cosine learning-rate schedule: the schedule resumes where it stopped too."""
    schedule = ["--lr-schedule", "cosine", "--lr-warmup-steps", "3", "--log-every", "1"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(photos, straight, "--max-steps", "8", "--checkpoint-every", "4", *schedule)
    train(photos, broken, "--max-steps", "4", "--checkpoint-every", "4", *schedule)  # "killed" after step 4
    (broken / "flow.safetensors").unlink()
    os.makedirs(broken / "flow" / ".checkpoint-00000006.tmp")  # a save interrupted mid-write is ignored
    opt_before = torch.load(broken / "flow" / "checkpoint-00000004" / "optimizer.bin", weights_only=True)
    capsys.readouterr()
    train(photos, broken, "--max-steps", "8", "--checkpoint-every", "4", "--resume", *schedule)
    assert "resumed from" in capsys.readouterr().out
    # the schedule at every step of the resumed run, as the straight run logged it (warmup, then cosine)
    lrs = {run: [float(v) for v in tb_scalars(run / "flow", "train/lr")] for run in (straight, broken)}
    assert len(lrs[straight]) == 8 and lrs[broken][-4:] == lrs[straight][-4:]
    assert lrs[straight][0] < lrs[straight][1] < lrs[straight][3]  # warmup: 0, 1/3, 2/3, then the full rate
    assert lrs[straight][3] > lrs[straight][5] > lrs[straight][7] > 0  # cosine decay
    opt_at_4 = torch.load(straight / "flow" / "checkpoint-00000004" / "optimizer.bin", weights_only=True)
    for a, b in zip(opt_before["state"].values(), opt_at_4["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    a = load_file(str(straight / "flow.safetensors"))
    b = load_file(str(broken / "flow.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def tb_scalars(folder: Path, tag: str) -> list[float]:
    """The values of one scalar in a run's tensorboard logs, by step (the last write of each step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            by_step.update({e.step: e.value for e in acc.Scalars(tag)})
    return [by_step[k] for k in sorted(by_step)]


def test_the_trainer_conditions_on_the_lr_latent_the_pipeline_makes(tiny_bundle_path):
    """The same LR image and seed give the trainer and the pipeline the same LR latent (bicubic to
    the working size, then the posterior sample from the seed), read where the network gets it."""
    from smfsr.checkpoint import load_bundle
    from smfsr.codec import LatentCodec
    from smfsr_trainer.networks import LR_LATENT, Networks, encode

    upscaler = SMFSRUpscaler.from_pretrained(tiny_bundle_path, device="cpu", dtype="fp32")
    assert upscaler.defaults.lr_latent == LR_LATENT == "sample"
    lr = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    seen = []
    upscaler.transformer.register_forward_hook(lambda module, args, out: seen.append(args[1].clone()))
    upscaler.upscale_tensor(lr, UpscaleOptions(seed=11, tile_size=0))
    bundle = load_bundle(tiny_bundle_path)
    d = bundle.defaults
    nets = Networks(bundle.transformer, codec=LatentCodec(d.vae_scaling_factor, d.vae_shift_factor, bundle.vae),
                    prompt=(bundle.prompt_embeds, bundle.prompt_pooled))
    hr = torch.zeros(1, 3, *upscaler.working_size(32, 48))
    g = torch.Generator().manual_seed(0)  # the trainer draws each image's seed from the step's generator
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(0)))
    _, cond = encode(nets, {"hr": hr, "lr": lr}, torch.device("cpu"), g)
    upscaler.upscale_tensor(lr, UpscaleOptions(seed=seed, tile_size=0))
    assert cond.lr_latent.shape == seen[-1].shape
    assert torch.allclose(cond.lr_latent, seen[-1].float(), atol=1e-6)
    assert not torch.allclose(seen[0], seen[-1])  # the seed matters: the posterior is sampled, not its mean


def test_stage_facts_live_in_the_stages():
    """No `config.stage ==` decision outside smfsr_trainer/stages/: each stage says what it needs."""
    from smfsr_trainer.stages import get_stage

    offenders = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "smfsr_trainer").rglob("*.py")
                 if "stages" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "config.stage ==" in line or "config.stage in" in line]
    assert offenders == []
    assert [get_stage(n).default_steps for n in ("flow", "meanflow", "refine")] == [25, 1, 1]


def test_a_stage_that_needs_a_teacher_says_so_before_building(photos, tmp_path):
    with pytest.raises(SystemExit, match="stage meanflow needs a flow teacher .* train stage flow first"):
        train(photos, tmp_path / "empty", "--stage", "meanflow")
    with pytest.raises(SystemExit, match="lr_schedule must be one of constant, cosine, linear"):
        train(photos, tmp_path / "empty", "--lr-schedule", "step")


def test_export_only_writes_the_latest_checkpoints_ema(teacher_run, photos, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(teacher_run, copy)
    (copy / "flow.safetensors").unlink()
    train(photos, copy, "--export-only")
    a, b = load_file(str(copy / "flow.safetensors")), load_file(str(teacher_run / "flow.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("transformer."))


def test_unreadable_images_are_skipped(photos, tmp_path):
    from smfsr_trainer.data import SRPairs

    folder = tmp_path / "data"
    shutil.copytree(photos, folder)
    (folder / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(photo_like(16, 16)).save(folder / "small.png")  # smaller than the crop
    data = SRPairs(str(folder), crop=64, scale=4, degradation="realesrgan", seed=0)
    items = [data[i] for i in range(len(data))]
    assert all(it["hr"].shape == (3, 64, 64) and it["lr"].shape == (3, 16, 16) for it in items)
    assert {p.name for p in data.bad} == {"broken.png", "small.png"}
    again = SRPairs(str(folder), crop=64, scale=4, degradation="realesrgan", seed=0)
    assert torch.equal(again[2]["lr"], items[2]["lr"])  # deterministic per (seed, epoch, index)


def test_config_file_and_overrides(tmp_path):
    from smfsr_trainer.config import load_config

    toml = tmp_path / "c.toml"
    toml.write_text('stage = "meanflow"\ncrop = 128\ntrain_dir = "x"\n')
    config, _ = load_config(["--config", str(toml), "--crop", "64", "--teacher-cfg", "2.5", "--precondition", "false"])
    assert (config.stage, config.crop, config.teacher_cfg, config.precondition) == ("meanflow", 64, 2.5, False)
    with pytest.raises(SystemExit, match="multiple of"):
        load_config(["--config", str(toml), "--crop", "100"])
    toml.write_text('stage = "flow"\ntrain_dir = "x"\nlearning_rat = 1\n')
    with pytest.raises(SystemExit, match="unknown settings"):
        load_config(["--config", str(toml)])


@pytest.mark.slow
def test_two_rank_ddp_on_cpu_ends_with_identical_weights(photos, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SMFSR_RANK_DIGESTS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "smfsr_trainer" / "train.py"), "--config", TINY, "--train-dir", str(photos),
           "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "100", "--batch-size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = sorted((out / "flow").glob("weights-rank*.sha256"))
    assert [d.name for d in digests] == ["weights-rank0.sha256", "weights-rank1.sha256"]
    assert digests[0].read_text() == digests[1].read_text()
    # and they moved: not the weights the run started from (built as the trainer builds them)
    from smfsr.checkpoint import build_transformer
    from smfsr.models.presets import transformer_config
    from smfsr_trainer.train import weights_digest

    torch.manual_seed(0)
    initial = build_transformer(transformer_config("tiny-teacher"))
    assert digests[0].read_text() != weights_digest(initial)


@pytest.mark.slow
def test_isc_distillation_beats_the_teachers_one_step_on_a_toy_problem(capsys):
    """The method, measured: sliced Wasserstein distance to the data of 1-step samples."""
    from smfsr_trainer.toy.mixture import train_and_compare

    r = train_and_compare(teacher_steps=2000, student_steps=2000)
    with capsys.disabled():
        print(f"\n[toy 2-D conditional mixture, SWD to data] teacher 1 step {r.teacher_1:.3f}, "
              f"teacher 50 steps {r.teacher_50:.3f}, student 1 step {r.student_1:.3f}, student 2 steps {r.student_2:.3f}")
    # measured (seed 0): teacher 1 step 0.69, teacher 50 steps 0.05, student 1 step 0.14, 2 steps 0.08
    assert r.student_1 < 0.35 * r.teacher_1  # one student step is far better than one teacher step
    assert r.student_1 < 4 * r.teacher_50  # and within a small factor of 50 teacher steps
    assert r.student_2 < 2 * r.teacher_50


def test_vae_stage_trains_a_codec_with_measured_latent_statistics(photos, tmp_path):
    from smfsr.checkpoint import import_vae
    from smfsr_trainer.config import load_config
    from smfsr_trainer.stages import vae_loss

    out = tmp_path / "vae"
    path = train(photos, out, "--stage", "vae", "--vae-preset", "tiny", "--max-steps", "20", "--learning-rate", "0.003")
    assert path == out / "vae_model" and (path / "config.json").exists()
    vae = import_vae(path)
    assert vae.config.scaling_factor != 1.0  # measured on the training crops
    config, _ = load_config(["--config", TINY, "--train-dir", str(photos), "--stage", "vae", "--vae-preset", "tiny"])
    fresh = build_networks(config).trained
    batch = torch.stack([torch.from_numpy(photo_like(64, 64, s)).permute(2, 0, 1).float() / 255 for s in range(4)])
    g = torch.Generator().manual_seed(0)
    before, _ = vae_loss(fresh, batch, g, 1e-6)
    after, _ = vae_loss(vae, batch, torch.Generator().manual_seed(0), 1e-6)
    assert after.item() < before.item()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(photos, tmp_path):
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "smfsr_trainer" / "train.py"), "--config", TINY, "--train-dir", str(photos),
           "--output-dir", str(out), "--max-steps", "100000", "--log-every", "1", "--checkpoint-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout:  # wait until it trains
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "stopping after this step" in stderr
    said = stdout.strip().splitlines()[-2:]
    assert said[0].startswith("interrupted at step ") and "resume with the same command plus --resume" in said[1]
    step = int(said[0].split()[3].split("/")[0])
    saved = out / "flow" / f"checkpoint-{step:08d}"
    assert saved.is_dir() and f"saved {saved}" in said[0]
    resumed = subprocess.run([*cmd[:-6], "--max-steps", str(step + 2), "--log-every", "1", "--resume"],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {saved} at step {step}" in resumed.stdout
    assert f"step {step + 1}/{step + 2}" in resumed.stdout and (out / "flow.safetensors").exists()
