"""Loss terms, each named; weights are applied in one place (`total`). Shapes: B samples, T tokens.

- fm:   flow matching (SiT, arXiv:2401.08740), || v - (eps - x0) ||^2, mean over C*H*W then over the batch;
- repa: negative cosine between projected hidden tokens and the teacher's tokens (REPA, arXiv:2410.06940): its
        technique's own module holds it (`srdit.builtins.repa.alignment`, re-exported here), and the objective
        calls it as that technique's `loss` hook;
- reg:  the REG class token's velocity error, as fm (REG, arXiv:2507.01467); the objective computes it as that
        technique's `loss` hook (`srdit.builtins.reg`);
- cfm:  contrastive flow matching, minus the error against another sample's target (the batch rolled by one;
        CFM, arXiv:2506.05350): its technique's own module holds it (`srdit.builtins.cfm.contrastive`, re-exported
        here), and the objective calls it as that technique's `loss` hook.

`srdit.transport.objective.training_losses` builds the inputs (noised data, targets) and calls these.
"""

from __future__ import annotations

import torch

from srdit.builtins.cfm import contrastive
from srdit.builtins.common import mean_squared_error
from srdit.builtins.repa import alignment
from srdit.config import LossConfig


def flow_matching(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32: pred, target [B, ...] -> mean over the non-batch dims, then over B
    (`srdit.builtins.common.mean_squared_error`, the formula REG's and CFM's terms share)."""
    return mean_squared_error(pred, target)


def loss_terms(
    pred: torch.Tensor,
    target: torch.Tensor,
    aux: dict[str, torch.Tensor],
    repa_target: torch.Tensor | None = None,
    reg_target: torch.Tensor | None = None,
    cfm: bool = False,
    cfm_negative: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The unweighted terms, in the order fm, repa, reg, cfm (each present only when its technique is on), as the
    objective computes them (there, repa, reg and cfm through their techniques' `loss` hooks).

    pred, target:  predicted and target velocity [B, C, H, W];
    aux:           the model's auxiliary outputs: "repa" projected tokens [B, T, D] (REPA on, training),
                   "reg" class-token velocity [B, reg.dim] (REG on);
    repa_target:   teacher tokens [B, T, D] (required when aux has "repa");
    reg_target:    class-token velocity target [B, reg.dim] (required when aux has "reg");
    cfm:           add the contrastive term;
    cfm_negative:  the negatives [B, C, H, W] (data parallel: the global batch's roll); None rolls `target`.
    """
    terms = {"fm": flow_matching(pred, target)}
    if "repa" in aux:
        terms["repa"] = alignment(aux["repa"], repa_target)
    if "reg" in aux:
        terms["reg"] = flow_matching(aux["reg"], reg_target)
    if cfm:
        terms["cfm"] = contrastive(pred, target, cfm_negative)
    return terms


def total(
    terms: dict[str, torch.Tensor],
    weights: LossConfig,
    extra: dict[str, torch.Tensor] | None = None,
    extra_weights: dict[str, float] | None = None,
) -> torch.Tensor:
    """Weighted sum: fm has weight 1; the others take their weight from the loss config; then the plugin terms
    `extra` (`srdit.ext`), each with its weight in `extra_weights` (a knob of its plugin)."""
    out = terms["fm"]
    for name, value in terms.items():
        if name != "fm":
            out = out + getattr(weights, name) * value
    for name, value in (extra or {}).items():
        out = out + extra_weights[name] * value
    return out
