"""REG (Wu et al. 2025, arXiv:2507.01467): the teacher's class token, noised on the same path with its own noise,
enters the sequence as token 0 (`srdit.model.alignment.RegToken`, no position) and its velocity is regressed like
the image's, the loss term `reg` weighed by `loss.reg` (`srdit.transport.objective`, `srdit.transport.losses`); the
samplers integrate it alongside the image, with its own guidance scale (`srdit.transport.samplers`)."""

from srdit.ext import Builtin

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
)
