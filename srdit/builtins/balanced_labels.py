"""Balanced evaluation labels (SR-DiT): sample i gets class i mod num_classes, so that every class has the same
number of evaluation samples (`srdit.data.digits.balanced_labels`, drawn by `srdit.generate`). Evaluation only."""

from srdit.builtins.paper import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "balanced_labels",
    paper=SRDIT,
    description="Evaluation samples get class i mod num_classes (equal counts per class)",
    diff={"sample.balanced_labels": True},
    stage="eval",
    points=("labels",),
    code=("srdit.generate", "srdit.data.digits"),
)
