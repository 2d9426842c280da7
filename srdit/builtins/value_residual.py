"""Value residual learning (Zhou et al. 2024, arXiv:2410.17897): every block but the first mixes its values with
block 1's, V' = lambda V_1 + (1 - lambda) V, with a learned scalar lambda (init 0.5). The mix lives in attention
(`srdit.model.attention.Attention`); the backbone hands block 1's values on (`srdit.model.sit`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "value_residual",
    paper="Zhou et al. 2024, arXiv:2410.17897; " + SRDIT,
    description="Every block mixes block 0's values with a learned lambda (init 0.5)",
    diff={"model.value_residual": True},
    points=("build", "attention"),
    code=("srdit.model.attention", "srdit.model.sit"),
)
