"""QK-norm (Dehghani et al. 2023, arXiv:2302.05442): an RMSNorm with a learnable scale over the head dimension of
queries and keys, inside attention (`srdit.model.attention.Attention`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "qk_norm",
    paper="Dehghani et al. 2023, arXiv:2302.05442; " + SRDIT,
    description="RMSNorm over the head dimension on queries and keys",
    diff={"model.qk_norm": True},
    points=("attention",),
    code=("srdit.model.attention",),
)
