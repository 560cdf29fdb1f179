"""The refinement stage's discriminator: a frozen DINOv3 ViT read at several depths, with small
trainable heads that turn each depth's patch tokens into a map of real/fake logits.

    features_l = patch tokens of block l (B, D, H/p, W/p)      frozen DINOv3, l in ``layers``
    logits_l   = head_l(features_l [+ proj_l(LR image)])       trainable, one map per layer

Why DINOv3: its features are semantic, so the generator is pushed towards textures that look like
the right *kind* of thing (fur, bark, foliage) rather than towards pixel statistics (method.md 2.5).
The backbone never trains and never gets gradients to its weights; the generator's images reach
it with their input gradient. Preprocessing is done here by hand (resize + ImageNet normalisation)
so no torchvision is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ImageNet statistics DINOv3's web-image backbones are trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WHERE_TO_PUT_WEIGHTS = (
    "The refine stage needs a DINOv3 ViT in the transformers layout (config.json + model.safetensors), e.g. "
    "facebook/dinov3-vits16-pretrain-lvd1689m (gated: accept its licence on the Hugging Face hub, then "
    "`huggingface-cli download facebook/dinov3-vits16-pretrain-lvd1689m --local-dir weights/dinov3-vits16`) "
    "and pass --dinov3 weights/dinov3-vits16. Nothing is downloaded at run time."
)


def load_dinov3(path: str | Path | None) -> nn.Module:
    """A frozen ``DINOv3ViTModel`` from a local folder (safetensors only; never a download)."""
    from transformers import DINOv3ViTModel

    if not path:
        raise SystemExit("config: dinov3 is not set. " + WHERE_TO_PUT_WEIGHTS)
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"dinov3: {folder} has no config.json (not a transformers model folder). " + WHERE_TO_PUT_WEIGHTS)
    if not list(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise SystemExit(f"dinov3: no .safetensors weights in {folder} (found: {found}); pickled weights are "
                         "never loaded. " + WHERE_TO_PUT_WEIGHTS)
    model = DINOv3ViTModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return model.eval().requires_grad_(False)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """"3,6,9,12" -> [3, 6, 9, 12]: hidden-state indices (0 = patch embeddings, n = after block n)."""
    try:
        layers = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"config: dino_layers must be comma-separated integers, not {spec!r}") from None
    bad = [x for x in layers if not 1 <= x <= num_layers]
    if not layers or bad:
        raise SystemExit(f"config: dino_layers {spec!r}: each must be a block index in 1..{num_layers}")
    return layers


def preprocess(images: torch.Tensor, resolution: int, patch: int) -> torch.Tensor:
    """Images in [0, 1] -> DINOv3 input: the short side resized to ``resolution`` (sides rounded to a
    multiple of the patch size), ImageNet-normalised."""
    h, w = images.shape[-2:]
    scale = resolution / min(h, w)
    size = (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))
    x = images if (h, w) == size else F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                                     antialias=size[0] < h)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def dino_features(backbone: nn.Module, images: torch.Tensor, layers: list[int], resolution: int) -> list[torch.Tensor]:
    """Patch-token maps (B, D, H/p, W/p) of the chosen layers for images in [0, 1]."""
    config = backbone.config
    x = preprocess(images.float(), resolution, config.patch_size)
    grid = (x.shape[-2] // config.patch_size, x.shape[-1] // config.patch_size)
    hidden = backbone(pixel_values=x.to(backbone.dtype), output_hidden_states=True).hidden_states
    skip = 1 + config.num_register_tokens  # the CLS token, then the register tokens, then the patches
    return [hidden[i][:, skip:].transpose(1, 2).reshape(x.shape[0], -1, *grid).float() for i in layers]


class FeatureHead(nn.Module):
    """Patch tokens (+ the LR image at the token grid) -> one logit per token."""

    def __init__(self, dim: int, width: int, conditioned: bool):
        super().__init__()
        self.inp = nn.Conv2d(dim, width, 1)
        self.lr = nn.Conv2d(3, width, 1) if conditioned else None
        self.body = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, 1, 1))

    def forward(self, features: torch.Tensor, lr: torch.Tensor | None) -> torch.Tensor:
        h = self.inp(features)
        if self.lr is not None:
            h = h + self.lr(F.interpolate(lr * 2 - 1, size=features.shape[-2:], mode="area"))
        return self.body(h)


class DiscriminatorHeads(nn.Module):
    """The trainable part of the discriminator: one head per DINOv3 layer."""

    def __init__(self, dim: int, num_layers: int, width: int = 128, conditioned: bool = True):
        super().__init__()
        self.conditioned = conditioned
        self.heads = nn.ModuleList(FeatureHead(dim, width, conditioned) for _ in range(num_layers))

    def forward(self, features: list[torch.Tensor], lr: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [head(f, lr if self.conditioned else None) for head, f in zip(self.heads, features)]


# --- losses: each averaged over the layers' logit maps ------------------------------------------


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":  # E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]
        parts = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    else:  # non-saturating: E[softplus(-D(x))] + E[softplus(D(G(z)))]
        parts = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)]
    return torch.stack(parts).mean()


def generator_adversarial_loss(fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":  # -E[D(G(z))]
        parts = [-f.mean() for f in fake]
    else:  # E[softplus(-D(G(z)))]
        parts = [F.softplus(-f).mean() for f in fake]
    return torch.stack(parts).mean()


def r1_penalty(logits: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """R1 = E ||grad_x D(x)||^2 on real images (``images`` must require grad)."""
    total = torch.stack([lg.sum() for lg in logits]).sum()
    (grad,) = torch.autograd.grad(total, images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def save_random_dinov3(folder: str | Path, **overrides) -> Path:
    """A randomly initialised DINOv3 ViT in the transformers layout (tests and CPU trials only: a
    random backbone has no semantics, so it is no substitute for the released weights)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    settings = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8,
                    image_size=64, num_register_tokens=2)
    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(**{**settings, **overrides}))
    model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
