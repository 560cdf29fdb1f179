"""The A1111/Forge upscaler's decisions without A1111: model discovery and naming, scale handling,
settings. The real web UI is tests/test_a1111.py."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from a1111_extension import logic
from smfsr.options import VAETiling
from smfsr.pipeline import SMFSRUpscaler
from smfsr.imageio import from_pil
from tests.helpers import photo_like


def test_models_are_discovered_and_named_with_their_factor(tmp_path, tiny_bundle_path):
    models = tmp_path / "models"
    (models / "SMFSR").mkdir(parents=True)
    shutil.copy(tiny_bundle_path, models / "SMFSR" / "tiny.safetensors")
    save_file({"w": torch.zeros(1)}, str(models / "SMFSR" / "not-smfsr.safetensors"))  # a foreign file: ignored
    (models / "SMFSR" / "old.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle: ignored, never opened by torch
    (models / "SMFSR" / "readme.txt").write_text("hi")
    official = models / "SMFSR" / "smfsr_q" / "transformer"
    official.mkdir(parents=True)
    (official / "config.json").write_text("{}")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    shutil.copy(tiny_bundle_path, extra / "mine.safetensors")
    found = logic.discover(models, str(extra))
    names = [e.name for e in found]
    assert names[:1] == ["SMFSR x4 (mine)"]  # --smfsr-models-path comes first
    assert "SMFSR x4 (tiny)" in names and "SMFSR x4 (smfsr_q)" in names
    assert not any("not-smfsr" in n or "old" in n or "readme" in n for n in names)
    assert logic.model_folders(models, None)[0] == models / "SMFSR"


def test_one_pass_reaches_the_requested_scale(tiny_bundle_path):
    """A1111 calls do_upscale until the image reaches (size * scale) // 8 * 8, then Lanczos-resizes:
    one SMFSR pass must get there, so the model never runs twice."""
    up = SMFSRUpscaler.from_pretrained(tiny_bundle_path, device="cpu")
    for (h, w), scale in [((40, 56), 4), ((40, 56), 2), ((33, 47), 3), ((24, 32), 2.5)]:
        image = Image.fromarray(photo_like(h, w))
        out = up.upscale_image(from_pil(image), logic.options({"smfsr_seed": 0}, scale))
        dest = (int(w * scale) // 8 * 8, int(h * scale) // 8 * 8)
        assert out.size == (round(w * scale), round(h * scale))
        assert out.width >= dest[0] and out.height >= dest[1]


def test_settings_defaults_and_random_seed():
    from smfsr.options import UpscaleOptions

    # every setting defaults to "the model's" (0 / auto): what the model stores is what runs; the
    # seed to 0, every other door's default, so the same input gives the same image in every door
    assert logic.DEFAULTS == {"smfsr_steps": 0, "smfsr_seed": 0, "smfsr_tile": 0, "smfsr_tile_overlap": 0,
                              "smfsr_vae_tile": 0, "smfsr_color_fix": "auto", "smfsr_dtype": "auto",
                              "smfsr_weights": "auto", "smfsr_block_swap": 0}
    o = logic.options({}, 4, rng=random.Random(1))
    assert (o.scale, o.steps, o.tile_size, o.tile_overlap, o.color_fix) == (4.0, None, None, None, None)
    assert o.vae_tiling == VAETiling()
    assert o.seed == UpscaleOptions().seed == 0
    # -1: random each time
    r = logic.options({"smfsr_seed": -1}, 4, rng=random.Random(1))
    assert 0 <= r.seed < 2**32 and r.seed == logic.options({"smfsr_seed": -1}, 4, rng=random.Random(1)).seed
    assert logic.options({"smfsr_seed": 7, "unrelated": 1}, 2).seed == 7
    assert logic.settings_key({"smfsr_seed": 1}) != logic.settings_key({"smfsr_seed": 2})
    assert all(s.key.startswith("smfsr_") and s.label for s in logic.SETTINGS)


def test_scripts_folder_only_imports_the_extension():
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    files = sorted(p.name for p in scripts.iterdir() if p.suffix == ".py")
    assert files == ["smfsr.py"]
    code = [l.strip() for l in (scripts / "smfsr.py").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert code[-1] == "import a1111_extension.upscaler  # noqa: F401"
    assert "from smfsr.stack import import_problem" in code


def test_the_host_model_leaves_the_gpu_only_under_low_vram_and_comes_back():
    """A1111 does not reload a checkpoint that is already loaded: a model sent to the CPU for the
    upscale must be back on its device after it, also when the upscale fails (Hires. fix VAE-encodes
    right after, on the model's device)."""
    model = {"device": "cuda"}
    to_cpu = lambda m: m.update(device="cpu")  # noqa: E731
    to_device = lambda m: m.update(device="cuda")  # noqa: E731
    seen = []
    with logic.host_model_aside(model, True, to_cpu, to_device):
        seen.append(model["device"])
    assert seen == ["cpu"] and model["device"] == "cuda"
    with pytest.raises(RuntimeError):
        with logic.host_model_aside(model, True, to_cpu, to_device):
            raise RuntimeError("the upscale failed")
    assert model["device"] == "cuda"
    with logic.host_model_aside(model, False, to_cpu, to_device):  # no low VRAM asked for: left alone
        seen.append(model["device"])
    assert seen == ["cpu", "cuda"]
    with logic.host_model_aside(None, True, to_cpu, to_device):  # no model loaded yet
        pass


def test_runtime_settings_and_a_low_vram_web_ui_swap_blocks():
    from smfsr.runtime import Runtime

    assert logic.runtime({}, "cpu", no_half=False, lowvram=False) == Runtime("cpu", "auto", "auto", 0)
    assert logic.runtime({}, "cpu", no_half=True, lowvram=True) == Runtime("cpu", "fp32", "auto", "auto")  # --lowvram
    fp8 = logic.runtime({"smfsr_weights": "fp8_e4m3fn", "smfsr_block_swap": 8}, "cpu", no_half=False, lowvram=True)
    assert (fp8.weights, fp8.block_swap) == ("fp8_e4m3fn", 8)
    assert fp8.resolved().weights == "fp8"  # the core's one name for it; the old setting value "fp8" works too
    assert logic.runtime({"smfsr_weights": "fp8"}, "cpu", False, False).resolved().weights == "fp8"
    assert logic.runtime({"smfsr_block_swap": -1}, "cpu", False, False).block_swap == "auto"


def test_messages_name_the_web_uis_settings():
    from smfsr.errors import SMFSRError, door_message
    from smfsr.options import UpscaleOptions
    from smfsr.checkpoint.defaults import PipelineDefaults

    with pytest.raises(SMFSRError) as error:
        UpscaleOptions(steps=2).resolve(PipelineDefaults(max_steps=1), 2)
    assert "--steps" in str(error.value)  # the command line's words by default
    message = door_message(error.value, logic.SETTING_NAMES)
    assert "Settings > Upscaling > 'SMFSR steps' to 1" in message and "--steps" not in message
