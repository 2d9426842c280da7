"""What several built-ins share: the SR-DiT citation and the squared error of the velocity-regression terms."""

SRDIT = "Speedrunning ImageNet Diffusion (SR-DiT), arXiv:2512.12386"
"The SR-DiT paper, which every technique it combines cites besides its own source."


def mean_squared_error(pred, target):
    """pred, target [B, ...] -> a scalar: the float32 squared error averaged over the non-batch dims, then over B.
    The one formula of flow matching (`srdit.transport.losses.flow_matching`), REG's class-token term and CFM's
    negative term; tensor methods only, so that this module loads no torch."""
    return (pred.float() - target.float()).square().flatten(1).mean(1).mean()
