"""Register tokens as an srdit plugin technique (Darcet, Oquab, Mairal & Bojanowski 2023, "Vision Transformers Need
Registers", arXiv:2309.16588).

n learnable tokens join the sequence and are dropped at the output: the transformer gets scratch space for global
computation, so that it stops recycling low-information patch tokens for it (the high-norm artefacts of the
paper). srdit places them (after the REG class token when that is on, before the patches), gives them no position
(no sin-cos embedding, RoPE's identity rotation), keeps them through SPRINT's sparse middle, leaves them out of
REPA's alignment and drops them before the output head (`srdit.ext`, hooks `tokens` / `embed_tokens`).

Initialised as DINOv2's registers: N(0, 1e-6); the same tokens for every sample (the conditioning `c` is unused).
"""

from __future__ import annotations

import torch
from torch import nn

from srdit.config import SIZES
from srdit.ext import Knob, Plugin


class Registers(nn.Module):
    """n register tokens [1, n, D]."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(1, n, dim))
        nn.init.normal_(self.tokens, std=1e-6)


def build(cfg, knobs):
    return Registers(knobs.n, SIZES[cfg.size][1])


def tokens(cfg, knobs):
    """How many extra tokens: the knob n."""
    return knobs.n


def embed_tokens(module, c):
    """[B, n, D]: the registers, one copy per sample (c [B, D] gives the batch size)."""
    return module.tokens.expand(c.shape[0], -1, -1)


registers = Plugin(
    name="registers",
    paper="Vision Transformers Need Registers, Darcet et al. 2023, arXiv:2309.16588",
    description="n learnable register tokens in the sequence, dropped at the output",
    stage="train",
    knobs={"n": Knob(4, range=(1, 64), help="number of register tokens (the paper uses 4 to 16)")},
    hooks={"build": build, "tokens": tokens, "embed_tokens": embed_tokens},
)
