"""REPA (Yu et al. 2024, arXiv:2410.06940): the hidden tokens after block `model.repa.depth` pass a projector
(`srdit.model.alignment.RepaProjector`, training only) and align with a frozen teacher's patch tokens by negative
cosine, the loss term `repa` weighed by `loss.repa`.

The term is this module's `loss` hook, called by the objective through the same named-term path as a plugin's
(`srdit.transport.objective`, `srdit.ext.LossContext`); the projector and its tap stay in the model
(`srdit.model.alignment`, `srdit.model.sit`): their parameters and state-dict keys are the model's."""

from srdit.ext import Builtin, LossContext


def alignment(projected, teacher):
    """-mean cosine over tokens and batch, in float32: projected, teacher [B, T, D] -> a scalar in [-1, 1]."""
    import torch.nn.functional as F  # in the hook's body: importing this module loads no torch

    return -F.cosine_similarity(projected.float(), teacher.float(), dim=-1).mean()


def loss(ctx: LossContext) -> dict:
    """{"repa": the unweighted term}: ctx.aux["repa"] [B, T', teacher_dim] against the teacher's patch tokens
    [B, T, teacher_dim]; with REG on, the sequence starts with the class token, so the target starts with the
    teacher's class token (T' = T + 1). {} when the model tapped nothing (evaluation mode)."""
    if "repa" not in ctx.aux:
        return {}
    patches, cls0 = ctx.teacher
    target = patches
    if "reg" in ctx.aux:  # REG on: token 0 (the class token) aligns with the teacher's class token
        import torch

        target = torch.cat([cls0[:, None], patches], dim=1)
    return {"repa": alignment(ctx.aux["repa"], target)}


TECHNIQUE = Builtin(
    "repa",
    paper="REPA, Yu et al. 2024, arXiv:2410.06940",
    description="Align an early hidden state with a frozen teacher's patch tokens (negative cosine)",
    diff={"model.repa.enabled": True},
    knobs={"depth": "model.repa.depth", "weight": "loss.repa", "projector_dim": "model.repa.projector_dim"},
    points=("build", "taps", "loss"),
    code=("srdit.model.alignment", "srdit.model.sit", "srdit.transport.objective", "srdit.transport.losses"),
    hooks={"loss": loss},
    terms={"repa": "weight"},
    on="model.repa.enabled",
)
