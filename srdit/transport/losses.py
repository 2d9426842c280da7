"""Loss terms, each named; weights are applied in one place (`total`).

- fm:   flow matching, || v - (eps - x0) ||^2, mean over C*H*W then over the batch;
- repa: negative cosine between projected hidden tokens and the teacher's tokens (REPA);
- reg:  the REG class token's velocity error;
- cfm:  contrastive flow matching, minus the error against another sample's target (the batch rolled by one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srdit.config import LossConfig


def flow_matching(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(1).mean()


def contrastive(pred: torch.Tensor, target: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
    """-|| v_j - v*_{j-1} ||^2: sample j's negative is sample j-1's target (Delta-FM, Stoica et al. 2025).

    `negative` replaces the rolled target (data parallel: the roll runs over the global batch)."""
    return -flow_matching(pred, target.roll(1, dims=0) if negative is None else negative)


def alignment(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """-mean cosine over tokens and batch."""
    return -F.cosine_similarity(projected.float(), teacher.float(), dim=-1).mean()


def loss_terms(pred, target, aux, repa_target=None, reg_target=None, cfm: bool = False,
               cfm_negative=None) -> dict[str, torch.Tensor]:
    terms = {"fm": flow_matching(pred, target)}
    if "repa" in aux:
        terms["repa"] = alignment(aux["repa"], repa_target)
    if "reg" in aux:
        terms["reg"] = flow_matching(aux["reg"], reg_target)
    if cfm:
        terms["cfm"] = contrastive(pred, target, cfm_negative)
    return terms


def total(terms: dict[str, torch.Tensor], weights: LossConfig) -> torch.Tensor:
    """Weighted sum: fm has weight 1; the others take their weight from the loss config."""
    out = terms["fm"]
    for name, value in terms.items():
        if name != "fm":
            out = out + getattr(weights, name) * value
    return out
