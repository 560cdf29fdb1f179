"""The SMFSR transformer: official key/shape compatibility and the official behaviours."""

from __future__ import annotations

import pytest
import torch

from smfsr.checkpoint import OPTIONAL_TRANSFORMER_KEYS, build_transformer, expected_shapes
from smfsr.models import SMFSRTransformer, transformer_config
from tests.helpers import perturb

D, FF, HEAD = 1536, 6144, 64


def official_manifest() -> dict[str, tuple[int, ...]]:
    """The official SMFSR checkpoint's keys and shapes, written out from method.md sections 2 and 5."""
    m: dict[str, tuple[int, ...]] = {}

    def linear(name, out, inp):
        m[f"{name}.weight"], m[f"{name}.bias"] = (out, inp), (out,)

    m["pos_embed.proj.weight"], m["pos_embed.proj.bias"] = (D, 16, 2, 2), (D,)
    m["pos_embed.pos_embed"] = (1, 384 * 384, D)
    tte = "time_text_embed_interval.time_text_embed"
    linear(f"{tte}.timestep_embedder.linear_1", D, 256)
    linear(f"{tte}.timestep_embedder.linear_2", D, D)
    linear(f"{tte}.text_embedder.linear_1", D, 2048)
    linear(f"{tte}.text_embedder.linear_2", D, D)
    for prefix in ("time_text_embed_interval.interval_embedder", "interval_embedder"):
        linear(f"{prefix}.0", D, 2 * D)
        linear(f"{prefix}.2", D, D)
    linear("context_embedder", D, 4096)
    linear("norm_out.linear", 2 * D, D)
    linear("proj_out", 64, D)
    for i in range(24):
        b = f"transformer_blocks.{i}"
        linear(f"{b}.norm1.linear", 9 * D if i <= 12 else 6 * D, D)
        linear(f"{b}.norm1_context.linear", 6 * D if i < 23 else 2 * D, D)
        attns = ["attn"] + (["attn2"] if i <= 12 else [])
        for a in attns:
            for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                         "to_q_control", "to_k_control", "to_v_control", "to_out_control"):
                linear(f"{b}.{a}.{proj}", D, D)
            if a == "attn2" or i < 23:
                linear(f"{b}.{a}.to_add_out", D, D)
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                m[f"{b}.{a}.{norm}.weight"] = (HEAD,)
        linear(f"{b}.ff.net.0.proj", FF, D)
        linear(f"{b}.ff.net.2", D, FF)
        m[f"{b}.ff.control_conv.weight"], m[f"{b}.ff.control_conv.bias"] = (FF, 1, 3, 3), (FF,)
        if i < 23:
            linear(f"{b}.ff_context.net.0.proj", FF, D)
            linear(f"{b}.ff_context.net.2", D, FF)
    return m


def test_sd35_medium_state_dict_matches_the_official_manifest():
    ours = expected_shapes(lambda: SMFSRTransformer(**transformer_config("sd35-medium")))
    manifest = official_manifest()
    assert sorted(set(manifest) - set(ours)) == []
    assert sorted(set(ours) - set(manifest)) == []
    assert {k: v for k, v in ours.items() if manifest[k] != v} == {}
    params = sum(torch.Size(s).numel() for k, s in ours.items() if k != "pos_embed.pos_embed")
    assert abs(params / 1e9 - 2.731) < 0.001  # method.md 4: ~2.731 B learnable parameters


def test_dit4sr_teacher_uses_the_stock_time_embedding_names():
    teacher = expected_shapes(lambda: SMFSRTransformer(**transformer_config("dit4sr-sd35-medium")))
    assert "time_text_embed.timestep_embedder.linear_1.weight" in teacher
    assert not any(k.startswith(("time_text_embed_interval.", "interval_embedder.")) for k in teacher)


def test_only_dead_official_modules_are_optional():
    optional = [k for k in official_manifest() if OPTIONAL_TRANSFORMER_KEYS.match(k)]
    assert "pos_embed.pos_embed" in optional
    assert all(k.startswith(("interval_embedder.", "pos_embed.pos_embed")) or ".attn2.add_" in k
               or ".attn2.to_add_out" in k or ".attn2.norm_added_" in k for k in optional)


def _inputs(model: SMFSRTransformer, h: int = 8, w: int = 8, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, h, w, generator=g),
        lr_latent=torch.randn(batch, c.in_channels, h, w, generator=g),
        encoder_hidden_states=torch.randn(batch, 3, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        r_timestep=torch.rand(batch, generator=g) * 0.3 if c.interval_embedding else None,
    )


def test_non_square_latents_work():
    model = perturb(build_transformer(transformer_config("tiny")), 0).eval()
    with torch.no_grad():
        out = model(**_inputs(model, h=6, w=14))
    assert out.shape == (2, 4, 6, 14)
    assert torch.isfinite(out).all()


def test_lr_key_quirk_ignores_to_k_control_and_the_fix_uses_it():
    for quirk in (True, False):
        model = perturb(build_transformer(transformer_config("tiny", lr_key_quirk=quirk)), 1).eval()
        inputs = _inputs(model)
        with torch.no_grad():
            before = model(**inputs)
            for block in model.transformer_blocks:
                block.attn.to_k_control.weight.mul_(3.0)
            after = model(**inputs)
        changed = not torch.allclose(before, after, atol=1e-6)
        assert changed != quirk, f"lr_key_quirk={quirk}"


def test_control_scale_weights_the_lr_injection():
    model = perturb(build_transformer(transformer_config("tiny", control_scale=1.2)), 2).eval()
    inputs = _inputs(model)
    with torch.no_grad():
        a = model(**inputs)
        for block in model.transformer_blocks:
            block.ff.control_scale = 0.0
        b = model(**inputs)
        for block in model.transformer_blocks:
            block.ff.control_conv.weight.zero_()
            block.ff.control_conv.bias.zero_()
            block.ff.control_scale = 1.2
        c = model(**inputs)
    assert not torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(b, c, atol=1e-6)


def test_time_scale_maps_unit_time_onto_the_network_scale():
    base = perturb(build_transformer(transformer_config("tiny-teacher", time_scale=1.0)), 3).eval()
    scaled = build_transformer(transformer_config("tiny-teacher", time_scale=1000.0)).eval()
    scaled.load_state_dict(base.state_dict())
    inputs = _inputs(base)
    inputs["r_timestep"] = None
    with torch.no_grad():
        expected = base(**{**inputs, "timestep": inputs["timestep"] * 1000})
        got = scaled(**inputs)
    assert torch.allclose(expected, got, atol=1e-5)


def test_interval_model_uses_r_and_shares_one_time_embedder():
    model = perturb(build_transformer(transformer_config("tiny")), 4).eval()
    inputs = _inputs(model)
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, "r_timestep": inputs["r_timestep"] + 0.2})
    assert not torch.allclose(a, b, atol=1e-6)
    assert len([n for n, _ in model.named_modules() if n.endswith("timestep_embedder")]) == 1
    with pytest.raises(ValueError, match="r_timestep"):
        model(**{**inputs, "r_timestep": None})


def test_latent_size_checks():
    model = build_transformer(transformer_config("tiny")).eval()
    inputs = _inputs(model, h=7, w=8)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(**inputs)
    inputs = _inputs(model)
    inputs["lr_latent"] = inputs["lr_latent"][..., :6]
    with pytest.raises(ValueError, match="differ"):
        model(**inputs)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = perturb(build_transformer(transformer_config("tiny")), 5)
    inputs = _inputs(model)
    model(**inputs).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(**inputs).square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-official", "tiny-official-teacher", "tiny"])
def test_the_modules_forward_never_runs_are_exactly_those_named(preset):
    """A forward and backward leave exactly the parameters of ``unused_modules`` without a gradient
    (the official layout's dead modules, and to_k_control under lr_key_quirk): the trainer freezes
    them, or DDP fails at its second step."""
    from smfsr.checkpoint import build_transformer
    from smfsr.models.presets import transformer_config

    m = build_transformer(transformer_config(preset))
    c = m.config
    z = torch.randn(2, c.in_channels, 8, 8)
    t = torch.rand(2)
    m(z, torch.randn_like(z), torch.randn(2, 5, c.joint_attention_dim), torch.randn(2, c.pooled_projection_dim), t,
      t * 0.5 if c.interval_embedding else None).pow(2).mean().backward()
    no_grad = {n for n, p in m.named_parameters() if p.grad is None}
    unused = tuple(f"{name}." for name in m.unused_modules())
    assert no_grad == {n for n, _ in m.named_parameters() if n.startswith(unused)}
    assert bool(no_grad) == preset.startswith("tiny-official")
