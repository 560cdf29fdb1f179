"""One definition of what the doors offer (smfsr.options): A1111's settings, the app's sliders and
the CLI's choices render it. (ComfyUI's widgets are compared in tests/test_comfyui.py, from a real
server's /object_info.)"""

from __future__ import annotations

import dataclasses

from smfsr import options as o


def test_a1111_settings_render_the_cores_ranges_and_lists():
    from a1111_extension import logic

    settings = {s.key: s.args for s in logic.SETTINGS}
    for key, r in {"smfsr_steps": o.STEPS, "smfsr_tile": o.LATENT_TILE, "smfsr_tile_overlap": o.LATENT_TILE_OVERLAP,
                   "smfsr_vae_tile": o.VAE_TILE, "smfsr_block_swap": o.BLOCK_SWAP}.items():
        assert settings[key] == {"minimum": r.minimum, "maximum": r.maximum, "step": r.step}, key
    assert settings["smfsr_color_fix"]["choices"] == list(o.COLOR_FIX_CHOICES)
    assert settings["smfsr_dtype"]["choices"] == list(o.DTYPE_CHOICES)


def test_the_apps_sliders_render_the_cores_ranges():
    from smfsr.app import slider_limits
    from smfsr.checkpoint.catalog import find_models
    from smfsr.checkpoint.default_model import REPO_MODELS

    entry = find_models([REPO_MODELS])[0]
    steps, tile = slider_limits(dataclasses.replace(entry, max_steps=0))  # a model that takes any number
    assert (steps["minimum"], steps["maximum"], steps["step"]) == (o.STEPS.minimum, o.STEPS.maximum, o.STEPS.step)
    assert tile["maximum"] == o.LATENT_TILE.maximum // entry.patch * entry.patch and tile["step"] == entry.patch


def test_the_clis_choices_are_the_cores():
    from smfsr.arguments import build_parser

    parser = build_parser()
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["upscale"]._actions}
    assert tuple(actions["dtype"].choices) == o.DTYPE_CHOICES
    assert tuple(actions["color_fix"].choices) == o.COLOR_FIXES


def test_the_ranges_hold_every_default():
    for r in (o.STEPS, o.LATENT_TILE, o.LATENT_TILE_OVERLAP, o.VAE_TILE, o.SCALE, o.BLOCK_SWAP):
        assert r.minimum <= 0 <= r.maximum and r.step > 0
    assert o.COLOR_FIX_CHOICES[0] == o.DTYPE_CHOICES[0] == "auto"
