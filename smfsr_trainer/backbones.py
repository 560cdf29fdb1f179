"""Frozen feature networks read at several depths: the refine stage's discriminator backbone, its
perceptual loss, and the benchmark's perceptual distance. Local safetensors only; never a download.

Two kinds, one interface (``FeatureBackbone``: images in [0, 1] -> feature maps at chosen depths):
- any transformers vision model in a local folder (config.json + *.safetensors): DINOv3 (the
  default, method.md 2.5), DINOv2, SigLIP's vision tower, ConvNeXt, ...; a ViT's patch tokens are
  laid out as maps, CLS and register tokens dropped;
- a convolutional feature stack in one .safetensors file written by
  ``smfsr_trainer/recipes/quality/convert_stlpips.py``: the shift-tolerant VGG-16 or AlexNet of
  ST-LPIPS (Ghildyal & Liu, ECCV 2022), rebuilt here from its layer list, plus LPIPS's per-channel
  weights, so the same file gives features and a perceptual distance.

    LPIPS distance   d(x, y) = sum_l mean_hw  w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WHERE_TO_PUT_WEIGHTS = (
    "Put a backbone on local disk and pass its path: a transformers vision model folder (config.json + "
    "model.safetensors), e.g. facebook/dinov3-vits16-pretrain-lvd1689m (gated: accept its licence on the hub, then "
    "`huggingface-cli download facebook/dinov3-vits16-pretrain-lvd1689m --local-dir weights/dinov3-vits16`), or the "
    "ST-LPIPS VGG-16 file made by `python smfsr_trainer/recipes/quality/convert_stlpips.py` (weights/stlpips-vgg16."
    "safetensors). Nothing is downloaded at run time."
)

# The shift-tolerant ("antialiased, blur after, reflection pad 2, first conv stride 1") networks of
# ST-LPIPS: each entry is one layer, in the order (and with the indices) of the published weights.
#   conv:P   a convolution (its shape is in the file) with zero padding P
#   max:K    max pooling K x K, stride 1
#   blur     a fixed 3x3 binomial filter per channel, stride 2, after reflection padding of 2
#   relu
_VGG_CONVS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
ARCHITECTURES = {
    "vgg16-st": {
        "layers": [op for v in _VGG_CONVS for op in (["max:2", "blur"] if v == "M" else ["conv:1", "relu"])],
        "taps": [3, 9, 17, 25, 33],  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    },
    "alexnet-st": {
        "layers": ["conv:2", "blur", "relu", "max:3", "blur", "conv:2", "relu", "max:3", "blur", "conv:1", "relu",
                   "conv:1", "relu", "conv:1", "relu"],
        "taps": [2, 6, 10, 12, 14],  # relu1 .. relu5
    },
}


class FeatureBackbone(nn.Module):
    """Frozen; ``forward(images, depths)`` -> one (B, C, h, w) map per depth (1-based)."""

    channels: list[int]  # channels at depth 1, 2, ...
    has_distance: bool = False

    @property
    def depth(self) -> int:
        return len(self.channels)


class FeatureStack(FeatureBackbone):
    """A convolutional stack rebuilt from ``ARCHITECTURES`` and a converted state dict."""

    def __init__(self, arch: str, state: dict[str, torch.Tensor]):
        super().__init__()
        spec = ARCHITECTURES[arch]
        self.arch, self.ops, self.taps = arch, spec["layers"], spec["taps"]
        self.register_buffer("shift", state["shift"].reshape(1, 3, 1, 1).float())
        self.register_buffer("scale", state["scale"].reshape(1, 3, 1, 1).float())
        self.convs = nn.ModuleDict()
        blurs = {}
        for i, op in enumerate(self.ops):
            if op.startswith("conv"):
                w = state[f"layers.{i}.weight"]
                conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], padding=int(op.split(":")[1]))
                conv.load_state_dict({"weight": w, "bias": state[f"layers.{i}.bias"]})
                self.convs[str(i)] = conv
            elif op == "blur":
                blurs[str(i)] = state[f"layers.{i}.filt"].float()
        for name, filt in blurs.items():
            self.register_buffer(f"blur_{name}", filt)
        self.channels = [self._channels_at(t) for t in self.taps]
        lins = [state.get(f"lin.{k}.weight") for k in range(len(self.taps))]
        self.has_distance = all(w is not None for w in lins)
        for k, w in enumerate(lins):
            if w is not None:
                self.register_buffer(f"lin_{k}", w.reshape(1, -1, 1, 1).float())
        self.eval().requires_grad_(False)

    def _channels_at(self, index: int) -> int:
        return next(self.convs[str(i)].out_channels for i in range(index, -1, -1) if str(i) in self.convs)

    def forward(self, images: torch.Tensor, depths: list[int]) -> list[torch.Tensor]:
        x = ((images * 2 - 1) - self.shift) / self.scale
        wanted, out = {self.taps[d - 1]: d for d in depths}, {}
        last = max(wanted)
        for i, op in enumerate(self.ops[: last + 1]):
            if op.startswith("conv"):
                x = self.convs[str(i)](x)
            elif op == "relu":
                x = F.relu(x)
            elif op.startswith("max"):
                x = F.max_pool2d(x, int(op.split(":")[1]), stride=1)
            else:  # blur: anti-aliased stride-2 downsampling
                filt = getattr(self, f"blur_{i}")
                x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), filt.to(x.dtype), stride=2, groups=x.shape[1])
            if i in wanted:
                out[wanted[i]] = x
        return [out[d] for d in depths]

    def lpips(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
        """Per-image LPIPS distance from the features at every depth (the file's LPIPS weights)."""
        total = 0
        for k, (a, b) in enumerate(zip(fa, fb)):
            total = total + ((unit(a) - unit(b)) ** 2 * getattr(self, f"lin_{k}")).sum(1).mean((-2, -1))
        return total


def unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each position's feature vector scaled to unit length (LPIPS's channel normalisation)."""
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + eps)


class TransformersBackbone(FeatureBackbone):
    """A transformers vision model; depth d is its hidden state after block d, as a map."""

    def __init__(self, model: nn.Module, resolution: int):
        super().__init__()
        self.model, self.resolution = model.eval().requires_grad_(False), resolution
        config = getattr(model.config, "vision_config", model.config)
        self.patch = getattr(config, "patch_size", 1)
        self.register_tokens = getattr(config, "num_register_tokens", 0) or 0
        width = getattr(config, "hidden_size", None) or getattr(config, "hidden_sizes", [None])[-1]
        sizes = getattr(config, "hidden_sizes", None)
        self.channels = list(sizes) if sizes else [width] * config.num_hidden_layers

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The short side resized to ``resolution`` (sides a multiple of the patch), ImageNet-normalised."""
        h, w = images.shape[-2:]
        scale = self.resolution / min(h, w) if self.resolution else 1.0
        p = self.patch
        size = (max(p, round(h * scale / p) * p), max(p, round(w * scale / p) * p))
        x = images if (h, w) == size else F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                                         antialias=size[0] < h)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: torch.Tensor, depths: list[int]) -> list[torch.Tensor]:
        x = self.preprocess(images.float())
        dtype = next(self.model.parameters()).dtype
        hidden = self.model(pixel_values=x.to(dtype), output_hidden_states=True).hidden_states
        maps = []
        for d in depths:
            h = hidden[d]
            if h.ndim == 3:  # tokens: CLS, registers, then the patch grid
                grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
                patches = h[:, h.shape[1] - grid[0] * grid[1]:]
                h = patches.transpose(1, 2).reshape(x.shape[0], -1, *grid)
            maps.append(h.float())
        return maps


def load_backbone(path: str | Path | None, resolution: int = 224, *, what: str = "backbone") -> FeatureBackbone:
    """A frozen backbone from a local transformers folder or a converted feature-stack file (a dry
    run plans a transformers folder from its config alone, and an absent one as DINOv3 ViT-S/16)."""
    from smfsr.checkpoint.safe_read import is_planning

    if is_planning() and (not path or not Path(path).exists() or Path(path).is_dir()):
        return planned_backbone(path, resolution, what)
    if not path:
        raise SystemExit(f"config: the {what} is not set. " + WHERE_TO_PUT_WEIGHTS)
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{what}: {path} does not exist. " + WHERE_TO_PUT_WEIGHTS)
    if path.is_file():
        return load_feature_stack(path, what)
    if not (path / "config.json").is_file():
        raise SystemExit(f"{what}: {path} has no config.json (not a transformers model folder). " + WHERE_TO_PUT_WEIGHTS)
    if not list(path.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise SystemExit(f"{what}: no .safetensors weights in {path} (found: {found}); pickled weights are never "
                         "loaded. " + WHERE_TO_PUT_WEIGHTS)
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    if getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
        model = model.vision_model  # a two-tower model (SigLIP, CLIP): its image tower
    return TransformersBackbone(model, resolution)


def planned_backbone(path: str | Path | None, resolution: int, what: str) -> FeatureBackbone:
    """A transformers backbone built from its config on the current (meta) device; DINOv3 ViT-S/16
    (transformers' default config) for a path that does not exist yet."""
    from transformers import AutoConfig, AutoModel, DINOv3ViTConfig

    from smfsr.checkpoint.safe_read import plan_note

    if path and (Path(path) / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    else:
        plan_note(f"{what} {path or '(unset)'} not found: shapes of DINOv3 ViT-S/16 (transformers' default config)")
        config = DINOv3ViTConfig()
    model = AutoModel.from_config(config)
    if getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
        model = model.vision_model
    return TransformersBackbone(model, resolution)


def load_feature_stack(path: Path, what: str = "backbone") -> FeatureStack:
    from smfsr.checkpoint import read_header
    from smfsr.checkpoint.safe_read import load_tensors
    from smfsr.errors import CheckpointError

    try:
        metadata, _ = read_header(path)
    except CheckpointError as e:
        raise SystemExit(f"{what}: {e}") from None
    arch = metadata.get("smfsr_feature_net")
    if arch not in ARCHITECTURES:
        raise SystemExit(f"{what}: {path} is a safetensors file but not a feature network this trainer knows "
                         f"(metadata smfsr_feature_net={arch!r}; known: {', '.join(ARCHITECTURES)}). "
                         + WHERE_TO_PUT_WEIGHTS)
    state = load_tensors(path)
    expected = {"shift", "scale"} | {f"layers.{i}.{p}" for i, op in enumerate(ARCHITECTURES[arch]["layers"])
                                     for p in ({"conv": ("weight", "bias"), "blur": ("filt",)}.get(op.split(":")[0], ()))}
    missing = sorted(expected - set(state))
    if missing:
        raise SystemExit(f"{what}: {path} lacks {len(missing)} tensors of {arch} ({', '.join(missing[:4])}, ...); "
                         "convert it again")
    return FeatureStack(arch, state)


def parse_depths(spec: str, depth: int, what: str = "disc_layers") -> list[int]:
    """"3,6,9,12" -> [3, 6, 9, 12]: depths 1..``depth`` (a ViT's block index, a stack's tap)."""
    try:
        depths = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"config: {what} must be comma-separated integers, not {spec!r}") from None
    bad = [x for x in depths if not 1 <= x <= depth]
    if not depths or bad:
        raise SystemExit(f"config: {what} {spec!r}: each must be a depth in 1..{depth} of this backbone")
    return depths


def perceptual_distance(backbone: FeatureBackbone, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """Per-image distance from features at every depth: the backbone's own LPIPS weights when it
    has them, else the mean squared difference of unit-normalised features, summed over depths."""
    if backbone.has_distance:
        return backbone.lpips(fa, fb)
    return sum((unit(a) - unit(b)).pow(2).sum(1).mean((-2, -1)) for a, b in zip(fa, fb))


def image_distance(backbone: FeatureBackbone, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image perceptual distance between images in [0, 1] (e.g. ST-LPIPS, for evaluation)."""
    depths = list(range(1, backbone.depth + 1))
    return perceptual_distance(backbone, backbone(a, depths), backbone(b, depths))
