"""Contrastive flow matching (Delta-FM, Stoica et al. 2025, arXiv:2506.05350): minus the error of each prediction
against the target of the previous sample in the global batch, the loss term `cfm` weighed by `loss.cfm`.

The term is this module's `loss` hook, called by the objective through the same named-term path as a plugin's
(`srdit.transport.objective`, `srdit.ext.LossContext`): the negatives come from `ctx.roll`, which under data
parallel rolls the global batch, so the trajectory does not depend on the number of workers. It works on the
tensors it is given (no torch import: this package sits in the config layer)."""

from srdit.builtins.common import SRDIT, mean_squared_error
from srdit.ext import Builtin, LossContext


def contrastive(pred, target, negative=None):
    """-|| v_j - v*_{j-1} ||^2: sample j's negative is sample j-1's target; pred, target [B, ...] -> a scalar, the
    float32 squared error averaged over the non-batch dims, then over B (as `srdit.transport.losses.flow_matching`).
    `negative` [B, ...] replaces the rolled target (data parallel: the roll runs over the global batch)."""
    negative = target.roll(1, dims=0) if negative is None else negative
    return -mean_squared_error(pred, negative)


def loss(ctx: LossContext) -> dict:
    """{"cfm": the unweighted term} of one step (this rank's batch)."""
    return {"cfm": contrastive(ctx.pred, ctx.target, ctx.roll(ctx.target))}


TECHNIQUE = Builtin(
    "cfm",
    paper="Delta-FM, Stoica et al. 2025, arXiv:2506.05350; " + SRDIT,
    description="Contrastive flow matching: push predictions away from another sample's target",
    diff={"loss.cfm": 0.05},
    knobs={"weight": "loss.cfm"},
    points=("loss",),
    code=("srdit.transport.objective", "srdit.transport.losses"),
    hooks={"loss": loss},
    terms={"cfm": "weight"},
    on="weight",
)
