"""SPRINT sparse-dense residual fusion (Park et al. 2025, arXiv:2510.21986; SR-DiT section 1.5).

Blocks split into a dense encoder f, a sparse middle g and a dense decoder h. In training g sees a random
subset of tokens (independently per sample); dropped positions are refilled with a learned [MASK] token and
fused with the encoder output by a linear layer before h. At inference g sees every token."""

from __future__ import annotations

import torch
from torch import nn


class SprintRouter(nn.Module):
    """SPRINT's token routing and path fusion around the sparse middle blocks g (arXiv:2510.21986).

    In training, `select` keeps K = max(1, int(T (1 - drop_ratio))) of the T tokens per sample ([B, K] indices);
    `gather` takes those tokens of hidden states [B, T, D] -> [B, K, D] (or values [B, H, T, d] -> [B, H, K, d]);
    `fuse_paths` scatters g's output back to [B, T, D] (dropped positions = the learned [MASK] token),
    concatenates it with the dense encoder output and fuses 2 D -> D by a linear layer. With probability
    `path_drop_prob` per step the whole sparse path is replaced by [MASK] (trains path-drop guidance); the trainer
    draws that decision with the step's other randomness (`transport.objective.StepNoise.path_drop`) and passes it
    in as a tensor, so that the forward has no data-dependent branch (one graph under torch.compile)."""

    def __init__(self, dim: int, drop_ratio: float, path_drop_prob: float):
        super().__init__()
        self.drop_ratio = drop_ratio
        self.path_drop_prob = path_drop_prob
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.fuse = nn.Linear(2 * dim, dim)

    def keep_count(self, tokens: int) -> int:
        return max(1, int(tokens * (1.0 - self.drop_ratio)))

    def select(
        self, batch: int, tokens: int, device: torch.device, noise: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Sorted kept indices [B, K] in training, None (keep all) in eval. Uniform random, per sample.

        `noise` [B, tokens] (uniform) may come from the caller: the trainer draws it for the global batch so that
        data-parallel training routes each sample exactly as a single process would."""
        if not self.training or self.drop_ratio == 0.0:
            return None
        keep = self.keep_count(tokens)
        if noise is None:
            noise = torch.rand(batch, tokens, device=device)
        elif noise.shape != (batch, tokens):
            raise ValueError(f"route noise has shape {tuple(noise.shape)}, expected {(batch, tokens)}")
        return noise.argsort(dim=1)[:, :keep].sort(dim=1).values

    @staticmethod
    def gather(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Kept tokens of hidden states [B, T, C] or of per-head values [B, H, T, d]."""
        if index is None:
            return x
        if x.dim() == 3:
            return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))

    def fuse_paths(
        self, dense: torch.Tensor, sparse: torch.Tensor, index: torch.Tensor | None, drop_path: bool | torch.Tensor
    ) -> torch.Tensor:
        """Scatter the sparse output back (dropped positions = [MASK]) and fuse with the dense encoder output.

        `drop_path` replaces the whole sparse path by [MASK]: a Python bool (path-drop guidance at sampling) or a
        0-d bool tensor (training: applied by `torch.where`, no branch on its value). The sparse path stays in the
        graph either way so that data-parallel training still sees gradients for every parameter."""
        mask = self.mask_token.to(dense.dtype).expand_as(dense)
        if index is None:  # nothing dropped (eval, or drop_ratio 0): keep [MASK] in the training graph for DDP
            padded = sparse + 0 * mask if self.training else sparse
        else:
            padded = mask.scatter(1, index[..., None].expand(-1, -1, dense.shape[-1]), sparse)
        if isinstance(drop_path, torch.Tensor):
            padded = torch.where(drop_path, mask, padded)
        elif drop_path:
            padded = padded * 0 + mask
        return self.fuse(torch.cat([dense, padded], dim=-1))
