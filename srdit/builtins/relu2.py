"""ReLU^2 MLP (Primer, So et al. 2021, arXiv:2109.08668): relu(h)^2 as the hidden activation
(`srdit.model.layers.Mlp`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "relu2",
    paper="So et al. 2021 (Primer), arXiv:2109.08668; " + SRDIT,
    description="ReLU^2 MLP",
    diff={"model.mlp": "relu2"},
    points=("mlp",),
    code=("srdit.model.layers",),
)
