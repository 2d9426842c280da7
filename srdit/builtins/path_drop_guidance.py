"""Path-drop guidance (SR-DiT section 3.2): the unconditional branch of classifier-free guidance also replaces
SPRINT's sparse path by [MASK]. Evaluation only.

What the unconditional branch passes the model is this module's `unconditional` hook, which the sampler calls
(`srdit.generate`, `srdit.transport.samplers.guided_velocity`); the model drops the path on the samples that ask
(`drop_sparse_path`, `srdit.model.sit`, `srdit.model.routing`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def unconditional(knobs) -> dict:
    """{"drop_sparse_path": True}: the unconditional branch runs without SPRINT's sparse middle."""
    return {"drop_sparse_path": True}


TECHNIQUE = Builtin(
    "path_drop_guidance",
    paper=SRDIT,
    description="Guidance whose unconditional branch also drops the SPRINT sparse path",
    diff={"sample.path_drop_guidance": True},
    stage="eval",
    points=("unconditional",),
    code=("srdit.generate", "srdit.transport.samplers", "srdit.model.routing"),
    hooks={"unconditional": unconditional},
    on="sample.path_drop_guidance",
)
