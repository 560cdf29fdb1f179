"""SMFSRUpscaler end to end on a tiny bundle: sizes, seeds, tiling, colour fix, image modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from smfsr.color import adain, wavelet, wavelet_split
from smfsr.devices import OutOfMemoryError
from smfsr.errors import ImageError, SMFSRError
from smfsr.imageio import from_pil
from smfsr.pipeline import SMFSRUpscaler, UpscaleOptions, seeded_noise
from smfsr.tiling.latent import gaussian_weights, tile_grid, tiled_apply
from tests.helpers import photo_like, tiny_bundle


@pytest.fixture(scope="module")
def upscaler() -> SMFSRUpscaler:
    return SMFSRUpscaler(tiny_bundle())


def image(h=24, w=32, seed=0) -> Image.Image:
    return Image.fromarray(photo_like(h, w, seed))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def test_output_is_scale_times_input_for_any_scale(upscaler):
    img = image(21, 30)  # odd sizes: the working size is a multiple of 16, the output is exact
    assert upscaler(img).size == (120, 84)
    assert upscaler(img, UpscaleOptions(scale=2)).size == (60, 42)
    assert upscaler(img, UpscaleOptions(scale=2.5)).size == (75, 52)


def test_same_seed_same_image_different_seed_different_detail(upscaler):
    img = image()
    a, b = upscaler(img, UpscaleOptions(seed=5)), upscaler(img, UpscaleOptions(seed=5))
    c = upscaler(img, UpscaleOptions(seed=6))
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 0.5


def test_noise_does_not_depend_on_batch_position():
    both = seeded_noise((2, 4, 8, 8), [3, 4], draws=2)
    alone = seeded_noise((1, 4, 8, 8), [4], draws=2)
    assert torch.equal(both[0][1], alone[0][0]) and torch.equal(both[1][1], alone[1][0])
    assert not torch.equal(both[0][1], both[1][1])


def test_batch_equals_one_by_one(upscaler):
    x = torch.stack([torch.from_numpy(photo_like(24, 32, s)).permute(2, 0, 1).float() / 255 for s in (0, 1)])
    batch = upscaler(x, UpscaleOptions(), seeds=[10, 11])
    one = upscaler(x[1:], UpscaleOptions(seed=11))
    assert batch.shape == (2, 3, 96, 128)
    assert torch.allclose(batch[1], one[0], atol=1e-5)


def test_latent_tiling_with_a_local_function_differs_only_at_tile_borders():
    """The blending machinery: with a purely local function (a 3x3 conv), tiled == untiled except
    within the conv's reach of a tile edge, and even there the Gaussian weights keep it small."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    z = torch.randn(1, 4, 40, 56)
    with torch.no_grad():
        full = conv(z)
        tiled = tiled_apply(lambda x: conv(x), [z], (16, 16), 6)
    diff = (full - tiled).abs()[0].amax(0)
    edges = torch.zeros(40, 56, dtype=torch.bool)  # tile edges inside the image (image borders are exact)
    for t in tile_grid(40, 56, (16, 16), 6):
        for y, inside in ((t.y0, t.y0 > 0), (t.y1 - 1, t.y1 < 40)):
            edges[y, t.x0:t.x1] |= inside
        for x, inside in ((t.x0, t.x0 > 0), (t.x1 - 1, t.x1 < 56)):
            edges[t.y0:t.y1, x] |= inside
    interior = ~edges
    assert diff[interior].max() < 1e-5
    assert diff.max() < 0.05 * full.abs().max()


def test_tiles_cover_any_shape_with_edge_anchored_last_tiles():
    tiles = tile_grid(30, 70, (16, 24), 8)
    assert {(t.y1 - t.y0, t.x1 - t.x0) for t in tiles} == {(16, 24)}
    assert max(t.y1 for t in tiles) == 30 and max(t.x1 for t in tiles) == 70
    covered = torch.zeros(30, 70)
    for t in tiles:
        covered[t.y0:t.y1, t.x0:t.x1] = 1
    assert covered.all()
    w = gaussian_weights(16, 24)
    assert w.shape == (16, 24) and torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))


def test_tiled_sampling_of_the_tiny_model_stays_close_to_untiled(upscaler):
    x = torch.from_numpy(photo_like(40, 56)).permute(2, 0, 1).float()[None] / 255
    untiled = upscaler(x, UpscaleOptions(tile_size=0, color_fix="none"))
    tiled = upscaler(x, UpscaleOptions(tile_size=16, tile_overlap=6, color_fix="none"))
    assert untiled.shape == tiled.shape == (1, 3, 160, 224)
    diff = (untiled - tiled).abs()
    # Tiles see less attention context, so they are not identical; the blend keeps them close.
    assert diff.mean() < 0.02, diff.mean()
    assert diff.max() < 0.5, diff.max()


def test_steps_change_the_result_and_teachers_run_with_euler():
    up = SMFSRUpscaler(tiny_bundle())
    img = image()
    one, two = up(img, UpscaleOptions(steps=1)), up(img, UpscaleOptions(steps=2))
    assert np.abs(pixels(one) - pixels(two)).mean() > 0.1
    teacher = SMFSRUpscaler(tiny_bundle(preset="tiny-teacher", flow_shift=1.0))
    calls = []
    out = teacher(img, UpscaleOptions(steps=3), progress=lambda d, t: calls.append((d, t)))
    assert out.size == (128, 96) and calls[-1] == (3, 3)


def test_progress_reports_every_tile_and_an_exception_interrupts(upscaler):
    x = torch.from_numpy(photo_like(40, 56)).permute(2, 0, 1).float()[None] / 255
    seen = []
    upscaler(x, UpscaleOptions(tile_size=16, tile_overlap=4, steps=2), progress=lambda d, t: seen.append((d, t)))
    total = seen[-1][1]
    assert seen == [(i, total) for i in range(1, total + 1)] and total == 2 * 4

    class Stop(Exception):
        pass

    def interrupt(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        upscaler(x, UpscaleOptions(tile_size=16, tile_overlap=4), progress=interrupt)


def test_color_fix_matches_reference_statistics():
    g = torch.Generator().manual_seed(0)
    sr = torch.rand(1, 3, 64, 64, generator=g) * 0.5
    ref = torch.rand(1, 3, 64, 64, generator=g) * 0.2 + 0.6
    fixed = adain(sr, ref)
    assert torch.allclose(fixed.mean((-2, -1)), ref.mean((-2, -1)), atol=1e-5)
    assert torch.allclose(fixed.std((-2, -1)), ref.std((-2, -1)), atol=1e-3)
    high, low = wavelet_split(sr)
    assert torch.allclose(high + low, sr, atol=1e-6)
    w = wavelet(sr, ref)
    assert torch.allclose(w.mean((-2, -1)), ref.mean((-2, -1)), atol=0.02)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "I;16", "I", "CMYK", "1", "RGB"])
def test_any_image_mode_is_accepted(upscaler, mode):
    rgb = image(24, 32)
    if mode in ("I;16", "I"):
        gray = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        src = Image.fromarray(gray.astype(np.uint16) if mode == "I;16" else gray.astype(np.int32))
        assert src.mode == mode
    elif mode == "RGBA":
        src = rgb.convert("RGBA")
        alpha = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))
        src.putalpha(Image.fromarray(alpha))
    elif mode == "PA":
        src = rgb.convert("RGBA").convert("PA") if hasattr(Image, "PA") else rgb.convert("P")
    else:
        src = rgb.convert(mode)
    decoded = from_pil(src)
    out = upscaler.upscale_image(decoded)
    assert out.size == (128, 96)
    if mode == "RGBA":
        assert out.mode == "RGBA" and any("alpha" in n and "kept" in n for n in decoded.notes)
        a = np.asarray(out)[..., 3].astype(float)
        assert a[:, 0].mean() < 20 and a[:, -1].mean() > 235  # the gradient survives upscaling
    if mode in ("I;16", "I"):
        assert any("8-bit" in n for n in decoded.notes)
        assert abs(decoded.rgb.max().item() - np.asarray(rgb.convert("L")).max() / 255) < 1e-3
    # grayscale in, grayscale out; a kept alpha comes back (this LA image's alpha is opaque: dropped)
    expected = {"L": "L", "1": "L", "I;16": "L", "I": "L", "LA": "L", "RGBA": "RGBA"}.get(mode, "RGB")
    assert out.mode == expected, (mode, out.mode)


def test_grayscale_with_transparency_stays_grayscale_with_its_alpha(upscaler):
    gray = image(24, 32).convert("L")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1)))
    source = Image.merge("LA", (gray, alpha))
    out = upscaler.upscale_image(from_pil(source))
    assert out.mode == "LA" and out.size == (128, 96)


def test_a_16_bit_colour_png_is_read_with_a_notice(tmp_path, upscaler):
    """PIL decodes 16-bit colour PNGs to 8 bits per channel: the user is told, not left to guess."""
    import struct
    import zlib

    from smfsr.imageio import open_image

    h, w = 12, 16
    pixels = (np.arange(h * w * 3).reshape(h, w, 3) * 300 % 65536).astype(">u2")
    raw = b"".join(b"\x00" + pixels[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "rgb16.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    decoded = from_pil(open_image(path))
    assert any("16-bit colour PNG" in n and "8 bits per channel" in n for n in decoded.notes)
    assert decoded.rgb.shape == (3, h, w)
    plain = tmp_path / "rgb8.png"
    image(12, 16).save(plain)
    assert not from_pil(open_image(plain)).notes


def test_bad_inputs_give_clear_errors(upscaler):
    with pytest.raises(ImageError, match="1x1 pixels"):
        upscaler(Image.new("RGB", (1, 1)))
    with pytest.raises(SMFSRError, match=r"\[0, 1\]"):
        upscaler(torch.full((1, 3, 16, 16), 2.0))
    with pytest.raises(SMFSRError, match="unknown --color-fix .sepia.; choose one of adain, wavelet, none"):
        upscaler(image(), UpscaleOptions(color_fix="sepia"))
    with pytest.raises(SMFSRError, match="multiple of the model's patch size"):
        upscaler(image(), UpscaleOptions(tile_size=7))
    with pytest.raises(SMFSRError, match="no VAE"):
        bundle = tiny_bundle()
        bundle.vae = None
        SMFSRUpscaler(bundle)


def test_out_of_memory_halves_the_tile_and_retries(monkeypatch):
    up = SMFSRUpscaler(tiny_bundle())
    real = up.transformer.forward
    sizes = []

    def flaky(hidden_states, *a, **k):
        sizes.append(hidden_states.shape[-1])
        if hidden_states.shape[-1] > 16:
            raise OutOfMemoryError("simulated")
        return real(hidden_states, *a, **k)

    monkeypatch.setattr(up.transformer, "forward", flaky)
    x = torch.from_numpy(photo_like(64, 64)).permute(2, 0, 1).float()[None] / 255  # a 32x32 latent
    out = up(x, UpscaleOptions(tile_size=32, tile_overlap=8))
    assert out.shape == (1, 3, 256, 256) and sizes[0] == 32 and set(sizes[1:]) == {16}


@pytest.mark.parametrize("dtype, fix", [(torch.float32, "the model file may be damaged"),
                                        (torch.bfloat16, "set ${dtype} to fp32")])
def test_non_finite_results_are_refused_with_the_setting_that_fixes_them(dtype, fix):
    """A half-precision overflow becomes NaN/inf: refused after sampling and after decoding, never
    saved as a black image; the message names the precision setting in each door's terms."""
    from smfsr.errors import CLI_NAMES, door_message

    x = torch.from_numpy(photo_like(24, 32)).permute(2, 0, 1).float()[None] / 255
    up = SMFSRUpscaler(tiny_bundle())
    up.transformer.to(dtype)
    with torch.no_grad():
        up.transformer.proj_out.weight[0, 0] = float("inf")  # one overflowed weight
    with pytest.raises(SMFSRError) as caught:
        up(x)
    message = str(caught.value)
    assert "the sampled latent holds" in message and "NaN or inf values" in message and fix in caught.value.template
    if dtype != torch.float32:
        assert "set --dtype to fp32" in door_message(caught.value, CLI_NAMES)
    up = SMFSRUpscaler(tiny_bundle())
    rgb_out = [m for m in up.codec.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 3]
    assert rgb_out
    with torch.no_grad():  # the VAE's last layer overflows instead
        for m in rgb_out:
            m.bias.fill_(float("nan"))
    with pytest.raises(SMFSRError, match="the decoded image holds .* NaN or inf values"):
        up(x)


def test_vae_tiling_is_an_option_with_an_explicit_off(upscaler):
    from smfsr.options import VAETiling

    x = torch.from_numpy(photo_like(40, 56)).permute(2, 0, 1).float()[None] / 255
    tiled = upscaler(x, UpscaleOptions(vae_tiling=VAETiling(tile=16)))  # an explicit tile always tiles
    untiled = upscaler(x, UpscaleOptions(vae_tiling=VAETiling.off()))
    assert VAETiling(tile=16).tiles(1) and not VAETiling.off().tiles(10**9) and not VAETiling().tiles(160 * 224)
    assert (tiled - untiled).abs().max() <= 1e-4  # exact tiling: same image
    assert torch.equal(untiled, upscaler(x))  # automatic: a small image is not tiled
