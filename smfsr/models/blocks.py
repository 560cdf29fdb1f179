"""The DiT4SR MMDiT block: SD3.5's joint block run on [noisy tokens, LR tokens] (method.md 2.2)."""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from torch import nn

from .attention import LRJointAttention


class FeedForwardControl(FeedForward):
    """GELU-tanh MLP on all 2N tokens, with the LR half injected into the noisy half through a
    zero-initialised depthwise 3x3 conv on the token grid (DiT4SR ``FeedForwardControl``):

        h = gelu(W1 [x; c]);   h_x <- h_x + control_scale * dwconv3x3(h_c);   out = W2 [h_x; h_c]

    The official ``control_scale`` is 1.2. The grid is passed explicitly, so it need not be square.
    """

    def __init__(self, dim: int, control_scale: float):
        super().__init__(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        inner = self.net[2].in_features
        self.control_scale = control_scale
        self.control_conv = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner)
        nn.init.zeros_(self.control_conv.weight)
        nn.init.zeros_(self.control_conv.bias)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h = self.net[0](hidden_states)
        h_x, h_c = h.chunk(2, dim=1)
        batch, n, channels = h_c.shape
        c_map = h_c.transpose(1, 2).reshape(batch, channels, *grid)
        h_x = h_x + self.control_scale * self.control_conv(c_map).flatten(2).transpose(1, 2)
        h = self.net[1](torch.cat([h_x, h_c], dim=1))
        return self.net[2](h)


class SRJointBlock(nn.Module):
    """One MMDiT block. adaLN modulation, attention and MLP weights are shared by the noisy and
    the LR tokens; text tokens have their own stream (absent after the last block)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        context_pre_only: bool,
        dual_attention: bool,
        qk_norm: str | None,
        lr_key_quirk: bool,
        control_scale: float,
        official_dead_modules: bool,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.dual_attention = dual_attention
        self.norm1 = SD35AdaLayerNormZeroX(dim) if dual_attention else AdaLayerNormZero(dim)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(
                dim, dim, elementwise_affine=False, eps=1e-6, bias=True, norm_type="layer_norm"
            )
        else:
            self.norm1_context = AdaLayerNormZero(dim)
        self.attn = LRJointAttention(
            dim, lr_key_quirk=lr_key_quirk, added_kv_proj_dim=dim, dim_head=head_dim, heads=heads,
            context_pre_only=context_pre_only, qk_norm=qk_norm,
        )
        if dual_attention:
            # DiT4SR builds attn2 with text projections it never uses (method.md 5.5); they exist
            # only so official checkpoints load without unexpected keys.
            dead = dict(added_kv_proj_dim=dim, context_pre_only=False) if official_dead_modules else {}
            self.attn2 = LRJointAttention(
                dim, lr_key_quirk=lr_key_quirk, dim_head=head_dim, heads=heads, qk_norm=qk_norm, **dead
            )
        else:
            self.attn2 = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForwardControl(dim, control_scale)
        if context_pre_only:
            self.norm2_context = None
            self.ff_context = None
        else:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.dual_attention:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = self.norm1(hidden_states, emb=temb)
        else:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            norm_ctx = self.norm1_context(context, temb)
        else:
            norm_ctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, emb=temb)

        attn_out, ctx_attn_out = self.attn(norm_h, norm_ctx)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        if self.dual_attention:
            attn2_out, _ = self.attn2(norm_h2)
            hidden_states = hidden_states + gate_msa2.unsqueeze(1) * attn2_out

        norm_h = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm_h, grid)

        if self.context_pre_only:
            return hidden_states, None
        context = context + c_gate_msa.unsqueeze(1) * ctx_attn_out
        norm_ctx = self.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = context + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_ctx)
        return hidden_states, context
