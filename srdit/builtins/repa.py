"""REPA (Yu et al. 2024, arXiv:2410.06940): the hidden tokens after block `model.repa.depth` pass a projector
(`srdit.model.alignment.RepaProjector`, training only) and align with a frozen teacher's patch tokens by negative
cosine, the loss term `repa` weighed by `loss.repa` (`srdit.transport.losses.alignment`, its target built in
`srdit.transport.objective`)."""

from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "repa",
    paper="REPA, Yu et al. 2024, arXiv:2410.06940",
    description="Align an early hidden state with a frozen teacher's patch tokens (negative cosine)",
    diff={"model.repa.enabled": True},
    knobs={"depth": "model.repa.depth", "weight": "loss.repa", "projector_dim": "model.repa.projector_dim"},
    points=("build", "taps", "loss"),
    code=("srdit.model.alignment", "srdit.model.sit", "srdit.transport.objective", "srdit.transport.losses"),
)
