"""Balanced evaluation labels (SR-DiT): sample i gets class i mod num_classes, so that every class has the same
number of evaluation samples. Evaluation only.

The labels are this module's `labels` hook, called by the generation code through the same extension point as a
plugin's (`srdit.generate`), in place of the random draw; switched on by `sample.balanced_labels`."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def balanced_labels(n: int, num_classes: int):
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... (int64 [n]): equal class counts up to one."""
    import torch  # in the hook's body: importing this module loads no torch

    return torch.arange(n, dtype=torch.int64) % num_classes


def labels(knobs, n: int, num_classes: int, rows: range, generator):
    """The labels [len(rows)] of evaluation samples `rows` of n: i mod num_classes; draws nothing from
    `generator`."""
    return balanced_labels(n, num_classes)[rows.start : rows.stop]


TECHNIQUE = Builtin(
    "balanced_labels",
    paper=SRDIT,
    description="Evaluation samples get class i mod num_classes (equal counts per class)",
    diff={"sample.balanced_labels": True},
    stage="eval",
    points=("labels",),
    code=("srdit.generate", "srdit.data.digits"),
    hooks={"labels": labels},
    on="sample.balanced_labels",
)
