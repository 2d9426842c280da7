"""Multi-head self-attention with the SR-DiT switches: QK-norm, 2-D RoPE and value residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srdit.model.layers import apply_rope


class Attention(nn.Module):
    """Multi-head self-attention [B, T, D] -> [B, T, D] (H heads of width d = D / H), as in DiT / SiT, plus:

    - QK-norm (SR-DiT section 1.8): q and k pass an RMSNorm over the head dimension with a learnable scale;
    - 2-D RoPE (SR-DiT section 1.7): q and k rotate by their token's grid position (`rope` = cos/sin tables);
    - value residual (Zhou et al. 2024, arXiv:2410.17897, "value residual learning"): the values mix with block
      0's values, V' = lambda V_1 + (1 - lambda) V, with a learned scalar lambda = `v_lambda` (init 0.5).
      `value_residual` is on in every block but the first (block 0 provides V_1).

    `forward` returns the output and this block's raw values [B, H, T, d] (before the mix)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, value_residual: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.v_lambda = nn.Parameter(torch.tensor(0.5)) if value_residual else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        v_first: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D]; rope cos/sin broadcastable to [B, H, T, d]; v_first: block 0's values [B, H, T, d]."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        v_raw = v
        if self.v_lambda is not None and v_first is not None:
            v = self.v_lambda * v_first + (1 - self.v_lambda) * v  # [B, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, d]
        return self.proj(out.transpose(1, 2).reshape(B, T, C)), v_raw  # [B, T, D], [B, H, T, d]
