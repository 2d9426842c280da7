"""The built-in techniques, one module each (one room per technique): each declares its technique through the
registration API of `srdit.ext` (`Builtin`: name, paper, description, stage, its diff and knobs over the typed
config keys of the core, the extension points it acts through, where its code lives). The registry of
`srdit.techniques.TECHNIQUES` is assembled from these declarations, in the order of `MODULES`.

This package sits in the config layer, which loads no torch, so that planning a study and listing techniques stay
light: a hook may import torch (and torch only) inside its body, where it runs in the training process, never at
module level, and imports no srdit layer above config (tests/test_layers.py). A built-in's nn.Modules (SPRINT's
router, RMSNorm, RoPE, QK-norm, value residual, SwiGLU / ReLU², REPA's projector, REG's token) live in the model
layer named in its `code`: their state-dict keys are the model's."""

from srdit.builtins import (
    balanced_labels,
    cfm,
    logit_normal,
    path_drop_guidance,
    qk_norm,
    reg,
    relu2,
    repa,
    rmsnorm,
    rope,
    sprint,
    swiglu,
    time_shift,
    value_residual,
)
from srdit.ext import Builtin, register_builtin

MODULES = (
    sprint,
    rmsnorm,
    rope,
    qk_norm,
    value_residual,
    repa,
    reg,
    cfm,
    time_shift,
    balanced_labels,
    logit_normal,
    swiglu,
    relu2,
    path_drop_guidance,
)
"The built-in modules in registry order (the order `srdit techniques` lists them in)."

BUILTINS: tuple[Builtin, ...] = tuple(register_builtin(m.TECHNIQUE, m.__name__) for m in MODULES)
"The registered declarations, in registry order."
