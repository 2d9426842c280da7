"""SPRINT (Park et al. 2025, arXiv:2510.21986): dense encoder blocks, a sparse middle on the tokens a router keeps
(75% dropped by default) and dense decoder blocks; in training the whole sparse path is sometimes replaced by a
[MASK] token. Its pieces: the router (`srdit.model.routing.SprintRouter`) and the dense / sparse / dense split of the
blocks in the backbone (`srdit.model.sit.SiT.forward`), where the token layout (REG's token, plugins' extra
tokens, RoPE's rows, REPA's tap) is handled once."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "sprint",
    paper="SPRINT, Park et al. 2025, arXiv:2510.21986; " + SRDIT,
    description="SPRINT token routing: dense/sparse/dense blocks, 75% of tokens dropped in the middle",
    diff={"model.sprint.enabled": True},
    knobs={
        "drop_ratio": "model.sprint.drop_ratio",
        "path_drop_prob": "model.sprint.path_drop_prob",
        "dense_in": "model.sprint.dense_in",
        "dense_out": "model.sprint.dense_out",
    },
    points=("build", "routing"),
    code=("srdit.model.routing", "srdit.model.sit"),
)
