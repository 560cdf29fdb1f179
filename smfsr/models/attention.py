"""Joint attention with the DiT4SR LR stream (method.md 2.2, point 4).

The block's image sequence is [x (N noisy tokens), c (N LR tokens)]. The LR tokens are projected
through the noisy stream's own q/k/v and then through zero-initialised ``*_control`` layers; all
tokens (and the text tokens, when given) attend jointly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class LRJointAttention(Attention):
    """diffusers' SD3 ``Attention`` plus the four DiT4SR control projections (``AttentionZero``).

    ``lr_key_quirk=True`` reproduces the official code, where the LR keys are ``norm_k`` applied
    twice to the *noisy* keys and ``to_k_control`` is computed but unused; the official weights were
    trained that way. ``False`` is the evident intent, LR keys = norm_k(to_k_control(to_k(c))).
    """

    def __init__(self, dim: int, *, lr_key_quirk: bool, **kwargs):
        super().__init__(query_dim=dim, out_dim=dim, bias=True, eps=1e-6, **kwargs)
        self.lr_key_quirk = lr_key_quirk
        self.to_q_control = nn.Linear(dim, dim)
        self.to_k_control = nn.Linear(dim, dim)
        self.to_v_control = nn.Linear(dim, dim)
        self.to_out_control = nn.Linear(dim, dim)
        for layer in (self.to_q_control, self.to_k_control, self.to_v_control):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # The LR output projection starts as a copy of the noisy one (DiT4SR initialisation).
        self.to_out_control.load_state_dict(self.to_out[0].state_dict())

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, c = hidden_states.chunk(2, dim=1)
        n = x.shape[1]

        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        q_c = self._heads(self.to_q_control(self.to_q(c)))
        v_c = self._heads(self.to_v_control(self.to_v(c)))
        q, q_c = self.norm_q(q), self.norm_q(q_c)
        k = self.norm_k(k)
        if self.lr_key_quirk:
            k_c = self.norm_k(k)  # official: norm_k(norm_k(noisy keys)); to_k_control is unused
        else:
            k_c = self.norm_k(self._heads(self.to_k_control(self.to_k(c))))

        query, key, value = torch.cat([q, q_c], 2), torch.cat([k, k_c], 2), torch.cat([v, v_c], 2)
        if encoder_hidden_states is not None:
            q_t = self.norm_added_q(self._heads(self.add_q_proj(encoder_hidden_states)))
            k_t = self.norm_added_k(self._heads(self.add_k_proj(encoder_hidden_states)))
            v_t = self._heads(self.add_v_proj(encoder_hidden_states))
            query, key, value = torch.cat([query, q_t], 2), torch.cat([key, k_t], 2), torch.cat([value, v_t], 2)

        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)

        out_x, out_c, out_text = out[:, :n], out[:, n : 2 * n], out[:, 2 * n :]
        out_x = self.to_out[1](self.to_out[0](out_x))
        out_c = self.to_out_control(out_c + c)  # the LR stream keeps a residual of its attention input
        image = torch.cat([out_x, out_c], dim=1)
        if encoder_hidden_states is None:
            return image, None
        # diffusers < 0.32 leaves to_add_out undefined (not None) for a context-pre-only block
        to_add_out = getattr(self, "to_add_out", None)
        return image, (to_add_out(out_text) if to_add_out is not None else out_text)
