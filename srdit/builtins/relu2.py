"""ReLU^2 MLP (Primer, So et al. 2021, arXiv:2109.08668): relu(h)^2 as the hidden activation.

The activation is this module's `activation` hook, which the backbone calls for each block's MLP
(`srdit.model.parts.mlp`, `srdit.model.layers.Mlp`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def relu2(h):
    """[..., h] -> [..., h]: relu(h)^2."""
    return h.relu().square()


def activation(cfg, knobs):
    """(relu2, gated=False)."""
    return relu2, False


TECHNIQUE = Builtin(
    "relu2",
    paper="So et al. 2021 (Primer), arXiv:2109.08668; " + SRDIT,
    description="ReLU^2 MLP",
    diff={"model.mlp": "relu2"},
    points=("activation",),
    code=("srdit.model.parts", "srdit.model.layers"),
    hooks={"activation": activation},
    on="model.mlp",
)
