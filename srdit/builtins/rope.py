"""2-D axial rotary position embedding (EVA-02, Fang et al. 2023, arXiv:2303.11331) on queries and keys, on top of
the absolute sin-cos positions: the tables (`srdit.model.layers.Rope2d`, identity rows for the leading tokens that
carry no position), the rotation inside attention (`srdit.model.attention.Attention`) and the kept rows of SPRINT's
sparse path (`srdit.model.sit`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "rope",
    paper="EVA-02, Fang et al. 2023, arXiv:2303.11331; " + SRDIT,
    description="2-D axial rotary position embedding on q and k (added to absolute sin-cos positions)",
    diff={"model.rope.enabled": True},
    knobs={"theta": "model.rope.theta"},
    points=("attention",),
    code=("srdit.model.layers", "srdit.model.attention", "srdit.model.sit"),
)
