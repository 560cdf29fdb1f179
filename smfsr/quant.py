"""fp8 weights: the transformer blocks' linear layers stored as float8 (e4m3fn) with a scale per
output channel, upcast layer by layer to the compute dtype when they run.

    w ~ scale * q,   q = fp8(w / scale),   scale_o = max_i |w_oi| / 448      (448: e4m3fn's largest value)

What stays in higher precision, and why: every layer outside ``transformer_blocks`` (the patch
embedding, the time / interval / pooled-text embedders, the context embedder, the final norm and
projection, a detail head): together about 1.4 % of the SD3.5-sized network's weights, and the ones
whose errors reach every token (the time embedding steers every block's modulation; the final
projection writes the velocity itself); biases and norms are vectors, not worth quantising. The
sin-cos position table (226 M values in SD3.5-medium) is not a weight: bundles leave it out and
the loader recomputes it.

In memory the fp8 data is held as uint8 and the float32 scales as their int32 bit patterns
(``Module.to(dtype)`` casts every floating-point tensor, float8 included, and would undo the saving
or round the scales); on disk they are float8_e4m3fn ``*.weight`` and float32 ``*.weight_scale``. A GPU with fp8 matmuls (compute capability 8.9+) could multiply in fp8 (``torch._scaled_mm``);
that path is not used: it has not been measured faster here (no GPU was available to measure it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, SMFSRError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_FORMAT = "fp8_e4m3fn"  # what bundles record in their "smfsr_weights" metadata
GRANULARITIES = ("channel", "tensor")


def fp8_supported() -> str | None:
    """Why this torch cannot hold float8 weights, or None if it can."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn (fp8 needs torch 2.1 or newer)"
    return None


def quantize(weight: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 data, float32 scale): a scale per output channel (shape (out, 1)) or one for the tensor."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if granularity == "channel" else w.abs().max().reshape(1, 1)
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    """A linear layer with fp8 weights and a float32 scale; the product runs in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, granularity: str = "channel",
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=torch.uint8, device=device))
        scale_shape = (out_features, 1) if granularity == "channel" else (1, 1)
        self.register_buffer("weight_scale_bits", torch.ones(scale_shape, device=device).view(torch.int32))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "channel") -> "FP8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity=granularity,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.weight.device.type != "meta":
            data, scale = quantize(linear.weight, granularity)
            layer.weight_fp8 = data.view(torch.uint8)
            layer.weight_scale_bits = scale.view(torch.int32)
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale_bits.view(torch.float32)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight_fp8.view(FP8).to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # on disk: "weight" as float8_e4m3fn (readable by any safetensors tool) and "weight_scale"
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight_fp8.view(FP8)
        destination[prefix + "weight_scale"] = self.weight_scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for ours, theirs, bits in (("weight_fp8", "weight", torch.uint8), ("weight_scale_bits", "weight_scale", torch.int32)):
            if prefix + theirs in state_dict:
                value = state_dict.pop(prefix + theirs)
                state_dict[prefix + ours] = value.view(bits) if value.element_size() == bits.itemsize else value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3fn, scale per {self.granularity}"


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The linear layers fp8 applies to: those inside the transformer blocks."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, FP8Linear)) and name.startswith("transformer_blocks.")]


def to_fp8(model: nn.Module, granularity: str = "channel") -> nn.Module:
    """Replace the block linears by FP8Linear, quantising their weights (in place; also on meta)."""
    if granularity not in GRANULARITIES:
        raise SMFSRError(f"fp8 scale granularity must be one of {GRANULARITIES}, not {granularity!r}")
    reason = fp8_supported()
    if reason:
        raise SMFSRError(f"fp8 weights are not possible here: {reason}")
    for name in quantized_layer_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if isinstance(layer, nn.Linear):
            setattr(parent, child, FP8Linear.from_linear(layer, granularity))
    return model


def is_fp8(model: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in model.modules())


def check_fp8_tensors(header: dict, names: list[str], path, granularity: str) -> None:
    """Each fp8 layer's weight is float8_e4m3fn with a float32 scale of the recorded granularity."""
    problems = []
    for name in names:
        w, s = header.get(f"{name}.weight"), header.get(f"{name}.weight_scale")
        if w is None or s is None:
            problems.append(f"{name}: {'weight' if w is None else 'weight_scale'} missing")
            continue
        if w[1] != "F8_E4M3":
            problems.append(f"{name}.weight is {w[1]}, expected F8_E4M3")
        expected = (w[0][0], 1) if granularity == "channel" else (1, 1)
        if s[1] != "F32" or tuple(s[0]) != expected:
            problems.append(f"{name}.weight_scale is {s[1]} {list(s[0])}, expected F32 {list(expected)}")
    if problems:
        shown = "\n    ".join(problems[:6]) + (f"\n    ... and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"{path}: its fp8 weights do not match its metadata:\n    {shown}\n"
                              "The file is damaged or was written by another tool; convert it again "
                              "(`smfsr convert --weights fp8`).")


def check_scales(model: nn.Module, path) -> None:
    """Scales must be finite and positive: a corrupt one would silently scale a layer to garbage."""
    bad = [name for name, m in model.named_modules() if isinstance(m, FP8Linear)
           and not (torch.isfinite(m.weight_scale).all() and (m.weight_scale > 0).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} fp8 scale tensor(s) are not finite and positive ({bad[0]}, ...); "
                              "the file is damaged: convert it again")
