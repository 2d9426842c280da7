"""Adaptive projected guidance as an srdit plugin technique (Sadat, Hilliges & Weber 2024, "Eliminating
Oversaturation and Artifacts of High Guidance Scales in Diffusion Models", arXiv:2410.02416), on the velocity.

Classifier-free guidance moves the conditional velocity c by (w - 1) (c - u). APG splits that update into its part
parallel to c, which the paper finds to cause oversaturation, and the orthogonal rest, and down-weights the parallel
part by eta; an optional rescaling caps the update's norm at r (per sample, over C x H x W):

    d = c - u;  if r > 0: d = d * min(1, r / ||d||)
    d_par = (<d, c> / <c, c>) c;  d_orth = d - d_par
    v = c + (w - 1) (d_orth + eta d_par)

With eta = 1 and r = 0 this is classifier-free guidance exactly. The paper's momentum term is left out (it makes
the rule depend on the sampler's step history). A sampling-time technique (stage "eval"): its on and off cells
share one training, and only their evaluations differ.
"""

from __future__ import annotations

from srdit.ext import GuidanceContext, Knob, Plugin


def guidance(ctx: GuidanceContext):
    """The guided velocity [B, C, H, W] from ctx.cond and ctx.uncond (see the module docstring)."""
    c, d = ctx.cond, ctx.cond - ctx.uncond
    dims = tuple(range(1, c.dim()))
    if ctx.knobs.norm_threshold > 0:
        norm = d.norm(dim=dims, keepdim=True)
        d = d * (ctx.knobs.norm_threshold / norm.clamp_min(1e-12)).clamp(max=1.0)
    par = (d * c).sum(dims, keepdim=True) / (c * c).sum(dims, keepdim=True).clamp_min(1e-12) * c
    return c + (ctx.scale - 1.0) * ((d - par) + ctx.knobs.eta * par)


apg = Plugin(
    name="apg",
    paper="Adaptive projected guidance, Sadat et al. 2024, arXiv:2410.02416",
    description="Guidance with the update's part parallel to the conditional velocity down-weighted by eta",
    stage="eval",
    knobs={
        "eta": Knob(0.0, range=(0, 1), help="weight of the parallel part (1 with norm_threshold 0: plain CFG)"),
        "norm_threshold": Knob(0.0, range=(0, None), help="cap on the update's norm per sample (0: no cap)"),
    },
    hooks={"guidance": guidance},
)
