"""Representation alignment heads: the REPA projector and the REG class token's input / output paths."""

from __future__ import annotations

import torch
from torch import nn


class RepaProjector(nn.Module):
    """3-layer MLP hidden -> proj -> SiLU -> proj -> SiLU -> teacher dim (REPA, Yu et al. 2024). Train-only."""

    def __init__(self, dim: int, proj_dim: int, teacher_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, proj_dim),
            nn.SiLU(),
            nn.Linear(proj_dim, proj_dim),
            nn.SiLU(),
            nn.Linear(proj_dim, teacher_dim),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)  # [B, T, dim] -> [B, T, teacher_dim]


class RegToken(nn.Module):
    """REG (Wu et al. 2025): the noised teacher class token enters as token 0 through Linear -> RMSNorm
    (affine) and leaves through its own zero-initialised velocity head (SR-DiT section 1.4)."""

    def __init__(self, dim: int, teacher_dim: int):
        super().__init__()
        self.embed = nn.Linear(teacher_dim, dim)
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, teacher_dim)

    def tokens(self, cls_token: torch.Tensor) -> torch.Tensor:
        """Noised class token [B, teacher_dim] -> one sequence token [B, 1, dim]."""
        return self.norm(self.embed(cls_token))[:, None]
