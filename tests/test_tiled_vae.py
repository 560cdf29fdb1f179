"""Exact tiled VAE: tiled == untiled for diffusers and ldm-named (ComfyUI) VAEs, any size."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from smfsr.codec import LatentCodec
from smfsr.errors import SMFSRError
from smfsr.models.presets import vae_config
from smfsr.options import VAETiling
from smfsr.tiling.vae import decoder_steps, tiled_decode, tiled_encode_moments, _split
from tests.helpers import photo_like

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


def test_result_does_not_depend_on_tile_size(tiny):
    z = torch.randn(2, 4, 48, 40, generator=torch.Generator().manual_seed(1))  # a batch of two
    a = tiled_decode(tiny, z, VAETiling(tile=16))
    b = tiled_decode(tiny, z, VAETiling(tile=32, cache_budget=0))  # recompute path, no cache
    assert (a - b).abs().max().item() / 2 <= TOLERANCE


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


def test_fast_mode_is_approximate_and_its_error_is_reported(tiny, capsys):
    x = natural_image(320, 448)
    with torch.no_grad():
        z = tiny.encoder(x)[:, :4]
        ref = tiny.decoder(z)
    exact = (tiled_decode(tiny, z, VAETiling(tile=16)) - ref).abs().max().item() / 2
    fast = (tiled_decode(tiny, z, VAETiling(mode="fast", tile=16)) - ref).abs().max().item() / 2
    with capsys.disabled():
        print(f"\n[tiled VAE, tiny random VAE, 40x56 latent, tile 16] max abs error (image 0..1): exact {exact:.2e}, fast {fast:.2e}")
    assert exact <= TOLERANCE < fast < float("inf")


class LDM(nn.Module):
    """An empty container: the ldm module tree is built from names alone."""


def ldm_vae(vae: AutoencoderKL) -> nn.Module:
    """The same weights under ldm/ComfyUI module names (first_stage_model.encoder.down[i].block[j]...)."""

    def resnet(r):
        b = LDM()
        b.norm1, b.conv1, b.norm2, b.conv2 = r.norm1, r.conv1, r.norm2, r.conv2
        if r.conv_shortcut is not None:
            b.nin_shortcut = r.conv_shortcut
        return b

    def attention(a):
        b = LDM()
        b.norm = a.group_norm
        for name, lin in (("q", a.to_q), ("k", a.to_k), ("v", a.to_v), ("proj_out", a.to_out[0])):
            conv = nn.Conv2d(lin.in_features, lin.out_features, 1)
            conv.weight.data, conv.bias.data = lin.weight.data[..., None, None].clone(), lin.bias.data.clone()
            setattr(b, name, conv)
        return b

    def mid(m):
        b = LDM()
        b.block_1, b.attn_1, b.block_2 = resnet(m.resnets[0]), attention(m.attentions[0]), resnet(m.resnets[1])
        return b

    enc, dec = LDM(), LDM()
    enc.conv_in, enc.down, enc.mid = vae.encoder.conv_in, nn.ModuleList(), mid(vae.encoder.mid_block)
    for down in vae.encoder.down_blocks:
        level = LDM()
        level.block = nn.ModuleList(resnet(r) for r in down.resnets)
        if down.downsamplers:
            level.downsample = LDM()
            level.downsample.conv = down.downsamplers[0].conv
        enc.down.append(level)
    enc.norm_out, enc.conv_out = vae.encoder.conv_norm_out, vae.encoder.conv_out
    dec.conv_in, dec.mid, dec.up = vae.decoder.conv_in, mid(vae.decoder.mid_block), nn.ModuleList()
    for up in reversed(vae.decoder.up_blocks):  # ldm indexes levels from the highest resolution
        level = LDM()
        level.block = nn.ModuleList(resnet(r) for r in up.resnets)
        if up.upsamplers:
            level.upsample = LDM()
            level.upsample.conv = up.upsamplers[0].conv
        dec.up.append(level)
    dec.norm_out, dec.conv_out = vae.decoder.conv_norm_out, vae.decoder.conv_out
    model = LDM()
    model.encoder, model.decoder = enc, dec
    return model


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
    assert len(decoder_steps(first_stage_model)) == len(decoder_steps(tiny))


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
    from smfsr.tiling.vae import auto_tile

    steps = decoder_steps(tiny)
    assert auto_tile(tiny, steps, z, VAETiling(memory_budget=2 << 20)) < auto_tile(tiny, steps, z, VAETiling(memory_budget=64 << 20))


def test_bad_inputs(tiny):
    with pytest.raises(SMFSRError, match=r"expected \(B, 4, H, W\)"):
        tiled_decode(tiny, torch.randn(1, 16, 16, 16), VAETiling(tile=16))
    halo = max(p.halo for p in _split(decoder_steps(tiny), "exact") if hasattr(p, "halo"))
    with pytest.raises(SMFSRError, match="smaller than the halo"):
        tiled_decode(tiny, torch.randn(1, 4, 32, 32), VAETiling(tile=halo - 1))
    with pytest.raises(SMFSRError, match="exact' or 'fast"):
        VAETiling(mode="quick")


def test_half_precision_keeps_statistics_in_float32(tiny):
    vae = make_vae(vae_config("tiny"), seed=3).to(torch.bfloat16)
    z = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        ref = vae.decoder(z).float()
    out = tiled_decode(vae, z, VAETiling(tile=16)).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 arithmetic differs from the untiled bf16 run by rounding only
    assert (out - ref).abs().mean().item() / 2 < 0.02
