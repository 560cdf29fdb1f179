"""The default model's design: the lossless space-to-depth codec, the LR-residual velocity, the
convolutional detail head, and the trainer stages that build such a model (flow -> meanflow ->
refine without DINOv3)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smfsr.checkpoint import build_transformer, load_bundle, save_bundle
from smfsr.checkpoint.describe import describe
from smfsr.checkpoint.random import random_bundle
from smfsr.codec import LatentCodec
from smfsr.errors import CheckpointError
from smfsr.models.detail_head import DetailHead
from smfsr.models.presets import transformer_config
from smfsr.models.space_to_depth import SpaceToDepthVAE
from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions, resize
from smfsr.options import VAETiling
from tests.helpers import photo_like, train


def lossless_bundle(**defaults):
    return random_bundle("tiny-x4", "space-to-depth-x4", **defaults)


def test_codec_reconstructs_exactly_and_never_tiles():
    always_tile = VAETiling(tile=8)
    codec = LatentCodec(2.0, 0.0, SpaceToDepthVAE(factor=4, scaling_factor=2.0))
    image = torch.rand(2, 3, 64, 96)
    latent = codec.encode(image, tiling=always_tile)
    assert latent.shape == (2, 48, 16, 24) and codec.downscale == 4 and codec.latent_channels == 48
    assert codec.lossless
    assert torch.allclose(codec.decode(latent, always_tile), image, atol=1e-6)
    # the posterior is a point mass: sampling it moves the latent by at most ~1e-6
    noisy = codec.encode(image, noise=torch.randn(2, 48, 16, 24))
    assert (noisy - latent).abs().max() < 1e-5
    # the latent is the image's pixels in [-1, 1], rearranged, times the scaling factor
    assert torch.equal(latent, 2.0 * torch.nn.functional.pixel_unshuffle(image * 2 - 1, 4))


def test_bundle_with_the_codec_stores_no_vae_tensors_and_loads_back(tmp_path):
    path = save_bundle(tmp_path / "m.safetensors", lossless_bundle())
    with safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("vae.")]
    bundle = load_bundle(path)
    assert isinstance(bundle.vae, SpaceToDepthVAE) and bundle.vae.factor == 4
    assert bundle.transformer.config.lr_residual
    assert "lossless space-to-depth x4, 48 channels" in describe(path)


def test_an_untrained_lr_residual_model_is_exactly_bicubic():
    """u = net + (z_t - z_LR) with a zero-initialised output layer: x = e - u(e, 0, 1) = z_LR for
    every noise draw, and the lossless codec decodes z_LR to the bicubic upsampling itself."""
    up = SMFSRUpscaler(lossless_bundle(process_size=64))
    lr = torch.rand(1, 3, 32, 48)
    expected = resize(lr, 128, 192).clamp(0, 1)
    for seed in (0, 1):
        out = up.upscale_tensor(lr, UpscaleOptions(color_fix="none", seed=seed))
        assert out.shape == expected.shape
        assert (out - expected).abs().max() < 1e-5


def test_lr_residual_velocity_and_its_channel_check():
    model = build_transformer(transformer_config("tiny-x4")).eval()
    z, lr = torch.randn(2, 48, 8, 8), torch.randn(2, 48, 8, 8)
    text, pooled = torch.randn(2, 3, 16), torch.randn(2, 16)
    t, r = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.25])
    with torch.no_grad():
        assert torch.allclose(model(z, lr, text, pooled, t, r), z - lr)  # net is zero at init
        torch.nn.init.normal_(model.proj_out.weight, std=0.02)
        assert not torch.allclose(model(z, lr, text, pooled, t, r), z - lr)
    with pytest.raises(CheckpointError, match="lr_residual needs in_channels == out_channels"):
        build_transformer(transformer_config("tiny", lr_residual=True, out_channels=8))
    with pytest.raises(CheckpointError, match="a detail head needs in_channels == out_channels"):
        build_transformer(transformer_config("tiny", detail_head_channels=8, out_channels=8))


def test_the_detail_head_is_local_time_dependent_and_starts_at_zero():
    torch.manual_seed(0)
    head = DetailHead(latent_channels=4, width=8, layers=3, temb_dim=6).eval()
    v, z, lr = torch.randn(3, 1, 4, 12, 12).unbind(0)
    temb = torch.randn(1, 6)
    with torch.no_grad():
        assert torch.equal(head(v, z, lr, temb), torch.zeros_like(v))  # a new head changes nothing
        for layer in (head.conv_out, head.film):
            torch.nn.init.normal_(layer.weight, std=0.5)
        base = head(v, z, lr, temb)
        # three 3x3 layers: a change at cell (6, 6) reaches cells within 3 of it, and no further
        poked = lr.clone()
        poked[..., 6, 6] += 1.0
        moved = (head(v, z, poked, temb) - base).abs().amax(1)[0] > 0
        rows, cols = torch.nonzero(moved, as_tuple=True)
        assert moved[6, 6] and rows.min() == 3 and rows.max() == 9 and cols.min() == 3 and cols.max() == 9
        assert not torch.allclose(head(v, z, lr, torch.randn(1, 6)), base)  # FiLM: time matters
    with pytest.raises(ValueError, match="at least 2"):
        DetailHead(4, 8, 1, 6)


def test_a_bundle_whose_config_has_a_head_but_not_its_tensors_is_refused(tmp_path):
    bundle = lossless_bundle()
    assert bundle.transformer.config.detail_head_channels  # the test double has a head, as the default model
    path = save_bundle(tmp_path / "m.safetensors", bundle)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if ".detail_head." not in k}
    save_file(tensors, str(tmp_path / "headless.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing(.|\n)*detail_head\.conv_out\.weight"):
        load_bundle(tmp_path / "headless.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2d_photos")
    for i in range(4):
        Image.fromarray(photo_like(96, 128, seed=i)).save(root / f"p{i}.png")
    return root


def test_the_recipe_shape_trains_end_to_end_without_dinov3(photos, tmp_path):
    """flow -> meanflow -> refine (L2 only: no --dinov3, no fake score) on the lossless codec."""
    lossless = ("--preset", "tiny-x4", "--vae-preset", "space-to-depth-x4", "--max-steps", "3")
    train(photos, tmp_path, "--stage", "flow", *lossless)
    train(photos, tmp_path, "--stage", "meanflow", *lossless)
    path = train(photos, tmp_path, "--stage", "refine", "--weight-gan", "0", "--weight-vsd", "0", *lossless)
    checkpoint = sorted((tmp_path / "refine").glob("checkpoint-*"))[-1]
    assert len(list(checkpoint.glob("optimizer*.bin"))) == 1  # the generator alone
    bundle = load_bundle(path)
    assert isinstance(bundle.vae, SpaceToDepthVAE) and bundle.transformer.is_average_velocity
    assert SMFSRUpscaler(bundle)(Image.open(photos / "p0.png")).size == (512, 384)


def test_the_vae_stage_refuses_the_fixed_codec(photos, tmp_path):
    with pytest.raises(SystemExit, match="no VAE to train"):
        train(photos, tmp_path, "--stage", "vae", "--vae-preset", "space-to-depth-x4", "--max-steps", "1")


def test_mixed_degradation_gives_both_kinds(photos):
    from smfsr.degrade import bicubic_degrade
    from smfsr_trainer.data import SRPairs

    data = SRPairs(str(photos), crop=64, scale=4, degradation="mixed", seed=0)
    clean = []
    for epoch in range(4):
        data.set_epoch(epoch)
        for i in range(len(data)):
            item = data[i]
            clean.append(torch.allclose(item["lr"], bicubic_degrade(item["hr"][None], 4)[0], atol=1e-6))
    assert 0 < sum(clean) < len(clean)
