"""The backbone's parts as the techniques that are on shape them: one function per extension point of the backbone
(`srdit.ext.CORE_HOOKS`), each asking the registry for the hook of the built-in that is on (`srdit.ext.builtin_part`)
and otherwise building the plain SiT's part. The backbone calls these and tests no technique's switch; a plugin's
attention or MLP variant can start from them to keep the built-ins that are on.

Each is called where the plain SiT builds the part, so that a technique's parameters, their init and their
state-dict keys are those of the switch it always was."""

from __future__ import annotations

from torch import nn

import srdit.builtins  # noqa: F401  registers the built-ins whose hooks the backbone calls
from srdit.config import ModelConfig
from srdit.ext import builtin_part
from srdit.model.attention import Attention
from srdit.model.layers import Mlp, Rotary, gelu_tanh
from srdit.model.sizes import SIZES


def norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """A block pre-norm or the final norm, [..., dim] -> [..., dim], without affine parameters: LayerNorm(eps 1e-6),
    or the `norm` hook's (RMSNorm)."""
    part = builtin_part(cfg, "norm")
    if part is None:
        return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
    _, knobs, hook = part
    return hook(cfg, knobs, dim)


def mlp(cfg: ModelConfig, dim: int) -> Mlp:
    """A block's MLP [B, T, D] -> [B, T, D] at ratio 4: GELU(tanh), or the `activation` hook's (ReLU^2, SwiGLU)."""
    part = builtin_part(cfg, "activation")
    if part is None:
        return Mlp(dim, 4.0, gelu_tanh)
    _, knobs, hook = part
    fn, gated = hook(cfg, knobs)
    return Mlp(dim, 4.0, fn, gated=bool(gated))


def attention(cfg: ModelConfig, block: int) -> Attention:
    """Block `block`'s (1..depth) attention with the `qk_norm` and `value_residual` hooks' parts of the built-ins
    that are on (none: the plain SiT's)."""
    _, dim, heads = SIZES[cfg.size]
    qk = builtin_part(cfg, "qk_norm")
    vr = builtin_part(cfg, "value_residual")
    return Attention(
        dim,
        heads,
        qk_norm=tuple(qk[2](cfg, qk[1], dim // heads)) if qk is not None else None,
        v_lambda=vr[2](cfg, vr[1], block) if vr is not None else None,
    )


def rotary(cfg: ModelConfig, prefix: int) -> Rotary | None:
    """The rotary tables of queries and keys from the `rotary` hook of the built-in that is on (2-D RoPE), for
    `prefix` leading tokens without a position and the patch grid; None: no rotary embedding."""
    part = builtin_part(cfg, "rotary")
    if part is None:
        return None
    _, dim, heads = SIZES[cfg.size]
    b, knobs, hook = part
    grid = cfg.input_size // cfg.patch_size
    angles = hook(cfg, knobs, dim // heads, grid, prefix)
    if tuple(angles.shape) != (prefix + grid * grid, dim // heads):
        raise ValueError(
            f"{b.name}: rotary returned {tuple(angles.shape)}; expected {(prefix + grid * grid, dim // heads)}"
        )
    return Rotary(angles)
