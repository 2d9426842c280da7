"""Reference checkpoints -> srdit checkpoints (`srdit convert SRC.pt --from LAYOUT --preset NAME --out DST.pt`).

Three reference layouts, read from their code (facts only; the commits read are named):
- `sit`: SiT (Ma et al. 2024, github willisma/SiT `models.py`, commit 947f95bd3a51). train.py saves {'model', 'ema',
  'opt', 'args'}; the published SiT-XL-2-256x256.pt is a bare EMA state dict. Parameters only, the position table
  (`pos_embed`) among them as a frozen parameter; timm's PatchEmbed / Attention / Mlp register no buffers. timm
  blocks (LayerNorm, GELU-tanh MLP), `learn_sigma` doubles the output channels (the second half is discarded by
  SiT's own forward), and SiT's path runs the other way: t = 0 noise, t = 1 data, velocity = data - noise.
- `repa`: REPA's SiT (Yu et al. 2024, github sihyun-yu/REPA `models/sit.py`, commit 67f714503e38). train.py saves
  {'model', 'ema', 'opt', 'args', 'steps'}; the published last.pt is a bare EMA state dict; "legacy" files split the
  blocks into `blocks.*` + `decoder_blocks.*` (`utils.load_legacy_checkpoints`). Adds `projectors.0` (the REPA MLP);
  no buffers; path as srdit's (t = 1 noise, eps - x0). Its `--qk-norm` (timm LayerNorm, weight and bias) is not
  srdit's QK-norm: those tensors are refused as having no place.
- `speedrundit`: SR-DiT (github SwayStar123/SpeedrunDiT `models/sit.py` and `models/pos_embed.py`, commit
  c24c2ff25699): REPA's SiT plus SPRINT (`mask_token`, `fusion_proj`, 2 dense + D - 4 sparse + 2 dense blocks),
  RMSNorm blocks, QK-norm, value residual (`v1_lambda`), 2-D RoPE, the REG token (`cls_projectors2`, `wg_norm`,
  `final_layer.linear_cls`) whose position row (row 0 of a [1, T + 1, D] table) is zero. Its RoPE module
  (`feat_rope`, EVA-02's VisionRotaryEmbeddingFast) registers persistent buffers `freqs_cos` / `freqs_sin`
  [T, head_dim]: rows of the grid tokens only (the class token is left unrotated). train.py saves {'model', 'ema',
  'opt', 'args', 'steps'}; generate.py loads the 'ema' entry or a bare EMA state dict.

srdit's own layout is the same model (its tests compare SR-DiT's forward weight for weight). The map is explicit
(`RULES`, srdit key -> reference key); conversion changes values only where the layouts differ in meaning:
- the position table: the same fixed sin-cos table (same channel order); it is checked, and SR-DiT's zero class
  row is dropped;
- tables that are functions of the config and no weights (`FIXED`: SR-DiT's RoPE buffers) are checked against the
  table srdit computes for the same config (`FIXED_ATOL`), then dropped (srdit recomputes them);
- `sit`: t -> 1 - t and v -> -v are folded into the weights. The time features obey f(1 - t) = M f(t) with M made of
  the cos / sin of each frequency, so the time MLP's first weight becomes W M; the output layer keeps the first C
  of SiT's 2C channels and is negated. Equal to SiT's forward up to float32 round-off.
Coverage is checked both ways: every reference tensor is used (or is a checked `FIXED` table), every srdit tensor is
given, shapes agree, and the srdit model's parameter-free switches (norm, RoPE, SPRINT split, time scale) are those
the layout hard-codes; any failure is one `ConvertError` line naming the keys.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from srdit.cache import load_torch
from srdit.config import RunConfig, apply_diff, input_file_problem, parse_override, to_dict
from srdit.model import SIZES, build_model

LAYOUTS = ("speedrundit", "repa", "sit")
WEIGHTS = ("ema", "model")
ALL = frozenset(LAYOUTS)
SRDIT_ONLY = frozenset({"speedrundit"})

RULES: list[tuple[str, str, frozenset[str]]] = [
    # (srdit key pattern, reference key template, layouts that have the tensor)
    (r"patch_embed\.(weight|bias)", r"x_embedder.proj.\1", ALL),
    (r"pos_embed", "pos_embed", ALL),
    (r"t_embed\.mlp\.([02])\.(weight|bias)", r"t_embedder.mlp.\1.\2", ALL),
    (r"y_embed\.table\.weight", "y_embedder.embedding_table.weight", ALL),
    (r"blocks\.(\d+)\.adaLN\.1\.(weight|bias)", r"blocks.\1.adaLN_modulation.1.\2", ALL),
    (r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"blocks.\1.\2.\3", ALL),
    (r"blocks\.(\d+)\.attn\.([qk]_norm)\.weight", r"blocks.\1.attn.\2.weight", SRDIT_ONLY),  # RMSNorm (timm's: LN)
    (r"blocks\.(\d+)\.attn\.v_lambda", r"blocks.\1.attn.v1_lambda", SRDIT_ONLY),
    (r"final\.adaLN\.1\.(weight|bias)", r"final_layer.adaLN_modulation.1.\1", ALL),
    (r"final\.linear\.(weight|bias)", r"final_layer.linear.\1", ALL),
    (r"repa\.mlp\.([024])\.(weight|bias)", r"projectors.0.\1.\2", frozenset({"repa", "speedrundit"})),
    (r"sprint\.mask_token", "mask_token", SRDIT_ONLY),
    (r"sprint\.fuse\.(weight|bias)", r"fusion_proj.\1", SRDIT_ONLY),
    (r"reg\.embed\.(weight|bias)", r"cls_projectors2.\1", SRDIT_ONLY),
    (r"reg\.norm\.weight", "wg_norm.weight", SRDIT_ONLY),
    (r"reg\.head\.(weight|bias)", r"final_layer.linear_cls.\1", SRDIT_ONLY),
]
"The key map: srdit state-dict key (regex) -> the reference's key, and which layouts hold that tensor."

FIXED: list[tuple[str, frozenset[str], str, Callable[[Any, re.Match], torch.Tensor | None]]] = [
    # (reference key pattern, layouts that store it, what it is, srdit's table for the same config or None)
    (
        r"feat_rope\.freqs_(cos|sin)",
        SRDIT_ONLY,
        "the 2-D RoPE table srdit computes for this model's head width, grid and RoPE theta",
        lambda model, m: _rope_rows(model, m.group(1)),
    ),
]
"""Reference buffers that are functions of the config, not weights: each is checked equal (`FIXED_ATOL`) to the
table srdit computes itself, then dropped (srdit keeps its own as non-persistent buffers)."""

FIXED_ATOL = 1e-4
"""Tolerance of the `FIXED` check, plus the storage dtype's epsilon. SR-DiT computes its RoPE angles in float32
(positions up to grid - 1 radians), srdit in float64: the tables differ by about 6e-8 per grid row (8e-6 on a
128x128 grid); a table of another theta, grid or axis order differs by O(0.1)."""

# The model settings each layout's code hard-codes and that no tensor shape reveals (checked against the config).
LAYOUT_MODEL: dict[str, dict[str, Any]] = {
    "sit": {
        "norm": "layernorm",
        "mlp": "gelu",
        "rope.enabled": False,
        "sprint.enabled": False,
        "time_embed_scale": 1.0,
    },
    "repa": {
        "norm": "layernorm",
        "mlp": "gelu",
        "rope.enabled": False,
        "sprint.enabled": False,
        "time_embed_scale": 1.0,
    },
    "speedrundit": {
        "norm": "rmsnorm",
        "mlp": "gelu",
        "rope.enabled": True,
        "rope.theta": 10000.0,
        "sprint.enabled": True,
        "sprint.dense_in": 2,
        "sprint.dense_out": 2,
        "repa.depth": 2,
        "time_embed_scale": 1.0,
    },
}


class ConvertError(ValueError):
    """A reference checkpoint that does not convert to the requested srdit model; the message is one line."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the reference file
# ----------------------------------------------------------------------------------------------------------------


def read_reference(path: str | Path, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict `weights` ('ema' or 'model') of a reference checkpoint, and its training args (a dict, empty
    when the file has none). A bare state dict (the published files) is returned as is. Loaded with
    weights_only=True; the references' `args` (an argparse.Namespace) is the one class allowed besides tensors.
    ConvertError (one line naming the file) when it is missing, empty, not readable by torch.load (truncated,
    damaged, not torch.save's), holds other classes, or has no state dict of tensors where one is expected."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such checkpoint file")
    problem = input_file_problem(path, max_bytes=None)  # e.g. /dev/zero, a FIFO
    if problem:
        raise ConvertError(problem)
    if path.stat().st_size == 0:
        raise ConvertError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
    try:  # torch's warnings (e.g. on a pickle protocol) are kept off the terminal: the error is one line
        ckpt = load_torch(path, [argparse.Namespace])
    except Exception as e:
        raise ConvertError(_load_failure(path, e)) from None
    if not isinstance(ckpt, dict):
        raise ConvertError(f"{path}: expected a dict (a state dict, or one with 'ema' / 'model' entries)")
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    if "ema" in ckpt or "model" in ckpt:
        if weights not in ckpt:
            raise ConvertError(
                f"{path}: no {weights!r} entry (entries: {', '.join(map(str, ckpt))}); pick the "
                f"weights with --weights {' or --weights '.join(w for w in WEIGHTS if w in ckpt)}"
            )
        state = ckpt[weights]
    else:
        state = ckpt
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(
            f"{path}: {'entry ' + repr(weights) if state is not ckpt else 'file'} is not a state dict of tensors"
        )
    return dict(state), args


def _load_failure(path: Path, e: Exception) -> str:
    """One line on why torch.load refused `path`. The weights-only loader wraps its reason (a bad opcode: not a
    torch.save file; a class it does not allow) in paragraphs of advice; zip and EOF errors may carry no text."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*)", text)
    lines = (m.group(1) if m else text).strip().splitlines()
    reason = re.split(r"(?<=\.)\s", lines[0].strip())[0][:120] if lines else type(e).__name__
    g = re.search(r"Unsupported global: GLOBAL (\S+)", reason)
    if g:
        return (
            f"{path}: holds a {g.group(1)} object; checkpoints are read with torch's weights-only loader, which "
            f"takes tensors, plain containers and the training args (argparse.Namespace)"
        )
    size = path.stat().st_size
    return f"{path}: not a readable PyTorch checkpoint ({size} bytes: truncated, damaged or not torch.save's; {reason})"


def unsplit_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """REPA's legacy files keep blocks [0, E) as `blocks.*` and blocks [E, D) as `decoder_blocks.*` (REPA's
    `load_legacy_checkpoints`); rename the latter to `blocks.{E + i}`."""
    if not any(k.startswith("decoder_blocks.") for k in state):
        return state
    encoder = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    return {
        re.sub(r"^decoder_blocks\.(\d+)\.", lambda m: f"blocks.{encoder + int(m.group(1))}.", k): v
        for k, v in state.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# The map
# ----------------------------------------------------------------------------------------------------------------


def reference_key(key: str, layout: str) -> str | None:
    """The reference key holding srdit's `key` in `layout`, or None when the layout has no such tensor."""
    for pattern, template, layouts in RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template) if layout in layouts else None
    return None


def time_flip(weight: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """First time-MLP weight [D, freq_dim] of a model fed s = 1 - t, as one fed t: W M with f(1 - t) = M f(t).

    f(t) = [cos(a t), sin(a t)] (per frequency a_k = 10000^(-k/h)); cos(a - a t) = cos a cos at + sin a sin at and
    sin(a - a t) = sin a cos at - cos a sin at."""
    h = freq_dim // 2
    a = torch.exp(-math.log(10000.0) * torch.arange(h, dtype=torch.float32) / h).double()  # the model's frequencies
    cos, sin = torch.diag(a.cos()), torch.diag(a.sin())
    m = torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)  # [2h, 2h]
    return (weight.double() @ m).to(weight.dtype)


def _check_model(cfg: RunConfig, layout: str, args: dict) -> None:
    """The settings `layout` hard-codes (and those the checkpoint's training args state) against `cfg.model`."""
    expected = dict(LAYOUT_MODEL[layout])
    if layout == "repa" and isinstance(args.get("encoder_depth"), int):  # the block the REPA projector reads
        expected["repa.depth"] = args["encoder_depth"]
    if isinstance(args.get("model"), str):  # e.g. 'SiT-XL/2': heads are not visible in any tensor shape
        size, _, patch = args["model"].removeprefix("SiT-").partition("/")
        if size in SIZES and patch.isdigit():
            expected |= {"size": size, "patch_size": int(patch)}
    m = to_dict(cfg)["model"]
    wrong = []
    for key, want in expected.items():
        node = m
        for part in key.split("."):
            node = node[part]
        if node != want:
            wrong.append(f"model.{key}={str(want).lower() if isinstance(want, bool) else want}")
    if wrong:
        raise ConvertError(
            f"the {layout} layout and the checkpoint's args need settings the srdit model lacks; add "
            f"the overrides {' '.join(wrong)}"
        )


def convert_state(
    src: dict[str, torch.Tensor], layout: str, cfg: RunConfig, args: dict | None = None
) -> dict[str, torch.Tensor]:
    """srdit state dict of `cfg.model` from reference tensors `src` in `layout`; ConvertError (one line, keys named)
    on a leftover or missing tensor, a shape mismatch, a foreign position table or a contradicting setting."""
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    _check_model(cfg, layout, args or {})
    src = unsplit_legacy(src) if layout == "repa" else src
    model = build_model(cfg.model)
    own = model.state_dict()
    used, missing, wrong, out = set(), [], [], {}
    transforms = _transforms(layout, cfg, own)
    for key, target in own.items():
        ref = reference_key(key, layout)
        if ref is None or ref not in src:
            missing.append(key + (f" (reference {ref})" if ref else f" (no {layout} tensor)"))
            continue
        used.add(ref)
        value = src[ref]
        if key in transforms:
            value = transforms[key](value)
        if value.shape != target.shape:
            wrong.append(f"{ref} {tuple(src[ref].shape)} -> {key} {tuple(target.shape)}")
            continue
        out[key] = value.to(target.dtype).clone()
    tables = []
    for ref in sorted(set(src) - used):
        verdict = _fixed_mismatch(ref, src[ref], layout, model)
        if verdict is not None:  # a FIXED table: checked, then dropped
            used.add(ref)
            tables += [verdict] if verdict else []
    leftover = sorted(set(src) - used)
    problems = []
    if wrong:
        problems.append(f"shape mismatch: {_listing(wrong)}")
    if missing:
        problems.append(f"srdit tensors the checkpoint does not give: {_listing(missing)}")
    if tables:
        problems.append(f"tables that are not this model's: {_listing(tables)}")
    if leftover:
        problems.append(f"checkpoint tensors the srdit model has no place for: {_listing(leftover)}")
    if problems:
        raise ConvertError(
            "; ".join(problems) + " (match the srdit model to the checkpoint with --preset and "
            "key=value overrides of the model's size and switches)"
        )
    _check_positions(out["pos_embed"], own["pos_embed"])
    return out


def _listing(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _transforms(layout: str, cfg: RunConfig, own: dict) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """srdit key -> the change of value between the layouts (a tensor of another shape passes unchanged, for the
    shape check to name it)."""
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    tokens = own["pos_embed"].shape[1]
    if layout == "speedrundit":  # [1, 1 + T, D]: row 0 is the REG class token's position, zero

        def drop_class_row(v):
            if v.dim() != 3 or v.shape[1] != tokens + 1:
                return v
            if v[:, 0].abs().max() != 0:
                raise ConvertError("pos_embed: row 0 (the REG class token's) is not zero; not SR-DiT's table")
            return v[:, 1:]

        out["pos_embed"] = drop_class_row
    if layout == "sit":  # SiT runs t -> 1 - t and predicts -v: fold both into the weights
        p, c = cfg.model.patch_size, cfg.model.in_channels
        rows = p * p * c
        freq_dim = own["t_embed.mlp.0.weight"].shape[1]

        def velocity_sign(v):  # rows ordered (p, q, channel): keep the first C channels (2C with learn_sigma)
            if v.shape[0] == 2 * rows:
                v = v.reshape(p * p, 2 * c, *v.shape[1:])[:, :c].reshape(rows, *v.shape[1:])
            return -v

        out["t_embed.mlp.0.weight"] = lambda v: time_flip(v, freq_dim) if v.shape[-1] == freq_dim else v
        out["final.linear.weight"] = out["final.linear.bias"] = velocity_sign
    return out


def _rope_rows(model, which: str) -> torch.Tensor | None:
    """srdit's RoPE `cos` / `sin` rows of the grid tokens [T, head_dim] (its leading rows are the class token's
    identity rotation; SR-DiT leaves that token out of its table), or None without RoPE."""
    if model.rope is None:
        return None
    return getattr(model.rope, which)[model.prefix :]


def _fixed_mismatch(key: str, value: torch.Tensor, layout: str, model) -> str | None:
    """None when `key` is no `FIXED` table of `layout` (or srdit has no such table: a leftover then); '' when
    `value` is the table srdit computes for this model; otherwise why not, naming `key`."""
    for pattern, layouts, what, table in FIXED:
        m = re.fullmatch(pattern, key)
        if m is None or layout not in layouts:
            continue
        want = table(model, m)
        if want is None:
            return None
        if value.shape != want.shape:
            return f"{key} {tuple(value.shape)} is not {what} (shape {tuple(want.shape)})"
        atol = FIXED_ATOL + (torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0)
        diff = float((value.double() - want.double()).abs().max())
        if not diff <= atol:  # NaN fails too
            return f"{key} is not {what} (max |difference| {diff:.2g} > {atol:.2g})"
        return ""
    return None


def _check_positions(given: torch.Tensor, own: torch.Tensor) -> None:
    if not torch.allclose(given.float(), own.float(), atol=1e-5, rtol=0):
        raise ConvertError(
            f"pos_embed: not the fixed 2-D sin-cos table of a {int(own.shape[1] ** 0.5)}x"
            f"{int(own.shape[1] ** 0.5)} grid of width {own.shape[2]} in the reference's channel "
            f"order; is it this layout and grid?"
        )


# ----------------------------------------------------------------------------------------------------------------
# Presets and the command
# ----------------------------------------------------------------------------------------------------------------


def target_config(name: str, overrides: list[str] | None = None) -> RunConfig:
    """The srdit run config to convert into: a preset (`digits`, `SR-DiT-B/1`) or `SiT-<size>/<patch>` (SD-VAE
    latents of 256 px images, 4x32x32, 1000 classes, as SiT and REPA train), then key=value overrides."""
    from srdit.config import ConfigError, DataConfig, ModelConfig
    from srdit.techniques import PRESETS, preset

    if name in PRESETS:
        cfg = preset(name)
    else:
        size, _, patch = name.removeprefix("SiT-").partition("/")
        if size not in SIZES or patch not in ("1", "2", "4", "8"):
            raise ConfigError(
                f"--preset: unknown {name!r}; allowed: {', '.join(PRESETS)}, or SiT-<size>/<patch> "
                f"with size in {', '.join(SIZES)} and patch 1, 2, 4, 8 (e.g. SiT-XL/2)"
            )
        cfg = RunConfig(
            model=ModelConfig(size=size, patch_size=int(patch), in_channels=4, input_size=32, num_classes=1000),
            data=DataConfig(dataset="latents", path="data/imagenet256_sdvae", tokenizer=None),
        )
    diff = dict(parse_override(o) for o in overrides or [])
    return (apply_diff(cfg, diff) if diff else cfg).validate()


def convert_file(src: str | Path, layout: str, cfg: RunConfig, out: str | Path, weights: str = "ema") -> dict:
    """Convert `src` and write an srdit checkpoint (model = ema = the chosen weights, step 0) that `srdit sample`,
    `srdit evaluate` and `train.init` load. Returns a summary."""
    from srdit.cache import save_atomic

    if weights not in WEIGHTS:
        raise ConvertError(f"--weights: {weights!r}; allowed: {', '.join(WEIGHTS)}")
    if layout not in LAYOUTS:
        raise ConvertError(f"--from: unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    state, args = read_reference(src, weights)
    converted = convert_state(state, layout, cfg, args)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"file": Path(src).name, "layout": layout, "weights": weights}
    save_atomic(
        {"model": converted, "ema": converted, "config": to_dict(cfg), "step": 0, "converted_from": source}, out
    )
    return {"out": str(out), "tensors": len(converted), "params": sum(v.numel() for v in converted.values()), **source}
