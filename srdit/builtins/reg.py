"""REG (Wu et al. 2025, arXiv:2507.01467): the teacher's class token, noised on the same path with its own noise,
enters the sequence as token 0 (`srdit.model.alignment.RegToken`, no position) and its velocity is regressed like
the image's, the loss term `reg` weighed by `loss.reg`; the samplers integrate it alongside the image, with its own
guidance scale (`srdit.transport.samplers`).

The term is this module's `loss` hook, called by the objective through the same named-term path as a plugin's
(`srdit.transport.objective`, `srdit.ext.LossContext`: the teacher's class token, its noise `noise_cls` and the
model's class-token velocity `aux["reg"]`). The token's embedding and head stay in the model
(`srdit.model.alignment`): their parameters and state-dict keys are the model's; the objective noises the token
(the model's input)."""

from srdit.builtins.common import mean_squared_error
from srdit.ext import Builtin, LossContext


def loss(ctx: LossContext) -> dict:
    """{"reg": the unweighted term}: the class-token velocity ctx.aux["reg"] [B, reg.dim] against its target
    eps_cls - cls0 (ctx.noise_cls, the teacher's class token ctx.teacher[1], both [B, reg.dim]), the float32 squared
    error averaged over reg.dim, then over B (as `srdit.transport.losses.flow_matching`)."""
    target = ctx.noise_cls - ctx.teacher[1]  # d x_t^cls / dt on the linear path
    return {"reg": mean_squared_error(ctx.aux["reg"], target)}


TECHNIQUE = Builtin(
    "reg",
    paper="REG, Wu et al. 2025, arXiv:2507.01467",
    description="Jointly denoise the teacher's class token as an extra token",
    diff={"model.reg.enabled": True},
    knobs={"weight": "loss.reg"},
    points=("build", "tokens", "loss", "guidance"),
    code=(
        "srdit.model.alignment",
        "srdit.model.sit",
        "srdit.transport.objective",
        "srdit.transport.losses",
        "srdit.transport.samplers",
    ),
    hooks={"loss": loss},
    terms={"reg": "weight"},
    on="model.reg.enabled",
)
