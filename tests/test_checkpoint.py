"""Bundles and importers: real safetensors files, round trips, and the errors users see."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from smfsr.checkpoint import build_transformer, import_official_transformer, import_vae, load_bundle, load_model, \
    save_bundle
from smfsr.checkpoint.describe import describe
from smfsr.errors import CheckpointError
from smfsr.models import transformer_config
from tests.helpers import perturb, tiny_bundle, tiny_sd35_vae, write_official_folder


def run(model, seed=0, h=8, w=12):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    args = [torch.randn(1, c.in_channels, h, w, generator=g), torch.randn(1, c.in_channels, h, w, generator=g),
            torch.randn(1, 3, c.joint_attention_dim, generator=g), torch.randn(1, c.pooled_projection_dim, generator=g),
            torch.tensor([0.9])]
    with torch.no_grad():
        return model(*args, torch.tensor([0.1]) if c.interval_embedding else None)


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    bundle = tiny_bundle(seed=3)
    path = save_bundle(tmp_path / "m.safetensors", bundle)
    loaded = load_bundle(path)
    # same weights (checked bit for bit below); the products may differ in the last bit because
    # the loaded tensors sit in the memory-mapped file at other alignments, which BLAS kernels see
    for (name, ours), (_, theirs) in zip(bundle.transformer.state_dict().items(), loaded.transformer.state_dict().items()):
        assert torch.equal(ours, theirs), name
    torch.testing.assert_close(run(bundle.transformer), run(loaded.transformer), rtol=0, atol=1e-6)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(bundle.vae.encoder(x), loaded.vae.encoder(x))
    assert torch.equal(loaded.prompt_embeds, bundle.prompt_embeds)
    assert loaded.defaults == bundle.defaults
    assert loaded.provenance == "tests/helpers.py"


def test_bundle_in_half_precision_loads_and_casts(tmp_path):
    bundle = tiny_bundle()
    path = save_bundle(tmp_path / "h.safetensors", bundle, dtype=torch.bfloat16)
    header = load_file(str(path))
    assert header["transformer.proj_out.weight"].dtype == torch.bfloat16
    loaded = load_bundle(path, dtype=torch.float32)
    assert next(loaded.transformer.parameters()).dtype == torch.float32
    assert torch.allclose(run(bundle.transformer), run(loaded.transformer), atol=0.05)


def test_the_standard_position_table_is_recomputed_not_stored(tmp_path):
    """SD3.5-medium's sin-cos table is 226 M values: a bundle leaves it out when it is the table the
    config gives, and the loader recomputes it in the file's dtype; any other table is kept."""
    bundle = tiny_bundle(seed=3)
    for dtype in (None, torch.bfloat16):
        path = save_bundle(tmp_path / f"{dtype}.safetensors", bundle, dtype=dtype)
        assert "transformer.pos_embed.pos_embed" not in load_file(str(path))
        loaded = load_bundle(path)
        table = loaded.transformer.pos_embed.pos_embed
        assert table.dtype == (dtype or torch.float32)
        assert torch.equal(table, bundle.transformer.pos_embed.pos_embed.to(table.dtype))
    bundle.transformer.pos_embed.pos_embed.mul_(1.01)  # fine-tuned: no longer the standard table
    path = save_bundle(tmp_path / "tuned.safetensors", bundle)
    assert torch.equal(load_file(str(path))["transformer.pos_embed.pos_embed"], bundle.transformer.pos_embed.pos_embed)
    torch.testing.assert_close(run(bundle.transformer), run(load_bundle(path).transformer), rtol=0, atol=1e-6)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists"):
        save_bundle(path, tiny_bundle())
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("dead", [True, False])
def test_official_folder_imports_with_same_outputs(tmp_path, dead):
    model = perturb(build_transformer(transformer_config("tiny-official")), 7).eval()
    root = write_official_folder(tmp_path / "smfsr_q", model, with_dead_modules=dead)
    imported = import_official_transformer(root)
    assert imported.config.lr_key_quirk and imported.config.control_scale == 1.2
    assert imported.config.time_scale == 1.0 and imported.config.interval_embedding
    assert torch.allclose(run(model), run(imported), atol=1e-6)


def test_official_teacher_folder_is_recognised(tmp_path):
    model = perturb(build_transformer(transformer_config("tiny-teacher", lr_key_quirk=True, control_scale=1.2,
                                                         official_dead_modules=True)), 8).eval()
    root = write_official_folder(tmp_path / "dit4sr", model)
    imported = import_official_transformer(root)
    assert not imported.config.interval_embedding and imported.config.time_scale == 1000.0
    # the teacher fed 0..1000 times; our [0, 1] time times 1000 must reproduce it
    model.register_to_config(time_scale=1000.0)
    assert torch.allclose(run(model), run(imported), atol=1e-5)


def test_official_folder_with_a_wrong_tensor_names_it(tmp_path):
    model = build_transformer(transformer_config("tiny-official"))
    root = write_official_folder(tmp_path / "bad", model)
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(3, 3)
    del state["proj_out.bias"]
    state["some.foreign.key"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as err:
        import_official_transformer(root)
    message = str(err.value)
    assert "1 missing" in message and "proj_out.bias" in message
    assert "1 unexpected" in message and "some.foreign.key" in message
    assert "wrong shape" in message and "transformer_blocks.0.attn.to_q.weight: file [3, 3], expected [32, 32]" in message
    assert str(weights) in message


def test_truncated_bundle_gives_a_clear_error(tmp_path, tiny_bundle_path):
    data = tiny_bundle_path.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_bundle(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_bundle(path)


def test_bundle_with_a_renamed_key_is_refused_with_the_key_named(tmp_path, tiny_bundle_path):
    tensors = load_file(str(tiny_bundle_path))
    from safetensors import safe_open

    with safe_open(str(tiny_bundle_path), "pt") as f:
        metadata = f.metadata()
    tensors["transformer.proj_out.weightX"] = tensors.pop("transformer.proj_out.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing: \n    transformer.proj_out.weight"):
        load_bundle(path)


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model.ckpt", "model.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Evil(), protocol=2))
        with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint") as err:
            load_model(path)
        assert "weights_only=True" in str(err.value)
    torch.save({"w": torch.zeros(1)}, tmp_path / "zip.pt")
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(tmp_path / "zip.pt")
    assert not marker.exists()


def test_the_suggested_conversion_works_on_a_nested_checkpoint(tmp_path):
    """The usual training checkpoint nests its weights ({"state_dict": {...}, "epoch": 3}); the script
    the refusal suggests (run by the user, on a file they trust) turns it into flat safetensors."""
    import subprocess
    import sys

    from smfsr.checkpoint.safe_read import CONVERSION_SCRIPT

    weights = {"block": {"conv.weight": torch.randn(2, 3), "conv.bias": torch.randn(2)}, "head.weight": torch.ones(1)}
    torch.save({"state_dict": weights, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "model.ckpt")
    assert CONVERSION_SCRIPT in str(err.value) and "to_safetensors.py 'model.ckpt' 'model.safetensors'" in str(err.value)
    (tmp_path / "to_safetensors.py").write_text(CONVERSION_SCRIPT)
    run = subprocess.run([sys.executable, "to_safetensors.py", "model.ckpt", "model.safetensors"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    converted = load_file(str(tmp_path / "model.safetensors"))
    assert set(converted) == {"block.conv.weight", "block.conv.bias", "head.weight"}
    assert torch.equal(converted["block.conv.weight"], weights["block"]["conv.weight"])


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path, tiny_bundle_path):
    """Regression: the first byte of a safetensors file is the low byte of its header length."""
    from safetensors import safe_open

    tensors = load_file(str(tiny_bundle_path))
    with safe_open(str(tiny_bundle_path), "pt") as f:
        metadata = dict(f.metadata())
    path = tmp_path / "m.safetensors"
    for pad in range(256):
        save_file(tensors, str(path), metadata={**metadata, "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.allclose(run(load_bundle(path).transformer), run(load_bundle(tiny_bundle_path).transformer), atol=1e-6)


def test_bare_state_dict_is_explained(tmp_path):
    model = build_transformer(transformer_config("tiny"))
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="bare SMFSR transformer state dict"):
        load_model(path)


def test_vae_import_from_folder_and_single_file(tmp_path):
    vae = tiny_bundle().vae
    folder = tmp_path / "sd" / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    loaded = import_vae(tmp_path / "sd")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vae.encoder(x), loaded.encoder(x))
    # a single diffusers-keyed file: the config is inferred from the shapes
    single = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(single))
    with pytest.raises(CheckpointError, match="cannot build"):
        import_vae(single)  # 4 GroupNorm groups are not inferable: SD-family VAEs use 32


def test_info_describes_a_bundle(tiny_bundle_path):
    text = describe(tiny_bundle_path)
    assert "SMFSR bundle" in text and "average-velocity" in text and "2 layers" in text
    assert "AutoencoderKL x8" in text and "stored embedding" in text and "x4" in text


def test_a_foreign_vae_with_the_same_channels_is_refused_by_name(tmp_path):
    """FLUX.1's VAE has SD3.5's architecture and 16 channels: only its constants tell. Beside the
    official (SD3.5-trained) network it is refused by name, in a diffusers folder and inside a FLUX.1
    single-file checkpoint; SD3.5's constants load."""
    from smfsr.checkpoint import build_vae
    from smfsr.checkpoint.defaults import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, SD35_VAE_SCALE, SD35_VAE_SHIFT
    from smfsr.models import vae_config
    from smfsr.pipeline import SMFSRUpscaler

    model = build_transformer(transformer_config("tiny-official"))
    channels = model.config.in_channels
    for name, scale, shift in (("flux", FLUX_VAE_SCALE, FLUX_VAE_SHIFT), ("sd35", SD35_VAE_SCALE, SD35_VAE_SHIFT)):
        root = write_official_folder(tmp_path / name, model)
        vae = build_vae(vae_config("tiny", latent_channels=channels, scaling_factor=scale, shift_factor=shift))
        vae.save_pretrained(root / "vae", safe_serialization=True)
    with pytest.raises(CheckpointError, match=r"this is FLUX\.1's VAE is not the one the model was trained with "
                                              r"\(SD3/SD3\.5's\)"):
        load_model(tmp_path / "flux")
    assert load_model(tmp_path / "sd35").defaults.vae_scaling_factor == SD35_VAE_SCALE
    # the same VAE given to the doors (--vae): refused before anything runs
    with pytest.raises(CheckpointError, match=r"FLUX\.1's VAE"):
        SMFSRUpscaler.from_pretrained(tmp_path / "sd35", vae=tmp_path / "flux" / "vae", device="cpu")
    # a FLUX.1 single file (its MMDiT's double_blocks beside the VAE): FLUX.1's constants, not SD3.5's by
    # the channel count
    from smfsr.checkpoint.official import holds_flux_mmdit, infer_vae_config

    shapes = {k: tuple(v.shape) for k, v in build_vae(vae_config(
        "tiny", latent_channels=16, block_out_channels=(32, 32), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)).state_dict().items()}
    flux_file = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "vae.decoder.up.0.block.0.conv1.weight"]
    sd35_file = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "first_stage_model.decoder.conv_in.weight"]
    assert holds_flux_mmdit(flux_file) and not holds_flux_mmdit(sd35_file)
    assert infer_vae_config(shapes, flux=True)["scaling_factor"] == FLUX_VAE_SCALE
    assert infer_vae_config(shapes)["scaling_factor"] == SD35_VAE_SCALE


def test_the_teacher_folder_given_as_the_student_says_which_is_which(tmp_path):
    """The official release's DiT4SR teacher folder picked instead of smfsr_q: one step of a flow
    model is no result, so the doors refuse it and name both ways out."""
    from smfsr.errors import CLI_NAMES, SMFSRError, door_message
    from smfsr.options import UpscaleOptions
    from smfsr.pipeline import SMFSRUpscaler

    model = build_transformer(transformer_config("tiny-official-teacher"))
    root = write_official_folder(tmp_path / "dit4sr_q", model)
    save_file({"embeds": torch.randn(1, 5, model.config.joint_attention_dim),
               "pooled": torch.randn(1, model.config.pooled_projection_dim)}, str(root / "prompt.safetensors"))
    tiny_sd35_vae().save_pretrained(root / "vae", safe_serialization=True)
    up = SMFSRUpscaler.from_pretrained(root, device="cpu")
    x = torch.rand(1, 3, 24, 32)
    with pytest.raises(SMFSRError) as caught:
        up(x)
    message = door_message(caught.value, CLI_NAMES)
    assert "is a flow teacher (DiT4SR's multi-step network), not the one-step SMFSR network" in message
    assert "`smfsr download smfsr_q`" in message and "--steps set to 20 or more" in message
    assert up(x, UpscaleOptions(steps=2)).shape == (1, 3, 96, 128)  # as a teacher, on purpose
