"""Memory estimates: free memory as a process in a container sees it (the cgroup's limit caps the
machine's), what a model is estimated to need against what a door measures, the GPU need under
block swap."""

from __future__ import annotations

import pytest

from smfsr import memory

GiB = 2**30


def cgroup(folder, version: int, limit: str, usage: int, inactive: int):
    names = memory.CGROUP_FILES[version - 1]
    files = tuple(str(folder / n.rsplit("/", 1)[1]) for n in names[:3]) + (names[3],)
    (folder / names[0].rsplit("/", 1)[1]).write_text(limit + "\n")
    (folder / names[1].rsplit("/", 1)[1]).write_text(f"{usage}\n")
    (folder / names[2].rsplit("/", 1)[1]).write_text(f"anon {usage - inactive}\n{names[3]} {inactive}\n")
    return (files,)


def test_the_cgroup_limit_caps_free_memory(tmp_path, monkeypatch):
    v2 = cgroup(tmp_path, 2, str(8 * GiB), 3 * GiB, 1 * GiB)
    assert memory.cgroup_headroom(v2) == 6 * GiB  # 8 - (3 - 1 reclaimable)
    monkeypatch.setattr(memory, "CGROUP_FILES", v2)
    assert memory.free_host_bytes() <= 6 * GiB
    (tmp_path / "v1").mkdir()
    v1 = cgroup(tmp_path / "v1", 1, str(4 * GiB), 1 * GiB, 0)
    assert memory.cgroup_headroom(v1) == 3 * GiB


def test_no_limit_leaves_the_machines_free_memory(tmp_path, monkeypatch):
    unlimited = cgroup(tmp_path, 2, "max", GiB, 0)
    assert memory.cgroup_headroom(unlimited) is None
    (tmp_path / "v1").mkdir()
    assert memory.cgroup_headroom(cgroup(tmp_path / "v1", 1, "9223372036854771712", GiB, 0)) is None  # v1's "none"
    assert memory.cgroup_headroom(((str(tmp_path / "absent"), str(tmp_path / "absent"), "", "x"),)) is None
    monkeypatch.setattr(memory, "CGROUP_FILES", unlimited)
    free = memory.free_host_bytes()
    assert free is not None and free > 0


def test_a_bundles_rebuilt_position_table_is_counted(tmp_path):
    """Bundles leave out the standard sin-cos table; the load rebuilds it in the network's dtype."""
    from smfsr.checkpoint.bundle import save_bundle
    from tests.helpers import tiny_bundle

    bundle = tiny_bundle()
    path = save_bundle(tmp_path / "b.safetensors", bundle)
    table = bundle.transformer.pos_embed.pos_embed
    counted = [t for t in memory.stored_tensors(path) if t[1] == table.numel()]
    assert [(t.transformer, t.values, t.dtype) for t in counted] == [(True, table.numel(), "F32")]


# --- the estimate against what a door reaches -------------------------------------------------------

ESTIMATE_BOUNDS = (-0.10, 0.25)  # bench/memory.py's: the estimate against the measured peak


def sd35_vae_bundle(path):
    """A tiny transformer on SD3.5's VAE at a 256 px process size: the decode's working memory
    (about 0.4 GiB) is most of what the run adds to the process."""
    import torch

    from smfsr.checkpoint import Bundle, PipelineDefaults, build_transformer, build_vae, save_bundle
    from smfsr.models.presets import transformer_config, vae_config

    torch.manual_seed(0)
    transformer = build_transformer(transformer_config("tiny", in_channels=16, out_channels=16)).eval()
    vae = build_vae(vae_config("sd35")).eval()
    defaults = PipelineDefaults(process_size=256, latent_tile=16, latent_overlap=4)
    defaults.use_vae(vae)
    bundle = Bundle(transformer, vae, torch.zeros(1, 3, 16), torch.zeros(1, 16), defaults, "test", "test")
    return save_bundle(path, bundle)


@pytest.mark.parametrize("model", ["shipped", "sd35_vae"])
def test_the_logged_estimate_is_within_bounds_of_the_measured_peak(tmp_path, model):
    """`smfsr upscale --verbose` says the peak it expects before the model loads; the process's peak
    RSS (its own, measured by the OS) is within -10% / +25% of it, for the shipped model (the
    process's own memory is most of it) and for SD3.5's VAE (its decode is)."""
    import re
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from tests.helpers import REPO, photo_like

    path = REPO / "models" / "smfsr-small-x4.safetensors" if model == "shipped" else sd35_vae_bundle(tmp_path / "b.safetensors")
    Image.fromarray(photo_like(64, 64)).save(tmp_path / "in.png")
    # VmHWM: this process's own peak (getrusage's ru_maxrss also keeps the peak of the process it was
    # forked from, here the test runner, which can be larger)
    probe = ("import sys; from smfsr.cli import main; code = main(sys.argv[1:]); "
             "peak = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]; "
             "print('peak', int(peak) * 1024, file=sys.stderr); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", probe, "upscale", "in.png", "-o", "out.png", "--model", str(path),
                          "--device", "cpu", "--verbose"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    estimated = float(re.search(r"peaks at about ([\d.]+) GiB", run.stderr).group(1)) * GiB
    measured = int(re.search(r"^peak (\d+)$", run.stderr, re.M).group(1))
    assert ESTIMATE_BOUNDS[0] <= estimated / measured - 1 <= ESTIMATE_BOUNDS[1], (estimated / GiB, measured / GiB)
    assert np.asarray(Image.open(tmp_path / "out.png")).shape[:2] == (256, 256)


def test_the_gpu_need_counts_swapped_blocks_as_two_in_flight(tmp_path):
    """Block swap keeps N blocks in system memory and two of them on the GPU at a time: the GPU
    check counts the rest of the networks, those two and the working memory (it was skipped
    whenever block swap was on), and a model that cannot fit even with every block swapped is
    refused with the settings that lower it."""
    import torch

    from smfsr.checkpoint.bundle import save_bundle
    from smfsr.errors import SMFSRError
    from smfsr.runtime import Runtime
    from tests.helpers import tiny_bundle

    bundle = tiny_bundle()
    path = save_bundle(tmp_path / "b.safetensors", bundle)
    tensors = memory.stored_tensors(path)
    blocks = [sum(p.numel() * 4 for p in b.parameters()) for b in bundle.transformer.transformer_blocks]
    assert len(blocks) == 2
    everything = memory.gpu_bytes(tensors, torch.float32, False, 0, 0)
    assert memory.gpu_bytes(tensors, torch.float32, False, 1, 10) == everything + 10  # one swapped: it is in flight
    assert memory.gpu_bytes(tensors, torch.float32, False, 2, 0) == everything  # both swapped, both in flight
    assert memory.gpu_bytes(tensors, torch.float32, False, "auto", 0) == everything
    # a 24-block model: all but two blocks' bytes leave the GPU
    fake = [memory.Stored(True, 1000, "F32", i) for i in range(24)] + [memory.Stored(True, 500, "F32")]
    assert memory.gpu_bytes(fake, torch.float32, False, "auto", 7) == 4 * (500 + 2 * 1000) + 7
    assert memory.gpu_bytes(fake, torch.float32, False, 4, 0) == 4 * (500 + 20 * 1000 + 2 * 1000)

    runtime = Runtime("cpu", "fp32", block_swap="auto").resolved()
    need = memory.gpu_bytes(tensors, torch.float32, False, "auto", 0)
    memory.check_gpu_fits(path, runtime, 0, need, [])  # fits exactly
    with pytest.raises(SMFSRError, match=r"b.safetensors needs at least .* GiB on cpu with every block swapped to "
                                         r"system memory, and .* GiB are free: set --dtype to bf16"):
        memory.check_gpu_fits(path, runtime, 0, need - 1, ["set ${dtype} to bf16"])
