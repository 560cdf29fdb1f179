"""Trainer II: the refine stage (GAN on a frozen backbone, perceptual loss, VSD) on tiny configs
(CPU): who gets which gradient with each backbone, each loss on its own, resume, LoRA generator,
multi-step training, export, and the backbone loaders' errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from smfsr.options import UpscaleOptions
from smfsr.pipeline import SMFSRUpscaler
from tests.helpers import TINY_TRAIN_CONFIG, build_networks, photo_like, save_random_dinov3, \
    save_random_feature_stack, train

TINY = TINY_TRAIN_CONFIG


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Photos, a tiny teacher + distilled student (run/flow.safetensors, run/meanflow.safetensors),
    a random tiny DINOv3 in the transformers layout and a random narrow VGG-16 feature stack."""
    root = tmp_path_factory.mktemp("refine")
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        Image.fromarray(photo_like(96, 128, seed=i)).save(photos / f"p{i}.png")
    run = root / "run"
    train(photos, run, "--stage", "flow", "--max-steps", "10")
    train(photos, run, "--stage", "meanflow", "--max-steps", "10")
    return {"photos": photos, "run": run, "dino": save_random_dinov3(root / "dinov3"),
            "vgg": save_random_feature_stack(root / "vgg.safetensors")}


def refine_args(setup, *args: str) -> list[str]:
    run = setup["run"]
    return ["--stage", "refine", "--disc-backbone", str(setup["dino"]), "--init", str(run / "meanflow.safetensors"),
            "--teacher", str(run / "flow.safetensors"), *args]


VGG = ["--disc-layers", "2,3", "--disc-resolution", "0", "--weight-perceptual", "1.0"]


def vgg_args(setup, *args: str) -> list[str]:
    return refine_args(setup, "--disc-backbone", str(setup["vgg"]), *VGG, *args)


def networks_and_batch(setup, *args: str, vgg: bool = False):
    from smfsr_trainer.config import load_config
    from smfsr_trainer.data import SRPairs

    chosen = vgg_args(setup, *args) if vgg else refine_args(setup, *args)
    config, _ = load_config(["--config", TINY, "--train-dir", str(setup["photos"]), *chosen])
    torch.manual_seed(0)
    nets = build_networks(config)
    data = SRPairs(str(setup["photos"]), crop=64, scale=4, degradation="bicubic", seed=0)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("hr", "lr")}
    return config, nets, batch


def fresh(config, nets, batch, seed: int = 7):
    """The same micro-batch (same noise and times) every call."""
    from smfsr_trainer.stages import get_stage

    return get_stage("refine").batch(config, nets, batch, torch.Generator().manual_seed(seed), torch.device("cpu"))


def grads(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def clear(*modules: torch.nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


@pytest.mark.parametrize("backbone", ["dinov3", "vgg"])
def test_each_network_gets_gradients_only_from_its_own_loss(setup, backbone):
    from smfsr_trainer.stages.refine import discriminator_step_loss, fake_score_loss, generator_loss

    config, nets, batch = networks_and_batch(setup, "--r1-gamma", "1.0", vgg=backbone == "vgg")
    r = nets.extra
    everyone = (nets.trained, r.fake, r.heads, r.backbone, r.teacher, nets.codec.vae)
    b = fresh(config, nets, batch)

    loss, parts = generator_loss(config, r, nets.trained, nets.codec, b)
    assert {"loss_l2", "loss_gan", "vsd_mismatch"} <= set(parts)
    assert ("loss_perceptual" in parts) == (backbone == "vgg")
    assert r.perceptual is (r.backbone if backbone == "vgg" else None)  # one file, one network
    loss.backward()
    assert grads(nets.trained)
    assert not (grads(r.heads) | grads(r.fake) | grads(r.backbone) | grads(r.teacher) | grads(nets.codec.vae))
    assert all(p.requires_grad for p in r.heads.parameters())  # unfrozen again after the generator's turn
    clear(*everyone)

    assert not b.sample.requires_grad  # the fake score trains on detached samples
    loss, _ = fake_score_loss(config, r.fake, b)
    loss.backward()
    trained = grads(r.fake)
    assert trained and all("lora_" in n for n in trained)  # only the adapters, never the teacher's weights
    assert r.fake is r.teacher  # the fake score's adapters sit on the teacher: no second copy of it
    assert not (grads(nets.trained) | grads(r.heads))
    clear(*everyone)

    loss, parts = discriminator_step_loss(config, r, r.heads, nets.codec, b)
    assert parts["r1"] >= 0
    loss.backward()
    assert grads(r.heads)
    assert not (grads(nets.trained) | grads(r.fake) | grads(r.backbone) | grads(r.teacher) | grads(nets.codec.vae))


def descend(params, loss_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
    values = []
    for _ in range(steps):
        loss = loss_fn()
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return values


def test_each_loss_decreases_when_trained_alone_on_a_fixed_batch(setup):
    from smfsr_trainer.stages.refine import discriminator_step_loss, fake_score_loss, generator_loss

    config, nets, batch = networks_and_batch(setup)
    r = nets.extra
    only = {"weight_l2": 0.0, "weight_l1": 0.0, "weight_gan": 0.0, "weight_vsd": 0.0}

    def generator_term(term: str):
        """The generator's loss with only ``term`` on."""
        c = type(config)(**{**vars(config), **only, term: 1.0})
        return lambda: generator_loss(c, r, nets.trained, nets.codec, fresh(config, nets, batch))[0]

    def with_sample(fn):
        def run():
            b = fresh(config, nets, batch)
            with torch.no_grad():
                generator_loss(config, r, nets.trained, nets.codec, b)
            return fn(b)[0]
        return run

    d = descend(r.heads.parameters(), with_sample(lambda b: discriminator_step_loss(config, r, r.heads, nets.codec, b)), 6, 1e-3)
    f = descend(r.fake.parameters(), with_sample(lambda b: fake_score_loss(config, r.fake, b)), 6, 3e-3)
    state = {k: v.clone() for k, v in nets.trained.state_dict().items()}
    l2 = descend(nets.trained.parameters(), generator_term("weight_l2"), 6, 1e-3)
    nets.trained.load_state_dict(state)
    adv = descend(nets.trained.parameters(), generator_term("weight_gan"), 6, 1e-3)
    print(f"\ndiscriminator {d[0]:.4f} -> {d[-1]:.4f}, fake score {f[0]:.4f} -> {f[-1]:.4f}, "
          f"l2 {l2[0]:.4f} -> {l2[-1]:.4f}, adversarial {adv[0]:.4f} -> {adv[-1]:.4f}")
    for name, values in {"discriminator": d, "fake score": f, "l2": l2, "adversarial": adv}.items():
        assert values[-1] < values[0], (name, values)


def test_a_vsd_step_moves_samples_against_the_score_mismatch(setup):
    """VSD's value need not fall on a fixed batch while the fake score is frozen (for Gaussian scores
    x0_fake - x0_real does not depend on x at all); what must hold is that a generator step moves
    its samples along -(x0_fake - x0_real), the direction that lowers KL(p_fake || p_real)."""
    from smfsr_trainer.stages import guided, velocity_fn
    from smfsr_trainer.stages.refine import fake_score_loss, generate, generator_loss, real_score_fn
    from smfsr_trainer.vsd import vsd_loss

    config, nets, batch = networks_and_batch(setup)
    r = nets.extra
    opt = torch.optim.Adam(r.fake.parameters(), lr=3e-3)
    for _ in range(6):  # the fake score starts equal to the teacher (LoRA B = 0), where VSD is zero
        b = fresh(config, nets, batch)
        with torch.no_grad():
            generator_loss(config, r, nets.trained, nets.codec, b)
        loss, _ = fake_score_loss(config, r.fake, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = fresh(config, nets, batch)
    noise = torch.randn(b.x.shape, generator=torch.Generator().manual_seed(1))
    vsd_noise = torch.randn(b.x.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full((b.x.shape[0],), 0.5)
    x_hat = generate(nets.trained, noise, b.cond)
    real = guided(real_score_fn(r.teacher), 1.0, None, None)
    surrogate, mismatch = vsd_loss(x_hat, real, velocity_fn(r.fake), vsd_noise, t, b.cond)
    assert mismatch.min() > 0
    (direction,) = torch.autograd.grad(surrogate, x_hat, retain_graph=True)  # (x0_fake - x0_real) / (w n)
    surrogate.backward()
    with torch.no_grad():
        for p in nets.trained.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
        moved = generate(nets.trained, noise, b.cond) - x_hat.detach()
    cosine = torch.nn.functional.cosine_similarity(moved.flatten(), -direction.flatten(), dim=0)
    print(f"\ncosine(sample change, -VSD gradient) = {cosine.item():.3f}")
    assert cosine > 0.1


def test_refine_stage_resumes_exactly_and_exports_a_one_step_upscaler(setup, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = refine_args(setup, "--max-steps", "4", "--checkpoint-every", "2")
    path = train(setup["photos"], straight, *args)
    train(setup["photos"], broken, *refine_args(setup, "--max-steps", "2", "--checkpoint-every", "2"))
    (broken / "refine.safetensors").unlink()
    train(setup["photos"], broken, *args, "--resume")
    a, b = load_file(str(straight / "refine.safetensors")), load_file(str(broken / "refine.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # the bundle holds only what inference needs: the same tensors as the student it started from
    student = load_file(str(setup["run"] / "meanflow.safetensors"))
    assert a.keys() == student.keys()
    assert any(not torch.equal(a[k], student[k]) for k in a if k.startswith("transformer."))
    up = SMFSRUpscaler.from_pretrained(path, device="cpu")
    assert up.transformer.is_average_velocity and up.defaults.steps == 1
    assert up(Image.open(next(setup["photos"].iterdir()))).size == (512, 384)
    checkpoint = sorted((straight / "refine").glob("checkpoint-*"))[-1]
    assert len(list(checkpoint.glob("optimizer*.bin"))) == 3  # generator, fake score, discriminator


def test_generator_as_a_lora_trains_only_adapters_and_exports_merged_weights(setup, tmp_path):
    config, nets, _ = networks_and_batch(setup, "--trainable", "lora", "--lora-rank", "4")
    trainable = [n for n, p in nets.trained.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    path = train(setup["photos"], tmp_path / "lora", *refine_args(setup, "--max-steps", "2", "--trainable", "lora",
                                                                   "--lora-rank", "4", "--weight-gan", "0"))
    exported = load_file(str(path))
    student = load_file(str(setup["run"] / "meanflow.safetensors"))
    assert exported.keys() == student.keys()  # merged: no adapter tensors in the bundle
    changed = [k for k in exported if not torch.equal(exported[k], student[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    assert not (tmp_path / "lora" / "refine" / "checkpoint-00000002" / "optimizer_2.bin").exists()  # no discriminator


def test_real_score_is_the_teacher_without_the_fake_scores_adapters(setup):
    """The fake score's adapters live in the teacher's layers: once they have trained, the fake
    score differs from the teacher and the real score is still exactly the teacher."""
    from smfsr.checkpoint import load_model
    from smfsr_trainer.conditioning import velocity_fn
    from smfsr_trainer.stages.refine import fake_score_loss, generator_loss, real_score_fn

    config, nets, batch = networks_and_batch(setup)
    r = nets.extra
    b = fresh(config, nets, batch)
    generator_loss(config, r, nets.trained, nets.codec, b)[0].backward()
    with torch.no_grad():  # make the adapters non-zero, as a few fake-score steps would
        for name, p in r.fake.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    assert all(p.requires_grad for n, p in r.fake.named_parameters() if "lora_" in n)
    original = load_model(setup["run"] / "flow.safetensors", dtype=torch.float32).transformer.eval()
    z, t = torch.randn_like(b.x), torch.full((len(b.x),), 0.6)
    with torch.no_grad():
        real = real_score_fn(r.teacher)(z, t, b.cond)
        fake = velocity_fn(r.fake)(z, t, b.cond)
        reference = velocity_fn(original)(z, t, b.cond)
    assert torch.allclose(real, reference, atol=1e-6)
    assert (fake - reference).abs().max() > 1e-3
    # the adapters are still trainable after the real score switched them off and on
    assert all(p.requires_grad for n, p in r.fake.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in r.fake.named_parameters() if "lora_" not in n)
    fake_score_loss(config, r.fake, b)[0].backward()


def test_backbones_load_from_local_safetensors_with_clear_errors(setup, tmp_path):
    from smfsr_trainer.backbones import load_backbone, parse_depths

    with pytest.raises(SystemExit, match="not set.*huggingface-cli download.*convert_stlpips"):
        load_backbone(None)
    with pytest.raises(SystemExit, match="does not exist.*convert_stlpips"):
        load_backbone(tmp_path / "missing")
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        load_backbone(folder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((setup["dino"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    with pytest.raises(SystemExit, match="pickled weights are never loaded"):
        load_backbone(pickled)
    pth = tmp_path / "vgg_shift_tolerant.pth"
    pth.write_bytes(b"PK\x03\x04 a torch.save zip")
    with pytest.raises(SystemExit, match="pickled PyTorch checkpoint"):
        load_backbone(pth)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SystemExit, match="not a feature network.*convert_stlpips"):
        load_backbone(tmp_path / "other.safetensors")

    vit = load_backbone(setup["dino"], 64)
    assert not any(p.requires_grad for p in vit.parameters()) and vit.depth == 4
    with pytest.raises(SystemExit, match="1..4"):
        parse_depths("2,5", vit.depth)
    x = vit.preprocess(torch.full((1, 3, 48, 80), 0.485))
    assert x.shape == (1, 3, 64, 104) and x[:, 0].abs().max() < 1e-5  # short side 64, sides x8, normalised
    assert [f.shape for f in vit(torch.rand(2, 3, 48, 80), [2, 4])] == [(2, 32, 8, 13)] * 2

    vgg = load_backbone(setup["vgg"], 0)
    assert vgg.depth == 5 and vgg.channels == [4, 8, 16, 32, 64] and vgg.has_distance
    maps = vgg(torch.rand(2, 3, 64, 96), [1, 2, 3])
    assert [m.shape[-2:] for m in maps] == [(64, 96), (33, 49), (17, 25)]  # about /2 per pooling (ST-LPIPS pads 2)
    from smfsr_trainer.backbones import image_distance

    a = torch.rand(2, 3, 64, 64)
    assert torch.allclose(image_distance(vgg, a, a), torch.zeros(2)) and (image_distance(vgg, a, a.flip(-1)) > 0).all()


def test_a_vgg_refine_with_the_perceptual_loss_resumes_exactly_and_exports(setup, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = vgg_args(setup, "--max-steps", "4", "--checkpoint-every", "2", "--weight-vsd", "0", "--refine-steps", "1,2")
    path = train(setup["photos"], straight, *args)
    train(setup["photos"], broken, *vgg_args(setup, "--max-steps", "2", "--checkpoint-every", "2", "--weight-vsd", "0",
                                             "--refine-steps", "1,2"))
    (broken / "refine.safetensors").unlink()
    train(setup["photos"], broken, *args, "--resume")
    a, b = load_file(str(straight / "refine.safetensors")), load_file(str(broken / "refine.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    up = SMFSRUpscaler.from_pretrained(path, device="cpu")
    for steps in (1, 2):
        assert up(Image.open(next(setup["photos"].iterdir())), UpscaleOptions(steps=steps)).size == (512, 384)


def test_the_generator_trains_at_each_step_count_it_is_given(setup):
    from smfsr_trainer.stages import get_stage

    config, nets, batch = networks_and_batch(setup, "--refine-steps", "1,2,4")
    drawn = {get_stage("refine").batch(config, nets, batch, torch.Generator().manual_seed(s), torch.device("cpu")).steps
             for s in range(40)}
    assert drawn == {1, 2, 4}
    from smfsr_trainer.stages.refine import generate

    b = fresh(config, nets, batch)
    noise = torch.randn(b.x.shape, generator=torch.Generator().manual_seed(3))
    two = generate(nets.trained, noise, b.cond, 2)
    two.square().mean().backward()  # differentiable through both steps
    assert any(p.grad is not None for p in nets.trained.parameters())
    from smfsr import meanflow

    with torch.no_grad():
        u = lambda z, r, t: nets.trained(z, b.cond.lr_latent, b.cond.embeds, b.cond.pooled, t, r)  # noqa: E731
        assert torch.allclose(two.detach(), meanflow.sample_average_velocity(u, noise, 2), atol=1e-5)


def test_refine_needs_a_distilled_student_and_a_flow_teacher(setup, tmp_path):
    from smfsr_trainer.config import load_config
    run = setup["run"]
    swapped = ["--config", TINY, "--train-dir", str(setup["photos"]), "--stage", "refine", "--disc-backbone",
               str(setup["dino"]), "--init", str(run / "flow.safetensors"), "--teacher", str(run / "flow.safetensors")]
    with pytest.raises(SystemExit, match="not a mean-flow"):
        build_networks(load_config(swapped)[0])
    missing = ["--config", TINY, "--train-dir", str(setup["photos"]), "--stage", "refine", "--output-dir",
               str(tmp_path), "--weight-gan", "0"]
    with pytest.raises(SystemExit, match="flow.safetensors does not exist"):
        build_networks(load_config(missing)[0])


def test_gan_losses_and_r1_have_their_textbook_values():
    import math

    from smfsr_trainer.discriminator import discriminator_loss, generator_adversarial_loss, r1_penalty

    sure = [torch.full((2, 1, 3, 3), 2.0)], [torch.full((2, 1, 3, 3), -2.0)]  # D right with margin
    assert discriminator_loss(*sure, "hinge").item() == 0.0
    assert math.isclose(discriminator_loss(*sure, "nonsaturating").item(), 2 * math.log1p(math.exp(-2)), rel_tol=1e-6)
    assert generator_adversarial_loss(sure[1], "hinge").item() == 2.0
    assert math.isclose(generator_adversarial_loss(sure[1], "nonsaturating").item(), math.log1p(math.exp(2)), rel_tol=1e-6)
    x = torch.randn(3, 3, 4, 4, requires_grad=True)
    assert math.isclose(r1_penalty([(2.0 * x).sum((1, 2, 3), keepdim=True)], x).item(), 4.0 * 48, rel_tol=1e-6)
