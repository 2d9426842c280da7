"""The dispersive loss as an srdit plugin technique (Wang & He 2025, "Diffuse and Disperse: Image Generation with
Representation Regularization", arXiv:2506.09027).

An InfoNCE-style repulsion without positive pairs: the hidden states of different samples at one block are pushed
apart. With z_i the hidden state of sample i after block `depth`, flattened to [T * D], and the squared distance
d_ij = ||z_i - z_j||^2 / (T * D), the term is (the paper's InfoNCE-L2 variant, over the full B x B matrix with its
zero diagonal)

    L_disp = log( mean_{i, j} exp(-d_ij / temperature) )

and the trainer adds `weight * L_disp` to the flow-matching loss. The mean runs over the *global* batch: under data
parallel each rank gathers every rank's states (`ctx.gather`), so the loss and its gradient are the one-process
ones. The plugin has no parameters (`build` is not needed) and only taps the block.
"""

from __future__ import annotations

from repulsion import log_mean_exp_neg

from srdit.ext import Knob, LossContext, Plugin


def taps(cfg, knobs):
    """The block whose output is dispersed: after block `depth` (1-based)."""
    return (knobs.depth,)


def loss(ctx: LossContext):
    """{"dispersive": L_disp} over the global batch: taps[depth] [B, T, D] -> a scalar."""
    # float64: the distances come from a Gram matrix, whose cancellation would otherwise amplify the round-off by
    # which a rank's forward on its half of the batch differs from one process's on the whole batch.
    z = ctx.gather(ctx.taps[ctx.knobs.depth].double().flatten(1))  # [N, T * D], N the global batch
    sq = z.square().sum(1)  # [N]
    dist = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0) / z.shape[1]  # [N, N]
    return {"dispersive": log_mean_exp_neg(dist / ctx.knobs.temperature).float()}


dispersive = Plugin(
    name="dispersive",
    paper="Diffuse and Disperse, Wang & He 2025, arXiv:2506.09027",
    description="Disperse the hidden states of different samples at one block (InfoNCE-L2, no positive pairs)",
    stage="train",
    knobs={
        "weight": Knob(0.5, range=(0, None), help="weight of the term in the total loss (the paper's lambda)"),
        "temperature": Knob(0.5, range=(0, None), low_open=True, help="tau of exp(-d / tau)"),
        "depth": Knob(2, range=(1, None), help="disperse the hidden state after this many blocks"),
    },
    hooks={"taps": taps, "loss": loss},
    terms={"dispersive": "weight"},
)
