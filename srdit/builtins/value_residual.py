"""Value residual learning (Zhou et al. 2024, arXiv:2410.17897): every block but the first mixes its values with
block 1's, V' = lambda V_1 + (1 - lambda) V, with a learned scalar lambda (init 0.5).

The lambdas are this module's `value_residual` hook, which the backbone calls for each block's attention
(`srdit.model.parts.attention`); attention mixes (`srdit.model.attention.Attention`) and the backbone hands block
1's values on while any block mixes (`srdit.model.sit`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def value_residual(cfg, knobs, block: int):
    """Block `block`'s lambda (a 0-d parameter, 0.5), or None for block 1, whose values are V_1."""
    if block == 1:
        return None
    import torch  # in the hook's body: importing this module loads no torch

    return torch.nn.Parameter(torch.tensor(0.5))


TECHNIQUE = Builtin(
    "value_residual",
    paper="Zhou et al. 2024, arXiv:2410.17897; " + SRDIT,
    description="Every block mixes block 0's values with a learned lambda (init 0.5)",
    diff={"model.value_residual": True},
    points=("value_residual",),
    code=("srdit.model.parts", "srdit.model.attention", "srdit.model.sit"),
    hooks={"value_residual": value_residual},
    on="model.value_residual",
)
