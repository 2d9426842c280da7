"""SwiGLU MLP (Shazeer 2020, arXiv:2002.05202): silu(a) * b over the two halves of the first layer's output, at
2/3 of the hidden width to keep the parameter count (`srdit.model.layers.Mlp`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "swiglu",
    paper="Shazeer 2020, arXiv:2002.05202; " + SRDIT,
    description="SwiGLU MLP (2/3 width to keep parameters)",
    diff={"model.mlp": "swiglu"},
    points=("mlp",),
    code=("srdit.model.layers",),
)
