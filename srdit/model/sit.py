"""SiT backbone (Ma et al. 2024, on DiT, Peebles & Xie 2023) with every SR-DiT technique as a switch.

Read top to bottom: patch embedding + fixed 2-D sin-cos positions -> (REG class token) -> blocks with
adaLN-Zero -> final layer. With SPRINT the blocks split into dense encoder / sparse middle / dense decoder.
Every technique is off by default and then absent (no parameters, no code path taken), so the plain SiT is
bit-identical to a build without the switches.

`forward` always returns `(prediction, aux)`; aux holds `repa` (projected tokens) and `reg` (class-token
velocity) when those are on, and is empty otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from srdit.config import ModelConfig
from srdit.model.alignment import RegToken, RepaProjector
from srdit.model.attention import Attention
from srdit.model.layers import LabelEmbedder, Mlp, Rope2d, TimestepEmbedder, make_norm, modulate, sincos_2d
from srdit.model.routing import SprintRouter
from srdit.model.sizes import SIZES


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: six modulation vectors, gates on both residual branches."""

    def __init__(self, dim: int, heads: int, cfg: ModelConfig, value_mix: bool):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, dim)
        self.attn = Attention(dim, heads, qk_norm=cfg.qk_norm, value_mix=value_mix)
        self.norm2 = make_norm(cfg.norm, dim)
        self.mlp = Mlp(dim, 4.0, cfg.mlp)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope=None, v_first=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        a, v = self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope, v_first=v_first)
        x = x + gate1.unsqueeze(1) * a
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, v


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int, norm: str):
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


class SiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        depth, dim, heads = SIZES[cfg.size]
        self.depth, self.dim, self.heads = depth, dim, heads
        p, self.grid = cfg.patch_size, cfg.input_size // cfg.patch_size
        self.prefix = 1 if cfg.reg.enabled else 0

        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        # Fixed positions, stored as a frozen parameter as in DiT (counted in the parameter total).
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(dim, self.grid)).float()[None], requires_grad=False)
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = LabelEmbedder(cfg.num_classes, dim)
        self.reg = RegToken(dim, cfg.reg.dim) if cfg.reg.enabled else None
        self.rope = Rope2d(dim // heads, self.grid, self.prefix, cfg.rope.theta) if cfg.rope.enabled else None
        self.blocks = nn.ModuleList(Block(dim, heads, cfg, value_mix=cfg.value_residual and i > 0) for i in range(depth))
        s = cfg.sprint
        self.sprint = SprintRouter(dim, s.drop_ratio, s.path_drop_prob) if s.enabled else None
        self.repa = RepaProjector(dim, cfg.repa.projector_dim, cfg.repa.teacher_dim) if cfg.repa.enabled else None
        self.final = FinalLayer(dim, p, cfg.in_channels, cfg.norm)
        self.initialize()

    # ------------------------------------------------------------------------------------------------------------
    def initialize(self) -> None:
        """DiT/SiT init: xavier Linear, zero bias; N(0, 0.02) embedders; adaLN-Zero and output heads at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for lin in (self.final.adaLN[-1], self.final.linear) + ((self.reg.head,) if self.reg else ()):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def routed_tokens(self) -> int:
        """Tokens SPRINT picks from in training (the shape of `route_noise`'s second dim); 0 without routing."""
        if self.sprint is None or self.sprint.drop_ratio == 0.0:
            return 0
        return self.grid * self.grid + self.prefix

    def inference_parameters(self) -> int:
        """Parameters used at sampling time (the REPA projector is train-only)."""
        total = sum(p.numel() for p in self.parameters())
        return total - (sum(p.numel() for p in self.repa.parameters()) if self.repa else 0)

    # ------------------------------------------------------------------------------------------------------------
    def _run(self, blocks, h, c, rope, v_first, repa_at, aux):
        """Run a span of blocks. Block 0 provides the value-residual source; REPA taps after block `repa_at`."""
        for i, block in blocks:
            h, v = block(h, c, rope=rope, v_first=v_first)
            if i == 0 and self.cfg.value_residual:
                v_first = v
            if self.repa is not None and i + 1 == repa_at and self.training:
                aux["repa"] = self.repa(h)
        return h, v_first

    def forward(self, x, t, y, cls=None, drop_sparse_path: bool = False, route_noise=None):
        """x [B, C, H, W] at time t [B] with labels y [B] (num_classes = null); cls [B, dim] noised class token
        (REG). Returns (velocity [B, C, H, W], aux). `drop_sparse_path` replaces the SPRINT middle by [MASK]
        (path-drop guidance's unconditional branch); `route_noise` [B, tokens] drives SPRINT's token selection in
        training (drawn inside when None)."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        if self.reg is not None:
            if cls is None:
                raise ValueError("model.reg is enabled: pass the noised class token `cls` [B, reg.dim]")
            h = torch.cat([self.reg.tokens(cls), h], dim=1)  # token 0 carries no absolute position
        c = self.t_embed(t) + self.y_embed(y)
        rope = self.rope.tables() if self.rope is not None else None
        aux: dict[str, torch.Tensor] = {}
        repa_at = self.cfg.repa.depth
        indexed = list(enumerate(self.blocks))

        if self.sprint is None:
            h, _ = self._run(indexed, h, c, rope, None, repa_at, aux)
        else:
            s = self.cfg.sprint
            h, v_first = self._run(indexed[: s.dense_in], h, c, rope, None, repa_at, aux)
            keep = self.sprint.select(h.shape[0], h.shape[1], h.device, route_noise)
            g_rope = self.rope.tables(keep) if (self.rope is not None and keep is not None) else rope
            g_v = self.sprint.gather(v_first, keep) if v_first is not None else None
            g, _ = self._run(indexed[s.dense_in: self.depth - s.dense_out], self.sprint.gather(h, keep), c,
                             g_rope, g_v, repa_at, aux)
            h = self.sprint.fuse_paths(h, g, keep, drop_sparse_path or self.sprint.draw_path_drop())
            h, _ = self._run(indexed[self.depth - s.dense_out:], h, c, rope, v_first, repa_at, aux)

        h = self.final(h, c)
        if self.reg is not None:
            aux["reg"] = self.reg.head(h[:, 0])
            h = h[:, 1:]
        return self.unpatchify(self.final.linear(h)), aux

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, g, C = self.cfg.patch_size, self.grid, self.cfg.in_channels
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)


def build_model(cfg: ModelConfig) -> SiT:
    return SiT(cfg)
