"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) in place of LayerNorm in the blocks' pre-norms and the final
norm, without affine parameters (adaLN supplies scale and shift).

The norm is this module's `norm` hook, which the backbone calls for each of its norms (`srdit.model.parts.norm`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def norm(cfg, knobs, dim: int):
    """x [..., dim] -> x / sqrt(mean(x^2) + 1e-6), no affine parameters (SR-DiT section 1.6)."""
    from torch import nn  # in the hook's body: importing this module loads no torch

    return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)


TECHNIQUE = Builtin(
    "rmsnorm",
    paper="Zhang & Sennrich 2019, arXiv:1910.07467; " + SRDIT,
    description="RMSNorm instead of LayerNorm in the block pre-norms and final norm",
    diff={"model.norm": "rmsnorm"},
    points=("norm",),
    code=("srdit.model.parts",),
    hooks={"norm": norm},
    on="model.norm",
)
