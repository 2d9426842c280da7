"""Contrastive flow matching (Delta-FM, Stoica et al. 2025, arXiv:2506.05350): minus the error of each prediction
against the target of the previous sample in the global batch (the data-parallel roll), the loss term `cfm`
weighed by `loss.cfm` (`srdit.transport.losses.contrastive`, called by `srdit.transport.objective`)."""

from srdit.builtins.paper import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "cfm",
    paper="Delta-FM, Stoica et al. 2025, arXiv:2506.05350; " + SRDIT,
    description="Contrastive flow matching: push predictions away from another sample's target",
    diff={"loss.cfm": 0.05},
    knobs={"weight": "loss.cfm"},
    hooks=("loss",),
    code=("srdit.transport.objective", "srdit.transport.losses"),
)
