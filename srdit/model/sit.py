"""SiT backbone (Ma et al. 2024, on DiT, Peebles & Xie 2023) with the SR-DiT techniques that are on.

Read top to bottom: patch embedding + fixed 2-D sin-cos positions -> (REG class token) -> blocks with
adaLN-Zero -> final layer. With SPRINT the blocks split into dense encoder / sparse middle / dense decoder.
Every technique is off by default and then absent (no parameters, no code path taken), so the plain SiT is
bit-identical to a build without the switches.

`forward` always returns `(prediction, aux)`; aux holds `repa` (projected tokens) and `reg` (class-token
velocity) when those are on, `ext` (plugin techniques' taps and module outputs, training only) when a plugin with
taps is on, and is empty otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srdit.config import ModelConfig
from srdit.ext import enabled
from srdit.model import parts
from srdit.model.alignment import RegToken, RepaProjector
from srdit.model.layers import LabelEmbedder, TimestepEmbedder, modulate, sincos_2d
from srdit.model.routing import SprintRouter
from srdit.model.sizes import SIZES


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: six modulation vectors, gates on both residual branches; its
    norms, attention and MLP as the techniques that are on shape them (`srdit.model.parts`).

    x [B, T, D], conditioning c [B, D] -> (x [B, T, D], this block's attention values [B, H, T, d])."""

    def __init__(self, cfg: ModelConfig, block: int):
        super().__init__()
        dim = SIZES[cfg.size][1]
        self.norm1 = parts.norm(cfg, dim)
        self.attn = parts.attention(cfg, block)
        self.norm2 = parts.norm(cfg, dim)
        self.mlp = parts.mlp(cfg, dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope=None, v_first=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x [B, D]
        a, v = self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope, v_first=v_first)  # [B, T, D]
        x = x + gate1.unsqueeze(1) * a  # [B, T, D]
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [B, T, D]
        return x, v


class FinalLayer(nn.Module):
    """adaLN-modulated norm [B, T, D] -> [B, T, D]; `linear` then maps each token to its p * p * C patch values
    (applied by SiT after the REG class token is split off)."""

    def __init__(self, dim: int, patch: int, out_channels: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # 2 x [B, D]
        return modulate(self.norm(x), shift, scale)  # [B, T, D]


class SiT(nn.Module):
    """Scalable Interpolant Transformer (SiT, Ma et al. 2024, arXiv:2401.08740) predicting the velocity on the
    linear path (t = 1 noise, t = 0 data), with SR-DiT's techniques switched by `ModelConfig`.

    Input x [B, C, H, W] -> T = (H / p)^2 patch tokens of width D (+ 1 leading REG class token when on) ->
    depth blocks -> output [B, C, H, W]. Shapes below: B batch, T tokens (class token included), D width,
    H heads of width d = D / H, K tokens kept by SPRINT.

    - SPRINT (`self.sprint`, arXiv:2510.21986): dense encoder / sparse middle on K kept tokens / dense decoder;
    - REPA (`self.repa`, arXiv:2410.06940): projects the hidden tokens after block `repa.depth` (training only);
    - REG (`self.reg`, arXiv:2507.01467): the noised teacher class token enters as token 0 and gets its own
      velocity head;
    - RoPE (`self.rope`, the rotary tables), QK-norm, value residual, RMSNorm, the MLP's activation: the parts the
      built-ins' hooks give the backbone (`srdit.model.parts`);
    - plugin techniques (`srdit.ext`, the `ext` argument): their modules (`self.ext`) and taps after blocks."""

    def __init__(self, cfg: ModelConfig, ext: Mapping[str, Mapping[str, Any]] | None = None):
        super().__init__()
        self.cfg = cfg
        depth, dim, heads = SIZES[cfg.size]
        self.depth, self.dim, self.heads = depth, dim, heads
        p, self.grid = cfg.patch_size, cfg.input_size // cfg.patch_size
        on = enabled(ext or {})
        self.reg_prefix = 1 if cfg.reg.enabled else 0
        self.token_plugins = self._token_counts(cfg, on)  # [(plugin, n extra tokens)]
        self.extra = sum(n for _, n in self.token_plugins)
        self.prefix = self.reg_prefix + self.extra  # leading tokens without a position: REG's, then the plugins'

        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        # Fixed positions, stored as a frozen parameter as in DiT (counted in the parameter total).
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(dim, self.grid)).float()[None], requires_grad=False)
        self.t_embed = TimestepEmbedder(dim, scale=cfg.time_embed_scale)
        self.y_embed = LabelEmbedder(cfg.num_classes, dim)
        self.reg = RegToken(dim, cfg.reg.dim) if cfg.reg.enabled else None
        self.rope = parts.rotary(cfg, self.prefix)  # the tables of a rotary embedding (RoPE), or None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(1, depth + 1))
        s = cfg.sprint
        self.sprint = SprintRouter(dim, s.drop_ratio, s.path_drop_prob) if s.enabled else None
        self.repa = RepaProjector(dim, cfg.repa.projector_dim, cfg.repa.teacher_dim) if cfg.repa.enabled else None
        self.final = FinalLayer(dim, p, cfg.in_channels, parts.norm(cfg, dim))
        self.initialize()
        self._plugins(on)
        # block 1's values go on to the others while any block mixes them in (value residual)
        self.mixes_values = any(getattr(b.attn, "v_lambda", None) is not None for b in self.blocks)

    @staticmethod
    def _token_counts(cfg: ModelConfig, on) -> list[tuple[str, int]]:
        """(plugin, n) for each plugin that is on and adds extra tokens (its `tokens` hook), in name order."""
        out = []
        for plugin, knobs in on:
            hook = plugin.hook("tokens")
            if hook is None:
                continue
            n = hook(cfg, knobs)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"ext.{plugin.name}: the tokens hook returned {n!r}; expected an int >= 1")
            out.append((plugin.name, n))
        return out

    def _plugins(self, on) -> None:
        """Plugin techniques that are on (`srdit.ext`, the run config's `ext` section): their modules, built after
        the backbone's init with their own (state-dict prefix `ext.<name>.`), and the blocks they tap. Without
        plugins nothing is added: no module, no attribute in the state dict, no branch taken in `forward`. `on`: the
        (plugin, resolved knobs) pairs of `srdit.ext.enabled`."""
        self.tap_at: dict[int, list[str]] = {}  # block i (1-based: after i blocks) -> plugins that read it
        self.ext_taps: dict[str, list[int]] = {}  # plugin -> the blocks it taps
        self.ext_hooks: dict[str, Any] = {}  # plugin -> its embed_tokens hook (extra tokens)
        self.ext = None
        if not on:
            return
        modules = {}
        for plugin, knobs in on:
            build, taps = plugin.hook("build"), plugin.hook("taps")
            if build is not None and (module := build(self.cfg, knobs)) is not None:
                modules[plugin.name] = module
            if plugin.hook("embed_tokens") is not None:
                if plugin.name not in modules:
                    raise ValueError(f"ext.{plugin.name}: adds tokens, so its build hook must return the module")
                self.ext_hooks[plugin.name] = plugin.hook("embed_tokens")
            for i in sorted(set(taps(self.cfg, knobs))) if taps is not None else ():
                if not 1 <= int(i) <= self.depth:
                    raise ValueError(f"ext.{plugin.name}: taps block {i}, outside 1..{self.depth} (the model depth)")
                self.tap_at.setdefault(int(i), []).append(plugin.name)
        self.ext = nn.ModuleDict(modules) if modules else None
        self._variants(on)
        tapping = {name for names in self.tap_at.values() for name in names}
        self.ext_taps = {n: sorted(i for i, ns in self.tap_at.items() if n in ns) for n in sorted(tapping)}

    def _variants(self, on) -> None:
        """Put the attention and MLP variants of the plugins that are on (hooks `attention` / `mlp`, block 1..depth)
        in place of the blocks' own modules, after the backbone's init."""
        owner: dict[tuple[str, int], str] = {}
        for plugin, knobs in on:
            for slot in ("attn", "mlp"):
                hook = plugin.hook("attention" if slot == "attn" else "mlp")
                if hook is None:
                    continue
                for i, block in enumerate(self.blocks, start=1):
                    module = hook(self.cfg, knobs, i)
                    if module is None:
                        continue
                    if not isinstance(module, nn.Module):
                        raise ValueError(f"ext.{plugin.name}: {slot} of block {i} is {module!r}, not an nn.Module")
                    if (slot, i) in owner:
                        raise ValueError(
                            f"ext.{plugin.name}: block {i}'s {slot} is already replaced by ext.{owner[slot, i]}; "
                            f"switch on one of them"
                        )
                    owner[slot, i] = plugin.name
                    setattr(block, slot, module)

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
        return self.grid * self.grid + self.reg_prefix  # plugins' extra tokens are never routed

    def inference_parameters(self) -> int:
        """Parameters used at sampling time (the REPA projector is train-only)."""
        total = sum(p.numel() for p in self.parameters())
        return total - (sum(p.numel() for p in self.repa.parameters()) if self.repa else 0)

    # ------------------------------------------------------------------------------------------------------------
    def _run(self, blocks, h, c, rope, v_first, repa_at, aux):
        """Run a span of (index, block) over h [B, T, D]. Block 0's values [B, H, T, d] become `v_first`, the
        value-residual source; REPA taps after block `repa_at` (aux["repa"] [B, T, teacher_dim])."""
        for i, block in blocks:
            h, v = block(h, c, rope=rope, v_first=v_first)
            if i == 0 and self.mixes_values:
                v_first = v
            if self.repa is not None and i + 1 == repa_at and self.training:
                aux["repa"] = self.repa(self._without_extras(h))  # [B, T - extra, teacher_dim]
            if self.tap_at and i + 1 in self.tap_at and self.training:
                aux.setdefault("taps", {})[i + 1] = h  # [B, T, D] (T = K inside SPRINT's sparse middle)
        return h, v_first

    def forward(self, x, t, y, cls_token=None, drop_sparse_path: bool | torch.Tensor = False, route_noise=None):
        """x [B, C, H, W] at time t [B] with labels y [B] (num_classes = null); cls_token [B, reg.dim] the noised
        class token (REG). Returns (velocity [B, C, H, W], aux). `drop_sparse_path` replaces the SPRINT middle by
        [MASK]: in eval a bool for the whole batch, or a bool tensor [B] per sample (path-drop guidance's
        conditional and unconditional halves in one batch; the middle blocks run only on the samples that keep it);
        in training SPRINT's per-step path drop as a 0-d bool tensor (`StepNoise.path_drop`) or a bool. `route_noise`
        [B, T] drives SPRINT's token selection in training (drawn inside when None)."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, T, D] (T = grid^2 here)
        c = self.t_embed(t) + self.y_embed(y)  # [B, D]
        if self.reg is not None:
            if cls_token is None:
                raise ValueError("model.reg is enabled: pass the noised class token `cls_token` [B, reg.dim]")
            h = torch.cat([self.reg.tokens(cls_token), h], dim=1)  # [B, T, D]: token 0 carries no position
        if self.extra:
            h = self._with_extras(h, c)  # [B, T, D]: the plugins' tokens after REG's, no position either
        rope = self.rope.tables() if self.rope is not None else None  # cos, sin [1, 1, T, d]
        aux: dict[str, torch.Tensor] = {}
        repa_at = self.cfg.repa.depth
        indexed = list(enumerate(self.blocks))

        if self.sprint is None:
            h, _ = self._run(indexed, h, c, rope, None, repa_at, aux)  # [B, T, D]
        else:
            s = self.cfg.sprint
            h, v_first = self._run(indexed[: s.dense_in], h, c, rope, None, repa_at, aux)  # [B, T, D]
            middle = indexed[s.dense_in : self.depth - s.dense_out]
            if self.training:
                if isinstance(drop_sparse_path, torch.Tensor) and drop_sparse_path.dim() > 0:
                    raise ValueError("a per-sample drop_sparse_path is for inference; training drops the whole batch")
                keep = self.sprint.select(h.shape[0], h.shape[1] - self.extra, h.device, route_noise)  # [B, K]/None
                if keep is not None and self.extra:
                    keep = self._keep_extras(keep)  # [B, K + extra]: the plugins' tokens are always kept
                g_rope = self.rope.tables(keep) if (self.rope is not None and keep is not None) else rope  # [B,1,K,d]
                g_v = self.sprint.gather(v_first, keep) if v_first is not None else None  # [B, H, K, d]
                g, _ = self._run(middle, self.sprint.gather(h, keep), c, g_rope, g_v, repa_at, aux)  # [B, K, D]
                h = self.sprint.fuse_paths(h, g, keep, drop_sparse_path)  # [B, T, D]
            else:  # every token
                mask = self.sprint.mask_token.to(h.dtype).expand_as(h)  # [MASK] for the dropped samples
                if not isinstance(drop_sparse_path, torch.Tensor):  # one decision for the batch (a Python bool)
                    g = mask if drop_sparse_path else self._run(middle, h, c, rope, v_first, repa_at, aux)[0]
                elif torch.compiler.is_compiling():  # one graph: every sample's middle, [MASK] where dropped
                    drop = drop_sparse_path.to(h.device).expand(h.shape[0])  # [B] bool
                    g = torch.where(drop[:, None, None], mask, self._run(middle, h, c, rope, v_first, repa_at, aux)[0])
                else:  # a dropped sample's middle output would be discarded, so it is not computed
                    drop = drop_sparse_path.to(h.device).expand(h.shape[0])  # [B] bool
                    g = mask
                    if not bool(drop.all()):
                        live = (~drop).nonzero().squeeze(1)  # [B'] samples that keep the sparse path
                        whole = live.numel() == h.shape[0]
                        g_live, _ = self._run(
                            middle,
                            h if whole else h[live],
                            c if whole else c[live],
                            rope,
                            v_first if whole or v_first is None else v_first[live],
                            repa_at,
                            aux,
                        )
                        g = g_live if whole else g.index_copy(0, live, g_live)  # [B, T, D]
                h = self.sprint.fuse_paths(h, g, None, False)  # [B, T, D]
            h, _ = self._run(indexed[self.depth - s.dense_out :], h, c, rope, v_first, repa_at, aux)  # [B, T, D]

        if self.ext_taps and self.training:
            aux["ext"] = self._ext_outputs(aux.pop("taps", {}))
        h = self.final(h, c)  # [B, T, D]
        if self.reg is not None:
            aux["reg"] = self.reg.head(h[:, 0])  # [B, reg.dim]
        if self.prefix:
            h = h[:, self.prefix :]  # [B, grid^2, D]
        return self.unpatchify(self.final.linear(h)), aux  # [B, T, p * p * C] -> [B, C, H, W]

    def _with_extras(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Insert the plugins' extra tokens (`embed_tokens(module, c)` -> [B, n, D] each) after REG's token."""
        r, parts = self.reg_prefix, []
        for name, n in self.token_plugins:
            tokens = self.ext_hooks[name](self.ext[name], c)
            if tuple(tokens.shape) != (h.shape[0], n, self.dim):
                raise ValueError(
                    f"ext.{name}: embed_tokens returned {tuple(tokens.shape)}; expected {(h.shape[0], n, self.dim)}"
                )
            parts.append(tokens.to(h.dtype))
        return torch.cat([h[:, :r], *parts, h[:, r:]], dim=1)

    def _without_extras(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T - extra, D]: the sequence without the plugins' tokens (REPA aligns the others)."""
        if not self.extra:
            return h
        r = self.reg_prefix
        return torch.cat([h[:, :r], h[:, r + self.extra :]], dim=1)

    def _keep_extras(self, keep: torch.Tensor) -> torch.Tensor:
        """SPRINT's kept indices over the routed tokens (REG's and the patches) [B, K] -> indices into the whole
        sequence [B, K + extra], sorted, with every extra token kept."""
        r, n = self.reg_prefix, self.extra
        shifted = torch.where(keep >= r, keep + n, keep)
        extras = torch.arange(r, r + n, device=keep.device).expand(keep.shape[0], n)
        return torch.cat([shifted, extras], dim=1).sort(dim=1).values

    def _ext_outputs(self, taps: dict[int, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Plugin name -> {"taps": {block: [B, T, D]}, "outputs": its module on those taps (None without one)}: the
        module runs inside forward, so data parallel's gradient hooks and torch.compile see it."""
        out = {}
        for name, blocks in self.ext_taps.items():
            mine = {i: taps[i] for i in blocks if i in taps}
            module = self.ext[name] if self.ext is not None and name in self.ext else None
            out[name] = {"taps": mine, "outputs": module(mine) if module is not None else None}
        return out

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, grid^2, p * p * C] -> [B, C, grid * p, grid * p]."""
        p, g, C = self.cfg.patch_size, self.grid, self.cfg.in_channels
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)


def build_model(cfg: ModelConfig, ext: Mapping[str, Mapping[str, Any]] | None = None) -> SiT:
    """The SiT of `cfg`, with the plugin techniques of a run config's `ext` section when given (`srdit.ext`)."""
    return SiT(cfg, ext)
