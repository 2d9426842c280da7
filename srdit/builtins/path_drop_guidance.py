"""Path-drop guidance (SR-DiT section 3.2): the unconditional branch of classifier-free guidance also replaces
SPRINT's sparse path by [MASK] (`srdit.transport.samplers.guided_velocity`, the model's `drop_sparse_path` in
`srdit.model.routing` / `srdit.model.sit`). Evaluation only."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "path_drop_guidance",
    paper=SRDIT,
    description="Guidance whose unconditional branch also drops the SPRINT sparse path",
    diff={"sample.path_drop_guidance": True},
    stage="eval",
    points=("guidance",),
    code=("srdit.transport.samplers", "srdit.model.routing"),
)
