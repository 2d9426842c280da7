"""`srdit techniques new NAME`: a starting plugin file for a technique of one's own, and a digits study beside it.

The plugin is a loss-term technique (the commonest kind: REPA, CFM, the dispersive loss) with one knob, `weight`,
and every hook documented in place; its `paper` field is left to fill in. The study switches it on and off on the
embedded digits (2 cells x 3 seeds of 200 steps: 2 to 4 minutes on a 2-core laptop), so the first question, does it
help, has an answer before any code is changed. Both pass `srdit techniques check` and `srdit study plan` as
written (tests/test_technique_check.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from srdit.config import ConfigError
from srdit.ext import BUILTIN_TERMS
from srdit.techniques import TECHNIQUES

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

PLUGIN = '''"""{name}: a technique of one's own as an srdit plugin (written by `srdit techniques new {name}`).

Fill in `paper` and `description`, replace the placeholder loss with the technique's, then:
    srdit techniques check {name} --plugins {plugin_file}    # the check kit: off = absent, knob ranges, data parallel
    srdit study plan {study_file}                            # the digits study beside this file
    srdit study run {study_file}

The hooks (srdit.ext; each is called only while the technique is on, so a study's off cells are bit-identical to
runs without this file, and reuse their results). Shapes: B this rank's batch, T tokens, D model width.
- build(cfg, knobs) -> torch.nn.Module | None: modules and parameters of the technique's own, created after the
  backbone's, trained, EMA'd and checkpointed with the model (state-dict prefix `ext.{name}.`); the loss gets it as
  ctx.module (and its output on the taps as ctx.outputs).
- taps(cfg, knobs) -> block indices i in 1..depth: the hidden states [B, T, D] after block i reach the loss as
  ctx.taps[i] (training only).
- loss(ctx) -> {{term: scalar tensor}}: unweighted loss terms, each declared in `terms` with the knob that weighs it;
  the trainer adds weight * term to the flow-matching loss and logs loss/<term>. ctx (srdit.ext.LossContext): x0,
  y, t, noise, pred, target, teacher, taps, outputs, module, knobs (ctx.knobs.weight), and for a loss across
  samples the data-parallel collectives ctx.gather (the global batch) and ctx.roll.
Knobs: numbers need range=(low, high) (None: unbounded on that side), strings choices=(...); a study sets them as
`- {name}: {{weight: 0.5}}`.
"""

from __future__ import annotations

from srdit.ext import Knob, LossContext, Plugin


def loss(ctx: LossContext):
    """{{"{name}": scalar}}. Placeholder: the mean squared predicted velocity, pred [B, C, H, W] -> a scalar (a
    per-sample mean, so that data parallel's gradient mean keeps the one-process trajectory)."""
    return {{"{name}": ctx.pred.float().square().mean()}}


{name} = Plugin(
    name="{name}",
    paper="FILL IN: the paper or source (authors year, arXiv id)",
    description="FILL IN: what {name} does, in one line",
    stage="train",  # "eval" for a technique that acts only when sampling or evaluating
    knobs={{"weight": Knob(0.1, range=(0, None), help="weight of the term in the total loss")}},
    hooks={{"loss": loss}},
    terms={{"{name}": "weight"}},
)
'''

STUDY = """# Does {name} help on the embedded digits? Its plugin ({plugin_file}) on and off, 3 seeds of 200 steps of the
# debug SiT: 2 to 4 minutes on a 2-core laptop (written by `srdit techniques new {name}`).
#   srdit study plan {study_file}
#   srdit study run {study_file}
name: digits_{name}
description: {name} (a plugin technique) on and off on the embedded digits; short runs, so effects are rough.
plugins: [{plugin_file}]
base:
  train: {{steps: 200, batch_size: 64, lr: 2.0e-3, log_every: 20, ckpt_every: 100, ema_decay: 0.98}}
  eval: {{n_samples: 400, batch_size: 400}}
  sample: {{sampler: euler, steps: 12}}
techniques:
  - {name}
design: full_factorial
seeds: [0, 1, 2]
metrics:
  primary: fd
  direction: min
  others: {{kd: min, precision: max, recall: max}}
resources: {{cpus: 1, gpus: 0}}
"""


def new_technique(name: str, out: str | Path = ".") -> tuple[Path, Path]:
    """Write `<out>/<name>.py` (the plugin) and `<out>/digits_<name>.yaml` (its study); returns both paths.
    ConfigError (one line, nothing written) for a name that is not a config key, one of a built-in technique or
    loss term, or a file that exists."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{name!r}: a technique name is lower-case letters, digits and _, starting with a letter")
    if name in TECHNIQUES:
        raise ConfigError(f"{name}: a built-in technique has that name; choose another")
    if name in BUILTIN_TERMS:
        raise ConfigError(f"{name}: a built-in loss term has that name; choose another")
    folder = Path(out)
    plugin, study = folder / f"{name}.py", folder / f"digits_{name}.yaml"
    for path in (plugin, study):
        if path.exists():
            raise ConfigError(f"{path}: exists; remove it or choose another --out or name")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}: not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    names = {"name": name, "plugin_file": plugin.name, "study_file": study.name}
    plugin.write_text(PLUGIN.format(**names))
    study.write_text(STUDY.format(**names))
    return plugin, study
