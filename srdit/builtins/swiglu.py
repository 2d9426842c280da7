"""SwiGLU MLP (Shazeer 2020, arXiv:2002.05202): silu(a) * b over the two halves of the first layer's output, at
2/3 of the hidden width to keep the parameter count.

The activation is this module's `activation` hook, which the backbone calls for each block's MLP
(`srdit.model.parts.mlp`, `srdit.model.layers.Mlp`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def swiglu(h):
    """[..., 2 h'] -> [..., h']: silu(a) * b over the halves (a, b) of the last dimension."""
    import torch.nn.functional as F  # in the hook's body: importing this module loads no torch

    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


def activation(cfg, knobs):
    """(swiglu, gated=True)."""
    return swiglu, True


TECHNIQUE = Builtin(
    "swiglu",
    paper="Shazeer 2020, arXiv:2002.05202; " + SRDIT,
    description="SwiGLU MLP (2/3 width to keep parameters)",
    diff={"model.mlp": "swiglu"},
    points=("activation",),
    code=("srdit.model.parts", "srdit.model.layers"),
    hooks={"activation": activation},
    on="model.mlp",
)
