"""The SiT backbone with SR-DiT's techniques as switches. Imports neither Ray nor MLflow."""

from srdit.model.sit import SiT, build_model
from srdit.model.sizes import SIZES

__all__ = ["SiT", "SIZES", "build_model", "count_macs"]


def count_macs(model: SiT, batch: int = 1) -> float:
    """Forward multiply-accumulates per image at the model's native input, as fvcore counts them
    (one multiply-add = 1; matmuls, convolutions and attention's two products; elementwise ops free)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = torch.full((batch,), 0.5)
    y = torch.zeros(batch, dtype=torch.long)
    cls_token = torch.zeros(batch, cfg.reg.dim) if cfg.reg.enabled else None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The math backend decomposes attention into two batched matmuls, which the counter sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, cls_token)
    model.train(was_training)
    return counter.get_total_flops() / 2 / batch
