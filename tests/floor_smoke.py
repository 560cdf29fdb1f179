"""Run by a host's Python (tests/test_floor.py): the paths of the official weights on that host's
torch and diffusers (A1111 1.10.1: torch 2.1.2 with the diffusers install.py picks; Forge: torch
2.3.1 with diffusers 0.31.0, the floor requirements.txt declares). Prints one line per check."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from smfsr.checkpoint import build_transformer, build_vae, import_official_transformer, import_vae, load_model  # noqa: E402
from smfsr.checkpoint.bundle import Bundle, save_bundle  # noqa: E402
from smfsr.checkpoint.defaults import SD35_VAE_SCALE, SD35_VAE_SHIFT, PipelineDefaults  # noqa: E402
from smfsr.models import transformer_config, vae_config  # noqa: E402
from smfsr.pipeline import SMFSRUpscaler  # noqa: E402
from smfsr.options import UpscaleOptions  # noqa: E402
from tests.helpers import ldm_vae, perturb, write_official_folder  # noqa: E402

print("versions", torch.__version__, diffusers.__version__)
torch.manual_seed(0)
model = perturb(build_transformer(transformer_config("tiny-official")), 3).eval()
c = model.config
z = torch.randn(1, c.in_channels, 8, 8)
args = (z, torch.randn_like(z), torch.randn(1, 5, c.joint_attention_dim), torch.randn(1, c.pooled_projection_dim),
        torch.ones(1), torch.zeros(1))
with torch.no_grad():
    want = model(*args)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    # the official folder (the dead modules included) and a bundle (its position table left out)
    official = import_official_transformer(write_official_folder(tmp / "smfsr_q", model)).eval()
    # SD's 32 GroupNorm groups: a single file does not say how many, importers assume SD's
    vae = build_vae(vae_config("tiny", block_out_channels=(32, 32, 64, 64), norm_num_groups=32,
                               scaling_factor=SD35_VAE_SCALE, shift_factor=SD35_VAE_SHIFT)).eval()
    path = save_bundle(tmp / "b.safetensors", Bundle(
        transformer=model, vae=vae, prompt_embeds=args[2], prompt_pooled=args[3], defaults=PipelineDefaults(
        upscale=4, steps=1, process_size=32, latent_tile=16, latent_overlap=4)))
    bundle = load_model(path)
    with torch.no_grad():
        print("official folder", torch.allclose(official(*args), want, atol=1e-5))
        print("bundle", "pos_embed.pos_embed" in bundle.transformer.state_dict(),
              torch.allclose(bundle.transformer.eval()(*args), want, atol=1e-5))
    # an ldm-named VAE inside a single file (Stability's layout), through diffusers' converter
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in ldm_vae(vae).state_dict().items()},
              str(tmp / "sd3.5_medium.safetensors"))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        single = import_vae(tmp / "sd3.5_medium.safetensors")
        print("ldm vae", torch.allclose(single.encoder(x), vae.encoder(x), atol=1e-5))
    out = SMFSRUpscaler.from_pretrained(path, device="cpu")(torch.rand(1, 3, 24, 32), UpscaleOptions())
    print("upscale", tuple(out.shape), bool(torch.isfinite(out).all()))

# SD3.5-medium's config built on the meta device, as every load does first: nothing allocated
# (diffusers < 0.32 computes the 384^2 x 1536 position table in numpy float64 as it builds: 3.4 GB)
from smfsr.checkpoint.build import on_meta  # noqa: E402


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak starts again from what is resident now
before = peak_bytes()
big = on_meta(lambda: build_transformer(transformer_config("sd35-medium")))
print("meta build MiB", (peak_bytes() - before) // 2**20, big.pos_embed.pos_embed.is_meta)
