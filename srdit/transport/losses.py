"""The flow-matching term and the one place that weighs the terms (`total`). Shapes: B samples.

- fm: flow matching (SiT, arXiv:2401.08740), || v - (eps - x0) ||^2, mean over C*H*W then over the batch;
- the techniques' terms come from their `loss` hooks, each in its own module, in registry order: repa (negative
  cosine to the teacher's tokens, `srdit.builtins.repa`), reg (the REG class token's velocity error,
  `srdit.builtins.reg`), cfm (contrastive flow matching, `srdit.builtins.cfm`), then the plugins' terms.

`srdit.transport.objective.training_losses` builds the inputs (noised data, targets), calls the hooks and `total`.
"""

from __future__ import annotations

import torch

from srdit.builtins.common import mean_squared_error


def flow_matching(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32: pred, target [B, ...] -> mean over the non-batch dims, then over B
    (`srdit.builtins.common.mean_squared_error`, the formula REG's and CFM's terms share)."""
    return mean_squared_error(pred, target)


def total(fm: torch.Tensor, terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """fm + sum of weights[name] * term over `terms` in their order (the built-ins' hooked terms, then the plugins';
    each weight is a knob of its technique, e.g. `loss.repa`)."""
    out = fm
    for name, value in terms.items():
        out = out + weights[name] * value
    return out
