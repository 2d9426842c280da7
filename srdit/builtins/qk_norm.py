"""QK-norm (Dehghani et al. 2023, arXiv:2302.05442): an RMSNorm with a learnable scale over the head dimension of
queries and keys, before RoPE.

The two norms are this module's `qk_norm` hook, which the backbone calls for each block's attention
(`srdit.model.parts.attention`); attention applies them (`srdit.model.attention.Attention`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def qk_norm(cfg, knobs, head_dim: int):
    """(q_norm, k_norm): RMSNorms over the head dimension d of q, k [B, H, T, d], learnable scale (init 1)."""
    from torch import nn  # in the hook's body: importing this module loads no torch

    return nn.RMSNorm(head_dim), nn.RMSNorm(head_dim)


TECHNIQUE = Builtin(
    "qk_norm",
    paper="Dehghani et al. 2023, arXiv:2302.05442; " + SRDIT,
    description="RMSNorm over the head dimension on queries and keys",
    diff={"model.qk_norm": True},
    points=("qk_norm",),
    code=("srdit.model.parts", "srdit.model.attention"),
    hooks={"qk_norm": qk_norm},
    on="model.qk_norm",
)
