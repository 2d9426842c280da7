"""Multi-head self-attention with the SR-DiT switches: QK-norm, 2-D RoPE and value residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srdit.model.layers import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, value_mix: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # QK-norm: RMSNorm over the head dimension with a learnable scale (SR-DiT section 1.8).
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        # Value residual (Zhou et al. 2024): V' = lambda * V_1 + (1 - lambda) * V, lambda learned, init 0.5.
        self.v_lambda = nn.Parameter(torch.tensor(0.5)) if value_mix else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        v_first: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, raw values [B, H, T, d]); block 0's raw values feed the value residual."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        v_raw = v
        if self.v_lambda is not None and v_first is not None:
            v = self.v_lambda * v_first + (1 - self.v_lambda) * v
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, C)), v_raw
