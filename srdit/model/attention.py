"""Multi-head self-attention with the parts of QK-norm, 2-D RoPE and value residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srdit.model.layers import apply_rope


class Attention(nn.Module):
    """Multi-head self-attention [B, T, D] -> [B, T, D] (H heads of width d = D / H), as in DiT / SiT, with the
    parts the techniques that are on give it (`srdit.model.parts.attention` builds it for a block):

    - `qk_norm` (q_norm, k_norm): modules on q and k [B, H, T, d] before the rotation (QK-norm, SR-DiT section 1.8:
      an RMSNorm over the head dimension with a learnable scale);
    - `rope` at call time: cos/sin tables that rotate q and k by their token's position (2-D RoPE, section 1.7);
    - `v_lambda` a learned scalar that mixes block 1's values `v_first` into this block's, V' = lambda V_1 +
      (1 - lambda) V (value residual, Zhou et al. 2024, arXiv:2410.17897).

    `forward` returns the output and this block's raw values [B, H, T, d] (before the mix)."""

    def __init__(self, dim: int, heads: int, qk_norm: tuple[nn.Module, nn.Module] | None = None, v_lambda=None):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = qk_norm if qk_norm is not None else (None, None)
        self.v_lambda = v_lambda

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
