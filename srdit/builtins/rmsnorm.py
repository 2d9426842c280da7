"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) in place of LayerNorm in the blocks' pre-norms and the final
norm, without affine parameters (adaLN supplies scale and shift): the norm factory `srdit.model.layers.make_norm`."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "rmsnorm",
    paper="Zhang & Sennrich 2019, arXiv:1910.07467; " + SRDIT,
    description="RMSNorm instead of LayerNorm in the block pre-norms and final norm",
    diff={"model.norm": "rmsnorm"},
    points=("norm",),
    code=("srdit.model.layers", "srdit.model.sit"),
)
