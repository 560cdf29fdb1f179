"""The SMFSR velocity network: SD3.5's MMDiT + the DiT4SR LR stream + the interval (r, t) embedding.

One class serves both roles the method needs:
- ``interval_embedding=True``: the SMFSR student, an average-velocity net u(z_t, r, t | LR, text)
  (official ``SD3Transformer2DModel_interval``, method.md 2.3);
- ``interval_embedding=False``: the DiT4SR teacher, an instantaneous-velocity net v(z_t, t | LR, text).

Time enters as t in [0, 1] everywhere in this project; ``time_scale`` maps it to what the network
was trained on (1.0 for official SMFSR, which feeds raw floats; 1000 for the DiT4SR teacher). That
multiplication, in :meth:`SMFSRTransformer.embed_time`, is the only place the two scales meet.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from torch import nn

from .blocks import SRJointBlock
from .detail_head import DetailHead


def interval_mlp(dim: int) -> nn.Sequential:
    """MLP(cat[emb(r), emb(t)]) -> temb, with weights N(0, 0.02) as the official initialiser intends."""
    mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    for layer in (mlp[0], mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
    return mlp


class IntervalTimeTextEmbedding(nn.Module):
    """temb = MLP(cat[E(r, pooled), E(t, pooled)]): one stock SD3 time+pooled-text embedder E
    shared by r and t (official ``CombinedTimestepTextProjEmbeddings_interval``)."""

    def __init__(self, dim: int, pooled_projection_dim: int):
        super().__init__()
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
        self.interval_embedder = interval_mlp(dim)

    def forward(self, r: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.time_text_embed(r, pooled), self.time_text_embed(t, pooled)], dim=-1)
        return self.interval_embedder(both)


class SMFSRTransformer(ModelMixin, ConfigMixin):
    """u(z_t, r, t) or v(z_t, t), conditioned on an LR latent of the same size and on text.

    The first thirteen config keys are the official ``config.json`` keys (method.md 5.1); the rest
    are ours and say which behaviour of the official code the weights expect. ``lr_residual``
    (ours, off for the official weights) measures the velocity from the LR latent, for small
    models trained from scratch with a lossless codec, where the LR latent is already the bicubic
    image and the identity is the hard part to learn. ``detail_head_channels`` (ours, 0 = none)
    adds a small convolutional head on the latent grid (see :mod:`.detail_head`).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 384,
        dual_attention_layers: tuple[int, ...] = tuple(range(13)),
        qk_norm: str | None = "rms_norm",
        # --- ours ---
        interval_embedding: bool = True,
        time_scale: float = 1.0,
        lr_key_quirk: bool = True,
        control_scale: float = 1.2,
        official_dead_modules: bool = True,
        lr_residual: bool = False,
        detail_head_channels: int = 0,
        detail_head_layers: int = 4,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if caption_projection_dim != dim:
            raise ValueError(f"caption_projection_dim ({caption_projection_dim}) must equal heads*head_dim ({dim})")
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels,
            embed_dim=dim, pos_embed_max_size=pos_embed_max_size,
        )
        if interval_embedding:
            self.time_text_embed_interval = IntervalTimeTextEmbedding(dim, pooled_projection_dim)
            if official_dead_modules:
                self.interval_embedder = interval_mlp(dim)  # built but never used by the official code
        else:
            self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            SRJointBlock(
                dim, num_attention_heads, attention_head_dim,
                context_pre_only=i == num_layers - 1,
                dual_attention=i in dual_attention_layers,
                qk_norm=qk_norm,
                lr_key_quirk=lr_key_quirk,
                control_scale=control_scale,
                official_dead_modules=official_dead_modules,
            )
            for i in range(num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        if lr_residual:
            if in_channels != out_channels:
                raise ValueError("lr_residual needs in_channels == out_channels (the LR latent is added back)")
            nn.init.zeros_(self.proj_out.weight)  # an untrained network is then exactly the LR baseline
            nn.init.zeros_(self.proj_out.bias)
        if detail_head_channels:
            if in_channels != out_channels:
                raise ValueError("a detail head needs in_channels == out_channels (it reads the latents it corrects)")
            self.detail_head = DetailHead(out_channels, detail_head_channels, detail_head_layers, dim)
        self.gradient_checkpointing = False

    @property
    def is_average_velocity(self) -> bool:
        return bool(self.config.interval_embedding)

    def unused_modules(self) -> list[str]:
        """The submodules ``forward`` never runs: the official layout's dead modules (the interval
        embedder, attn2's text projections) and, with ``lr_key_quirk``, every ``to_k_control`` (the
        official LR keys reuse the noisy ones). They exist so official checkpoints load; a trainer
        must not train them (DDP fails on parameters that get no gradient)."""
        unused = ["interval_embedder"] if hasattr(self, "interval_embedder") else []
        for i, block in enumerate(self.transformer_blocks):
            for attention in ("attn", "attn2"):
                module = getattr(block, attention, None)
                if module is None:
                    continue
                if module.lr_key_quirk:
                    unused.append(f"transformer_blocks.{i}.{attention}.to_k_control")
                if attention == "attn2":  # the second attention never sees text
                    unused += [f"transformer_blocks.{i}.attn2.{name}" for name in
                               ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q",
                                "norm_added_k") if getattr(module, name, None) is not None]
        return unused

    def embed_time(self, t: torch.Tensor, r: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        t = t * self.config.time_scale
        if not self.config.interval_embedding:
            return self.time_text_embed(t, pooled)
        if r is None:
            raise ValueError("this is an average-velocity model: pass r_timestep as well as timestep")
        return self.time_text_embed_interval(r * self.config.time_scale, t, pooled)

    def forward(
        self,
        hidden_states: torch.Tensor,
        lr_latent: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        r_timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for the noisy latent ``hidden_states`` (B, C, H, W) at time ``timestep`` (t, the
        noisier end) over [r_timestep, timestep], given the LR latent (B, C, H, W) and text
        (B, L, joint_attention_dim), (B, pooled_projection_dim). Times are (B,) floats in [0, 1]."""
        if hidden_states.shape != lr_latent.shape:
            raise ValueError(f"latent {tuple(hidden_states.shape)} and LR latent {tuple(lr_latent.shape)} differ")
        p = self.config.patch_size
        batch, _, height, width = hidden_states.shape
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} must be a multiple of the patch size {p}")
        grid = (height // p, width // p)

        hidden = torch.cat([self.pos_embed(hidden_states), self.pos_embed(lr_latent)], dim=1)
        temb = self.embed_time(timestep, r_timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden, context = self._gradient_checkpointing_func(block, hidden, context, temb, grid)
            else:
                hidden, context = block(hidden, context, temb, grid)

        hidden = hidden[:, : grid[0] * grid[1]]  # the LR half is discarded after the last block
        hidden = self.proj_out(self.norm_out(hidden, temb))
        hidden = hidden.reshape(batch, *grid, p, p, self.config.out_channels)
        velocity = torch.einsum("nhwpqc->nchpwq", hidden).reshape(batch, -1, height, width)
        if self.config.detail_head_channels:
            velocity = velocity + self.detail_head(velocity, hidden_states.to(velocity.dtype),
                                                   lr_latent.to(velocity.dtype), temb)
        if self.config.lr_residual:
            # u = net + (z_t - z_LR): the one step x = z_1 - u(z_1, 0, 1) becomes z_LR - net, so the
            # network learns the HR detail the LR latent lacks instead of re-learning the identity.
            velocity = velocity + (hidden_states - lr_latent).to(velocity.dtype)
        return velocity
