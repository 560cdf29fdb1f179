"""Exact tiled VAE, segment by segment: tiled == untiled for diffusers and ldm-named (ComfyUI) VAEs,
any image size, any tile size."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from smfsr.codec import LatentCodec
from smfsr.errors import SMFSRError
from smfsr.models.presets import vae_config
from smfsr.options import VAETiling
from smfsr.tiling.vae import auto_tile, decoder_segments, encoder_segments, tiled_decode, tiled_encode_moments
from tests.helpers import ldm_vae, photo_like

TOLERANCE = 1e-4  # max abs error, images in [0, 1]


def make_vae(config: dict, seed: int = 0) -> AutoencoderKL:
    """A random VAE whose GroupNorms have non-trivial affine parameters."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return vae


def natural_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(photo_like(h, w, seed)).permute(2, 0, 1).float()[None] / 127.5 - 1


SMALL_SD35 = vae_config("sd35", block_out_channels=(32, 32, 64, 64), layers_per_block=1)


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    return make_vae(vae_config("tiny"))


@pytest.mark.parametrize("hw", [(40, 56), (37, 21), (16, 60)])
@pytest.mark.parametrize("tile", [16, 24])
def test_exact_decode_matches_untiled(tiny, hw, tile):
    z = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(hw[0]))
    with torch.no_grad():
        ref = tiny.decoder(z)
    out = tiled_decode(tiny, z, VAETiling(tile=tile))
    assert out.shape == ref.shape
    assert ((out - ref).abs().max() / 2).item() <= TOLERANCE


@pytest.mark.parametrize("hw", [(320, 448), (200, 136)])
@pytest.mark.parametrize("tile", [64, 96])
def test_exact_encode_matches_untiled(tiny, hw, tile):
    x = natural_image(*hw)
    with torch.no_grad():
        ref = tiny.encoder(x)
    out = tiled_encode_moments(tiny, x, VAETiling(tile=tile // 8))  # the tiny VAE is x8: tile px of image
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOLERANCE


def test_result_does_not_depend_on_tile_size_even_a_single_latent_pixel(tiny):
    """A segment's halo comes from its neighbours' data, so no tile is too small to be exact."""
    z = torch.randn(2, 4, 24, 20, generator=torch.Generator().manual_seed(1))  # a batch of two
    with torch.no_grad():
        ref = tiny.decoder(z)
    for tile in (1, 3, 16, 64):
        assert (tiled_decode(tiny, z, VAETiling(tile=tile)) - ref).abs().max().item() / 2 <= TOLERANCE


def test_the_network_is_cut_at_every_groupnorm(tiny):
    """Each segment holds at most one GroupNorm (applied to its input with pooled statistics) and
    needs a halo of at most one pixel: one 3x3 conv, or an up/down-sampling conv."""
    for segments in (decoder_segments(tiny), encoder_segments(tiny)):
        norms = sum(1 for m in tiny.modules() if isinstance(m, nn.GroupNorm))
        assert all(s.halo <= 1 for s in segments)
        assert [s.output for s in segments][-1] == "output"
    with_norm = sum(s.norm is not None for s in decoder_segments(tiny)) + sum(s.norm is not None
                                                                              for s in encoder_segments(tiny))
    assert with_norm == norms  # every GroupNorm of the encoder and decoder starts exactly one segment


def test_sd35_shaped_vae_16_channels_encode_and_decode():
    vae = make_vae(SMALL_SD35, seed=2)
    x = natural_image(160, 224)
    with torch.no_grad():
        ref_moments = vae.encoder(x)
        ref_image = vae.decoder(ref_moments[:, :16])
    moments = tiled_encode_moments(vae, x, VAETiling(tile=96 // 8))
    image = tiled_decode(vae, ref_moments[:, :16], VAETiling(tile=18))
    assert (moments - ref_moments).abs().max().item() <= TOLERANCE
    assert (image - ref_image).abs().max().item() / 2 <= TOLERANCE


def test_ldm_named_vae_as_comfyui_holds_it(tiny):
    first_stage_model = ldm_vae(tiny)
    z = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(5))
    x = natural_image(200, 136)
    with torch.no_grad():
        ref_image, ref_moments = tiny.decoder(z), tiny.encoder(x)
    image = tiled_decode(first_stage_model, z, VAETiling(tile=16))
    moments = tiled_encode_moments(first_stage_model, x, VAETiling(tile=64 // 8))
    assert (image - ref_image).abs().max().item() / 2 <= TOLERANCE
    assert (moments - ref_moments).abs().max().item() <= TOLERANCE
    assert len(decoder_segments(first_stage_model)) == len(decoder_segments(tiny))


def test_codec_tiles_when_asked_and_matches_untiled(tiny):
    codec = LatentCodec(1.0, 0.0, tiny)
    x = (natural_image(160, 224) + 1) / 2
    tiled = VAETiling(tile=16)  # the encoder's core: 16 latent px = 128 image px
    assert (codec.encode(x) - codec.encode(x, tiling=tiled)).abs().max() <= TOLERANCE
    z = codec.encode(x)
    assert (codec.decode(z) - codec.decode(z, tiled)).abs().max() <= TOLERANCE
    assert torch.equal(codec.decode(z), codec.decode(z, VAETiling()))  # 160 x 224 is under the automatic threshold


def test_automatic_tile_size_follows_the_budget(tiny):
    z = torch.randn(1, 4, 64, 64)
    small = tiled_decode(tiny, z, VAETiling(memory_budget=2 << 20))
    big = tiled_decode(tiny, z, VAETiling(memory_budget=1 << 30))
    assert (small - big).abs().max().item() / 2 <= TOLERANCE
    segments, cpu = decoder_segments(tiny), torch.device("cpu")
    assert auto_tile(segments, z, VAETiling(memory_budget=2 << 20), cpu) < \
        auto_tile(segments, z, VAETiling(memory_budget=64 << 20), cpu)


def test_bad_inputs(tiny):
    with pytest.raises(SMFSRError, match=r"expected \(B, 4, H, W\)"):
        tiled_decode(tiny, torch.randn(1, 16, 16, 16), VAETiling(tile=16))
    with pytest.raises(SMFSRError, match="must be a multiple of 8"):
        tiled_encode_moments(tiny, torch.rand(1, 3, 60, 64), VAETiling(tile=4))
    with pytest.raises(SMFSRError, match="at least 1 latent cell"):
        VAETiling(tile=0)


def test_half_precision_keeps_statistics_in_float32(tiny):
    vae = make_vae(vae_config("tiny"), seed=3).to(torch.bfloat16)
    z = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        ref = vae.decoder(z).float()
    out = tiled_decode(vae, z, VAETiling(tile=16)).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 arithmetic differs from the untiled bf16 run by rounding only
    assert (out - ref).abs().mean().item() / 2 < 0.02


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_statistics_pooled_over_tiles_match_the_whole_map(offset):
    """Moments merged over uneven tiles give each group's mean and variance as float64 would over
    the whole map, also where the mean is large against the spread (offset: 5 standard deviations)."""
    from smfsr.tiling.vae import Moments

    g = torch.Generator().manual_seed(0)
    std = 1 + 2 * torch.rand(1, 8, 1, 1, generator=g)
    x = (torch.randn(2, 8, 150, 130, generator=g) + offset) * std
    moments = Moments()
    for y0, y1 in ((0, 64), (64, 128), (128, 150)):
        for x0, x1 in ((0, 100), (100, 130)):
            moments.add(x[..., y0:y1, x0:x1])
    norm = nn.GroupNorm(4, 8)
    mean, var = moments.group_stats(norm)
    grouped = x.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean, grouped.mean(-1), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(var, grouped.var(-1, correction=0), rtol=1e-6, atol=0)
