"""Building blocks of the SiT backbone: embedders, positions, norms, MLPs, adaLN modulation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """The plain SiT's MLP activation: GELU with the tanh approximation."""
    return F.gelu(h, approximate="tanh")


class Mlp(nn.Module):
    """Two-layer MLP [B, T, D] -> [B, T, D] with hidden activation `activation` (GELU(tanh) as in SiT; a technique's
    through the `activation` point, `srdit.model.parts.mlp`: ReLU^2, SwiGLU).

    The dense MLP has hidden width h = int(ratio * D) and 2 h D weights. A `gated` activation (SwiGLU) takes the
    first layer's output as value and gate, so its hidden width is h' = int(2 h / 3) and it has 3 h' D = 2 h D - r D
    weights with r = 2 h mod 3 (the same count when 3 divides 2 h, as at D = 384, 768, 1152); its biases number
    2 h' + D against h + D."""

    def __init__(self, dim: int, ratio: float, activation=gelu_tanh, gated: bool = False):
        super().__init__()
        hidden = int(dim * ratio)
        self.act = activation
        if gated:
            hidden = int(2 * hidden / 3)
            self.fc1 = nn.Linear(dim, 2 * hidden)
        else:
            self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, T, D] -> [B, T, h] -> [B, T, D]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t -> MLP: t [B] -> [B, dim] (SiT, Ma et al. 2024; REPA; SR-DiT).

    Features are [cos(a_0..a_{h-1}), sin(a_0..a_{h-1})] with a_k = scale * t * 10000^(-k / h), h = freq_dim / 2.
    `scale` 1 (default) feeds t in [0, 1] as SiT / REPA / SR-DiT do: every argument stays below 1 radian.
    `scale` 1000 is DiT's convention for integer timesteps (`model.time_embed_scale`, an ablation knob)."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = float(scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        """The sinusoid features [B, freq_dim] (float32) of times t [B]."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (self.scale * t.float())[:, None] * freqs[None]  # [B, half]; scale 1 leaves t bit-exact
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row: label `num_classes` is the null label used for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table (MAE, as in DiT / SiT / REPA / SR-DiT), shape [grid*grid, dim], tokens in
    row-major order. The first half of the channels encodes the token's column, the second half its row, each as
    [sin(p w_0..), cos(p w_0..)] with w_k = 10000^(-k / (dim / 4)): the reference's order (its meshgrid puts the
    width coordinate first), so reference checkpoints' tables load unchanged."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


class Rotary(nn.Module):
    """Rotary embedding tables of queries and keys: cos and sin of the rotation angles [T, d] of each token and
    channel (a technique's `rotary` point gives the angles, `srdit.model.parts.rotary`: 2-D axial RoPE, SR-DiT
    section 1.7). Rows of zeros (tokens without a position) are the identity. Non-persistent buffers: the state
    dict holds no table. Sparse paths gather the rows of their kept tokens."""

    def __init__(self, angles: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin as [1, 1, T, d] (all tokens) or [B, 1, K, d] for kept token indices [B, K]."""
        if index is None:
            return self.cos[None, None], self.sin[None, None]
        return self.cos[index][:, None], self.sin[index][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
