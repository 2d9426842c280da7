"""2-D axial rotary position embedding (EVA-02, Fang et al. 2023, arXiv:2303.11331) on queries and keys, on top of
the absolute sin-cos positions: the first half of the head dimension rotates by the token's row, the second half by
its column, adjacent channel pairs share a frequency (SR-DiT section 1.7).

The angle table is this module's `rotary` hook, which the backbone calls once (`srdit.model.parts.rotary`); the
rotation is generic (`srdit.model.layers.Rotary`, applied inside attention) and SPRINT's sparse path takes the rows
of its kept tokens (`srdit.model.sit`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def axial_angles(head_dim: int, grid: int, prefix: int, theta: float):
    """The angles [prefix + grid^2, head_dim] (float64): token (r, c) of the row-major grid turns channel pair k of
    the first half by r * w_k and of the second half by c * w_k, w_k = theta^(-k / (head_dim / 4)); the `prefix`
    leading tokens (REG's class token, plugins' extra tokens) get 0: the identity, no position."""
    import torch  # in the hook's body: importing this module loads no torch

    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # omega_k = theta^(-2k/(d/2))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # [T, head_dim/2]
    ang = ang.repeat_interleave(2, dim=1)  # each angle drives one adjacent pair
    return torch.cat([torch.zeros(prefix, head_dim, dtype=ang.dtype), ang], dim=0)


def rotary(cfg, knobs, head_dim: int, grid: int, prefix: int):
    """The axial angle table at base `knobs.theta` (`model.rope.theta`)."""
    return axial_angles(head_dim, grid, prefix, knobs.theta)


TECHNIQUE = Builtin(
    "rope",
    paper="EVA-02, Fang et al. 2023, arXiv:2303.11331; " + SRDIT,
    description="2-D axial rotary position embedding on q and k (added to absolute sin-cos positions)",
    diff={"model.rope.enabled": True},
    knobs={"theta": "model.rope.theta"},
    points=("rotary",),
    code=("srdit.model.parts", "srdit.model.layers", "srdit.model.attention", "srdit.model.sit"),
    hooks={"rotary": rotary},
    on="model.rope.enabled",
)
