"""`srdit convert`: reference checkpoints (SiT, REPA, SR-DiT) -> srdit checkpoints.

The reference state dicts are built here from the reference code's key names and shapes (SiT `models.py`, REPA and
SR-DiT `models/sit.py`), independently of srdit's key map; the converted model is checked against small functional
re-implementations of the reference forwards, then loaded by `srdit sample` and by a run's `train.init`."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srdit.commands import main
from srdit.config import RunConfig, apply_diff, to_dict
from srdit.convert import ConvertError, convert_state, read_reference, target_config
from srdit.model import SIZES, build_model
from srdit.train import CheckpointError, load_checkpoint, model_from_checkpoint, train

DEPTH, D, HEADS = SIZES["debug"]  # 6 blocks of width 64, 4 heads
P, C, S, K = 2, 1, 8, 10  # digits: patch 2 on 1x8x8, 10 classes
G = S // P  # 4x4 grid
Z, PROJ = 64, 256  # teacher width (digits-cnn), projector width: srdit's digits defaults
STACK = [
    "model.norm=rmsnorm",
    "model.rope.enabled=true",
    "model.sprint.enabled=true",
    "model.qk_norm=true",
    "model.value_residual=true",
    "model.repa.enabled=true",
    "model.reg.enabled=true",
]
"The settings SR-DiT's code hard-codes, as overrides of the digits preset."


# ------------------------------------------------------------------------------------------------------------------
# Reference layouts, written from the reference code
# ------------------------------------------------------------------------------------------------------------------


def mae_pos_embed(dim, grid, cls_token=False):
    """MAE's get_2d_sincos_pos_embed (used by SiT, REPA, SR-DiT): meshgrid(w, h), emb of grid[0] first."""

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)
    emb = np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


def eva_rope_tables(head_dim, grid, theta=10000):
    """SR-DiT's `feat_rope = VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)` buffers `freqs_cos`,
    `freqs_sin` [grid^2, head_dim], computed as its __init__ does (float32): 'lang' frequencies
    theta^(-arange(0, dim, 2) / dim), positions arange(S) / S * S, each angle repeated for an adjacent pair, the
    row-axis angles broadcast over columns concatenated before the column-axis ones, flattened row-major."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    pos = torch.arange(grid) / grid * grid
    base = torch.einsum("s,f->sf", pos, freqs).repeat_interleave(2, -1)  # (S, dim): einops '... n -> ... (n r)'
    angles = torch.cat([base[:, None, :].expand(grid, grid, dim), base[None, :, :].expand(grid, grid, dim)], -1)
    return angles.cos().reshape(grid * grid, -1), angles.sin().reshape(grid * grid, -1)


def reference_state(layout, seed=0, learn_sigma=True):
    """The state dict of the reference model class at the debug size: every tensor it registers (parameters,
    the frozen `pos_embed`, SR-DiT's RoPE buffers), random weights, the fixed tables as the reference computes them.

    SiT `models.SiT` / REPA `models.sit.SiT`: no buffers (timm PatchEmbed, Attention without qk_norm, Mlp register
    none); SR-DiT `models.sit.SiT`: `feat_rope.freqs_cos` / `freqs_sin` (persistent), RMSNorm blocks without
    affine weights, `v1_lambda` in blocks 1.., q/k RMSNorm weights with --qk-norm (its train.sh)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "x_embedder.proj.weight": (D, C, P, P),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (K + 1, D),  # class_dropout_prob > 0: one null row
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    out_ch = 2 * C if (layout == "sit" and learn_sigma) else C
    shapes |= {"final_layer.linear.weight": (P * P * out_ch, D), "final_layer.linear.bias": (P * P * out_ch,)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D),
            b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D),
            b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D),
            b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D),
            b + "adaLN_modulation.1.bias": (6 * D,),
        }
        if layout == "speedrundit":
            shapes |= {b + "attn.q_norm.weight": (D // HEADS,), b + "attn.k_norm.weight": (D // HEADS,)}
            if i > 0:
                shapes[b + "attn.v1_lambda"] = ()
    if layout in ("repa", "speedrundit"):
        shapes |= {
            "projectors.0.0.weight": (PROJ, D),
            "projectors.0.0.bias": (PROJ,),
            "projectors.0.2.weight": (PROJ, PROJ),
            "projectors.0.2.bias": (PROJ,),
            "projectors.0.4.weight": (Z, PROJ),
            "projectors.0.4.bias": (Z,),
        }
    if layout == "speedrundit":
        shapes |= {
            "mask_token": (1, 1, D),
            "fusion_proj.weight": (D, 2 * D),
            "fusion_proj.bias": (D,),
            "cls_projectors2.weight": (D, Z),
            "cls_projectors2.bias": (D,),
            "wg_norm.weight": (D,),
            "final_layer.linear_cls.weight": (Z, D),
            "final_layer.linear_cls.bias": (Z,),
        }
    state = {
        k: torch.randn(s, generator=g) * (0.3 if len(s) < 2 else 1.0 / math.sqrt(s[-1] if len(s) == 2 else 4))
        for k, s in shapes.items()
    }
    for k in state:
        if k.endswith("v1_lambda"):
            state[k] = torch.rand((), generator=g)
        if k.endswith("norm.weight"):
            state[k] = 1 + 0.2 * torch.randn(state[k].shape, generator=g)
    state["pos_embed"] = mae_pos_embed(D, G, cls_token=layout == "speedrundit")
    if layout == "speedrundit":
        state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = eva_rope_tables(D // HEADS, G)
    return state


def reference_forward(sd, layout, x, t, y, cls_token=None):
    """SiT / REPA / SR-DiT forward in eval mode, functional, from the reference code (timm Attention: qkv ->
    (3, B, H, N, d); SR-DiT: RMSNorm blocks, QK RMSNorm, v1 residual before RoPE, EVA 2-D RoPE from the state's
    `feat_rope` tables with the leading class token left unrotated, SPRINT 2 / D-4 / 2 with every token, REG token
    in front). Returns (velocity, class-token out)."""
    B = x.shape[0]
    d = D // HEADS
    srdit = layout == "speedrundit"
    norm = (lambda h: F.rms_norm(h, (D,), eps=1e-6)) if srdit else (lambda h: F.layer_norm(h, (D,), eps=1e-6))
    lin = lambda h, k: F.linear(h, sd[k + ".weight"], sd[k + ".bias"])
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    if srdit:
        tok = F.rms_norm(lin(cls_token, "cls_projectors2"), (D,), sd["wg_norm.weight"], eps=1e-6)
        h = torch.cat([tok[:, None], h], 1)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    if srdit:  # the module's buffers rotate the grid tokens (rope ids 0..T-1); the leading class token stays as is
        cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]

        def rope(q):
            lead, tail = q[..., :1, :], q[..., 1:, :]
            pairs = tail.unflatten(-1, (-1, 2))
            rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
            return torch.cat([lead, tail * cos + rot * sin], -2)

    def block(i, h, v1):
        b = f"blocks.{i}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, -1)
        a = norm(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(B, -1, 3, HEADS, d).permute(2, 0, 3, 1, 4).unbind(0)
        v_raw = v
        if srdit:
            q = F.rms_norm(q, (d,), sd[b + "attn.q_norm.weight"])
            k = F.rms_norm(k, (d,), sd[b + "attn.k_norm.weight"])
            if v1 is not None:
                lam = sd[b + "attn.v1_lambda"]
                v = lam * v1 + (1 - lam) * v
            q, k = rope(q), rope(k)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
        h = h + mod[2][:, None] * lin(o, b + "attn.proj")
        m = norm(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        h = h + mod[5][:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        return h, v_raw

    v1 = None
    if srdit:
        for i in range(2):
            h, v = block(i, h, v1)
            v1 = v if v1 is None else v1
        enc = h
        for i in range(2, DEPTH - 2):
            h, _ = block(i, h, v1)
        h = lin(torch.cat([enc, h], -1), "fusion_proj")
        for i in range(DEPTH - 2, DEPTH):
            h, _ = block(i, h, v1)
    else:
        for i in range(DEPTH):
            h, _ = block(i, h, None)
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    h = norm(h) * (1 + scale[:, None]) + shift[:, None]
    cls_out = lin(h[:, 0], "final_layer.linear_cls") if srdit else None
    out = lin(h[:, 1:] if srdit else h, "final_layer.linear")
    ch = out.shape[-1] // (P * P)
    img = torch.einsum("nhwpqc->nchpwq", out.reshape(B, G, G, P, P, ch)).reshape(B, ch, S, S)
    if layout == "sit" and ch == 2 * C:  # learn_sigma: SiT's forward keeps the first half
        img = img[:, :C]
    return img, cls_out


def digits_target(layout):
    return target_config(
        "digits", STACK if layout == "speedrundit" else ["model.repa.enabled=true"] if layout == "repa" else []
    )


def inputs(seed=4, n=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, C, S, S, generator=g),
        torch.rand(n, generator=g),
        torch.tensor([0, 7, K])[:n],
        torch.randn(n, Z, generator=g),
    )


# ------------------------------------------------------------------------------------------------------------------
# Numerics: the converted srdit model computes the reference's function
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sit_layout_gives_sits_velocity_in_srdits_convention(learn_sigma):
    """SiT: t = 0 noise, predicts data - noise; srdit: t = 1 noise, predicts noise - data. So srdit's v(x, t) must
    be -v_SiT(x, 1 - t). Tolerance: float32 round-off of the folded time-feature rotation (W M computed in float64,
    rounded once) against SiT's own features of 1 - t."""
    src = reference_state("sit", learn_sigma=learn_sigma)
    cfg = digits_target("sit")
    model = build_model(cfg.model).eval()
    model.load_state_dict(convert_state(src, "sit", cfg))
    x, t, y, _ = inputs()
    ours, _ = model(x, t, y)
    ref, _ = reference_forward(src, "sit", x, 1 - t, y)
    assert torch.allclose(ours, -ref, atol=2e-5, rtol=1e-5), float((ours + ref).abs().max())
    assert float(ref.abs().mean()) > 0.1  # a live function, not zeros


def test_repa_layout_is_the_same_function():
    src = reference_state("repa")
    cfg = digits_target("repa")
    model = build_model(cfg.model).eval()
    model.load_state_dict(convert_state(src, "repa", cfg))
    x, t, y, _ = inputs()
    assert torch.allclose(model(x, t, y)[0], reference_forward(src, "repa", x, t, y)[0], atol=1e-5, rtol=0)
    h = torch.randn(2, G * G, D)  # the projector is the same MLP
    proj = F.linear(
        F.silu(
            F.linear(
                F.silu(F.linear(h, src["projectors.0.0.weight"], src["projectors.0.0.bias"])),
                src["projectors.0.2.weight"],
                src["projectors.0.2.bias"],
            )
        ),
        src["projectors.0.4.weight"],
        src["projectors.0.4.bias"],
    )
    assert torch.allclose(model.repa(h), proj, atol=1e-6)


def test_speedrundit_layout_is_the_same_function():
    src = reference_state("speedrundit")
    cfg = digits_target("speedrundit")
    model = build_model(cfg.model).eval()
    model.load_state_dict(convert_state(src, "speedrundit", cfg))
    x, t, y, cls = inputs()
    v, aux = model(x, t, y, cls)
    ref_v, ref_cls = reference_forward(src, "speedrundit", x, t, y, cls)
    assert torch.allclose(v, ref_v, atol=1e-5, rtol=0) and torch.allclose(aux["reg"], ref_cls, atol=1e-5, rtol=0)
    assert float(ref_v.abs().mean()) > 0.1


def test_repa_legacy_split_blocks_are_joined():
    src = reference_state("repa")
    legacy = {
        (
            f"decoder_blocks.{int(k.split('.')[1]) - 4}." + k.split(".", 2)[2]
            if k.startswith("blocks.") and int(k.split(".")[1]) >= 4
            else k
        ): v
        for k, v in src.items()
    }
    cfg = digits_target("repa")
    a, b = convert_state(src, "repa", cfg), convert_state(legacy, "repa", cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------------
# Files and the command
# ------------------------------------------------------------------------------------------------------------------


def training_file(path, layout, **kw):
    """A reference training checkpoint as the reference train.py writes it: model, ema, opt, args (a Namespace)."""
    ema, raw = reference_state(layout, seed=0, **kw), reference_state(layout, seed=1, **kw)
    torch.save(
        {
            "model": raw,
            "ema": ema,
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="SiT-debug/2", encoder_depth=2, qk_norm=False),
            "steps": 10,
        },
        path,
    )
    return ema, raw


@pytest.mark.parametrize("layout", ["sit", "repa", "speedrundit"])
def test_convert_command_round_trip_then_sample(layout, tmp_path, capsys):
    """reference file -> `srdit convert` -> `srdit sample` runs on the converted EMA weights."""
    src = tmp_path / "ref.pt"
    ema, _ = training_file(src, layout)
    out = tmp_path / "srdit.pt"
    overrides = STACK if layout == "speedrundit" else ["model.repa.enabled=true"] if layout == "repa" else []
    assert main(["convert", str(src), "--from", layout, "--preset", "digits", "--out", str(out), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == layout and summary["weights"] == "ema"
    model, cfg = model_from_checkpoint(load_checkpoint(out))
    assert cfg.model == digits_target(layout).model
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    assert (
        main(["sample", str(out), "--n", "4", "--steps", "2", "--sampler", "euler", "--out", str(tmp_path / "samples")])
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 4 and (tmp_path / "samples" / "samples.png").is_file()


def test_weights_flag_picks_raw_or_ema(tmp_path):
    src = tmp_path / "ref.pt"
    ema, raw = training_file(src, "repa")
    cfg = digits_target("repa")
    for which, want in (("ema", ema), ("model", raw)):
        state, args = read_reference(src, which)
        assert torch.equal(
            convert_state(state, "repa", cfg)["blocks.3.mlp.fc1.weight"], want["blocks.3.mlp.fc1.weight"]
        )
        assert args["encoder_depth"] == 2
    torch.save(ema, tmp_path / "bare.pt")  # the published files: a bare EMA state dict
    state, args = read_reference(tmp_path / "bare.pt")
    assert args == {} and set(state) == set(ema)
    torch.save({"model": raw}, tmp_path / "raw_only.pt")
    with pytest.raises(ConvertError, match="no 'ema' entry.*--weights model"):
        read_reference(tmp_path / "raw_only.pt")


def _fails(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("srdit convert: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "damage,expect",
    [
        (
            "missing",
            "srdit tensors the checkpoint does not give: blocks.2.mlp.fc2.bias (reference blocks.2.mlp.fc2.bias)",
        ),
        ("extra", "checkpoint tensors the srdit model has no place for: blocks.6.attn.qkv.weight"),
        ("shape", "shape mismatch: y_embedder.embedding_table.weight (10, 64) -> y_embed.table.weight (11, 64)"),
        ("positions", "pos_embed: not the fixed 2-D sin-cos table"),
    ],
)
def test_bad_reference_tensors_are_one_line_errors_naming_the_keys(damage, expect, tmp_path, capsys):
    state = reference_state("repa")
    if damage == "missing":
        del state["blocks.2.mlp.fc2.bias"]
    elif damage == "extra":
        state["blocks.6.attn.qkv.weight"] = torch.zeros(3 * D, D)
    elif damage == "shape":
        state["y_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"][:K]  # no null row
    else:  # the halves of the table swapped (rows first): a table from another layout
        state["pos_embed"] = torch.cat([state["pos_embed"][..., D // 2 :], state["pos_embed"][..., : D // 2]], -1)
    torch.save(state, tmp_path / "bad.pt")
    err = _fails(
        capsys,
        [
            "convert",
            str(tmp_path / "bad.pt"),
            "--from",
            "repa",
            "--preset",
            "digits",
            "--out",
            str(tmp_path / "o.pt"),
            "model.repa.enabled=true",
        ],
    )
    assert expect in err
    assert not (tmp_path / "o.pt").exists()


def test_wrong_model_settings_and_inputs_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "ref.pt"
    training_file(src, "speedrundit")
    out = ["--out", str(tmp_path / "o.pt")]
    err = _fails(capsys, ["convert", str(src), "--from", "speedrundit", "--preset", "digits", *out])
    assert "add the overrides model.norm=rmsnorm model.rope.enabled=true model.sprint.enabled=true" in err
    err = _fails(capsys, ["convert", str(src), "--from", "sit", "--preset", "digits", *out])  # SR-DiT file as SiT
    assert "checkpoint tensors the srdit model has no place for: blocks.0.attn.k_norm.weight" in err
    err = _fails(
        capsys,
        [
            "convert",
            str(src),
            "--from",
            "speedrundit",
            "--preset",
            "digits",
            *out,
            *STACK,
            "model.time_embed_scale=1000",
        ],
    )
    assert "model.time_embed_scale=1.0" in err
    training_file(tmp_path / "repa.pt", "repa")  # its args: model SiT-debug/2, encoder_depth 2
    err = _fails(
        capsys,
        [
            "convert",
            str(tmp_path / "repa.pt"),
            "--from",
            "repa",
            "--preset",
            "digits",
            *out,
            "model.repa.enabled=true",
            "model.repa.depth=3",
            "model.patch_size=1",
        ],
    )
    assert "the checkpoint's args need" in err and "model.repa.depth=2 model.patch_size=2" in err
    assert "unknown layout 'dit'" in _fails(capsys, ["convert", str(src), "--from", "dit", "--preset", "digits", *out])
    assert "--weights: 'last'" in _fails(
        capsys, ["convert", str(src), "--from", "sit", "--preset", "digits", "--weights", "last", *out]
    )
    assert "unknown 'SiT-Q/2'" in _fails(capsys, ["convert", str(src), "--from", "sit", "--preset", "SiT-Q/2", *out])
    assert "no such checkpoint file" in _fails(
        capsys, ["convert", str(tmp_path / "none.pt"), "--from", "sit", "--preset", "digits", *out]
    )
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert "not a readable PyTorch checkpoint" in _fails(
        capsys, ["convert", str(tmp_path / "text.pt"), "--from", "sit", "--preset", "digits", *out]
    )


# ------------------------------------------------------------------------------------------------------------------
# Reference files as the reference code saves them: every registered tensor, buffers included, in its containers
# ------------------------------------------------------------------------------------------------------------------

ENCODER = 4  # REPA legacy files: blocks [0, 4) as blocks.*, [4, 6) as decoder_blocks.*


def legacy_split(state):
    """REPA's legacy layout, the inverse of its `load_legacy_checkpoints`: block E + i saved as decoder_blocks.i."""
    out = {}
    for k, v in state.items():
        i = int(k.split(".")[1]) if k.startswith("blocks.") else -1
        out[f"decoder_blocks.{i - ENCODER}.{k.split('.', 2)[2]}" if i >= ENCODER else k] = v
    return out


def reference_args(layout):
    """The training args each train.py pickles (the fields srdit reads, and a few others as they come)."""
    common = {"model": "SiT-debug/2", "num_classes": K}
    if layout == "sit":
        return argparse.Namespace(**common, image_size=64, path_type="Linear", ckpt_every=50_000)
    if layout == "repa":
        return argparse.Namespace(**common, encoder_depth=2, qk_norm=False, projector_embed_dims="64", legacy=True)
    return argparse.Namespace(**common, qk_norm=True, enc_type="dinov2-vit-b", cls=0.03, time_shifting=True)


def save_as_reference(path, layout, container, legacy=False):
    """Write `path` as the reference does: its train.py's checkpoint (container 'training': SiT {'model', 'ema',
    'opt', 'args'}, REPA / SR-DiT also 'steps') or the published bare EMA state dict ('ema'). Returns the (ema,
    raw) state dicts, unsplit."""
    ema, raw = reference_state(layout, seed=0), reference_state(layout, seed=1)
    as_saved = legacy_split if legacy else dict
    if container == "ema":
        torch.save(as_saved(ema), path)
        return ema, raw
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=1e-4)
    param.grad = torch.ones(3)
    opt.step()  # an optimizer state with its tensors and step counts, as a real run's
    ckpt = {"model": as_saved(raw), "ema": as_saved(ema), "opt": opt.state_dict(), "args": reference_args(layout)}
    if layout != "sit":
        ckpt["steps"] = 10_000
    torch.save(ckpt, path)
    return ema, raw


def target_overrides(layout):
    return STACK if layout == "speedrundit" else ["model.repa.enabled=true"] if layout == "repa" else []


def reference_euler(sd, layout, noise, y, steps):
    """Euler steps of the reference's ODE in its own time: SiT from t = 0 (noise) to 1 (data), REPA / SR-DiT from
    t = 1 (noise) to 0 with SR-DiT's class token integrated alongside; float64 state, float32 model, as their
    samplers."""
    state = [n.double() for n in noise]
    grid = torch.linspace(0.0, 1.0, steps + 1) if layout == "sit" else torch.linspace(1.0, 0.0, steps + 1)
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t = torch.full((state[0].shape[0],), a)
        v, cls_v = reference_forward(sd, layout, state[0].float(), t, y, state[1].float() if len(state) > 1 else None)
        state = [s + d.double() * (b - a) for s, d in zip(state, [v] + ([cls_v] if cls_v is not None else []))]
    return state


@pytest.mark.parametrize("container", ["training", "ema"])
@pytest.mark.parametrize(
    "layout,legacy", [("sit", False), ("repa", False), ("repa", True), ("speedrundit", False)], ids=str
)
def test_reference_files_as_saved_convert_to_the_reference_function(layout, legacy, container, tmp_path, capsys):
    """Files holding every tensor the reference model registers (SR-DiT's RoPE buffers included), in the reference's
    containers, convert with `srdit convert`; the converted model computes the reference forward and a 4-step Euler
    sampler ends where the reference's does. Tolerances: the forwards' float32 round-off (SiT: 2e-5, its time-flip
    folded into the weights; else 1e-5); the samplers: 1e-5 (4 such steps of size 1/4 on a float64 state; measured
    7e-7)."""
    from srdit.transport.samplers import guided_velocity, sample

    src = tmp_path / "ref.pt"
    ema, raw = save_as_reference(src, layout, container, legacy)
    out = tmp_path / "srdit.pt"
    for weights, sd in [("ema", ema), ("model", raw)][: 2 if container == "training" else 1]:
        argv = ["convert", str(src), "--from", layout, "--preset", "digits", "--out", str(out), "--weights", weights]
        assert main(argv + target_overrides(layout)) == 0
        assert json.loads(capsys.readouterr().out)["weights"] == weights
        model, cfg = model_from_checkpoint(load_checkpoint(out))
        model.eval()
        x, t, y, cls = inputs()
        with torch.no_grad():
            if layout == "sit":
                ref, _ = reference_forward(sd, "sit", x, 1 - t, y)
                assert torch.allclose(model(x, t, y)[0], -ref, atol=2e-5, rtol=1e-5)
            else:
                v, aux = model(x, t, y, cls if layout == "speedrundit" else None)
                ref, ref_cls = reference_forward(sd, layout, x, t, y, cls)
                assert torch.allclose(v, ref, atol=1e-5, rtol=0)
                if layout == "speedrundit":
                    assert torch.allclose(aux["reg"], ref_cls, atol=1e-5, rtol=0)
            assert float(ref.abs().mean()) > 0.1
            noise = [x] + ([cls] if cfg.model.reg.enabled else [])
            ours = sample(guided_velocity(model, y, K), noise, "euler", steps=4).state
            theirs = reference_euler(sd, layout, noise, y, steps=4)
        assert len(ours) == len(theirs) == (2 if layout == "speedrundit" else 1)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
        assert float((ours[0] - x).abs().mean()) > 0.1  # the steps moved the state


def _convert_fails(capsys, src, layout, out):
    return _fails(
        capsys,
        ["convert", str(src), "--from", layout, "--preset", "digits", "--out", str(out), *target_overrides(layout)],
    )


@pytest.mark.parametrize("tamper", ["theta", "axes", "grid"])
def test_a_rope_table_that_is_not_this_models_is_refused_naming_the_key(tamper, tmp_path, capsys):
    """SR-DiT's RoPE buffers are a function of the config: another theta, the axes swapped (column angles first) or
    another grid is one line naming the key, and nothing is written."""
    state = reference_state("speedrundit")
    half = D // HEADS // 2
    sin = state["feat_rope.freqs_sin"]
    key, table = {
        "theta": ("feat_rope.freqs_cos", eva_rope_tables(D // HEADS, G, theta=100)[0]),
        "axes": ("feat_rope.freqs_sin", torch.cat([sin[:, half:], sin[:, :half]], 1)),
        "grid": ("feat_rope.freqs_cos", eva_rope_tables(D // HEADS, 2 * G)[0]),
    }[tamper]
    state[key] = table
    torch.save({"ema": state, "model": state, "args": reference_args("speedrundit"), "steps": 1}, tmp_path / "bad.pt")
    err = _convert_fails(capsys, tmp_path / "bad.pt", "speedrundit", tmp_path / "o.pt")
    assert f"{key} " in err and "is not the 2-D RoPE table srdit computes" in err
    assert err.count("feat_rope") == 1  # the untouched table passes
    if tamper == "grid":
        assert f"{key} ({4 * G * G}, {D // HEADS}) is not" in err and f"(shape ({G * G}, {D // HEADS}))" in err
    assert not (tmp_path / "o.pt").exists()


def test_rope_tables_in_a_layout_without_rope_are_refused(tmp_path, capsys):
    """Only the layout whose model registers a table may drop it; elsewhere it is an unknown extra tensor."""
    state = reference_state("repa")
    state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = eva_rope_tables(D // HEADS, G)
    torch.save(state, tmp_path / "repa.pt")
    err = _convert_fails(capsys, tmp_path / "repa.pt", "repa", tmp_path / "o.pt")
    assert "checkpoint tensors the srdit model has no place for: feat_rope.freqs_cos, feat_rope.freqs_sin" in err
    state = reference_state("speedrundit")
    state["feat_rope.freqs_tan"] = state["feat_rope.freqs_sin"]  # not a buffer SR-DiT registers
    torch.save(state, tmp_path / "srdit.pt")
    err = _convert_fails(capsys, tmp_path / "srdit.pt", "speedrundit", tmp_path / "o.pt")
    assert "checkpoint tensors the srdit model has no place for: feat_rope.freqs_tan" in err


def test_empty_truncated_and_random_files_are_one_line_errors_naming_the_file(tmp_path, capsys):
    good = tmp_path / "good.pt"
    training_file(good, "sit")
    data = good.read_bytes()
    cases = {
        "empty.pt": (b"", "empty file (0 bytes), not a PyTorch checkpoint"),
        "half.pt": (data[: len(data) // 2], "not a readable PyTorch checkpoint"),
        "head.pt": (data[:100], "not a readable PyTorch checkpoint (100 bytes: truncated, damaged"),
        "random.pt": (np.random.default_rng(0).bytes(4096), "not a readable PyTorch checkpoint (4096 bytes"),
        "one_byte.pt": (b"\x80", "not a readable PyTorch checkpoint (1 bytes"),
    }
    for name, (content, expect) in cases.items():
        (tmp_path / name).write_bytes(content)
        err = _fails(
            capsys,
            ["convert", str(tmp_path / name), "--from", "sit", "--preset", "digits", "--out", str(tmp_path / "o.pt")],
        )
        assert f"{tmp_path / name}: {expect}" in err, err
    torch.save({"ema": reference_state("sit"), "args": np.float64(1.0)}, tmp_path / "numpy.pt")  # not loadable safely
    err = _fails(
        capsys,
        ["convert", str(tmp_path / "numpy.pt"), "--from", "sit", "--preset", "digits", "--out", str(tmp_path / "o.pt")],
    )
    assert f"{tmp_path / 'numpy.pt'}: holds a numpy" in err and "weights-only loader" in err
    assert not (tmp_path / "o.pt").exists()


def test_sit_xl2_preset_matches_the_reference_shapes():
    cfg = target_config("SiT-XL/2")
    m = cfg.model
    assert (m.size, m.patch_size, m.in_channels, m.input_size, m.num_classes) == ("XL", 2, 4, 32, 1000)
    assert SIZES["XL"] == (28, 1152, 16)  # SiT_XL_2: depth 28, hidden 1152, 16 heads


# ------------------------------------------------------------------------------------------------------------------
# A converted checkpoint as a run's starting point (train.init) and as a fixed, evaluated arm (train.steps 0)
# ------------------------------------------------------------------------------------------------------------------


def test_train_init_with_zero_steps_evaluates_the_given_weights(tmp_path, capsys):
    training_file(tmp_path / "ref.pt", "sit")
    conv = tmp_path / "conv.pt"
    assert main(["convert", str(tmp_path / "ref.pt"), "--from", "sit", "--preset", "digits", "--out", str(conv)]) == 0
    capsys.readouterr()
    cfg = apply_diff(
        RunConfig(),
        {
            "train.steps": 0,
            "train.init": str(conv),
            "eval.n_samples": 50,
            "eval.batch_size": 50,
            "sample.steps": 4,
            "sample.sampler": "euler",
        },
    ).validate()
    r = train(cfg, tmp_path / "run", progress=False)
    assert r.status == "finished" and r.step == 0 and math.isfinite(r.metrics["fd"])
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    given = load_checkpoint(conv)["ema"]
    assert all(torch.equal(saved["ema"][k], given[k]) and torch.equal(saved["model"][k], given[k]) for k in given)
    # the same numbers as evaluating the converted checkpoint directly
    assert main(["evaluate", str(conv), "--n", "50", "--steps", "4", "--sampler", "euler", "--json"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert direct["fd"] == pytest.approx(r.metrics["fd"], rel=1e-9)


def test_train_init_refuses_another_model_and_steps_zero_needs_init(tmp_path):
    training_file(tmp_path / "ref.pt", "repa")
    conv = tmp_path / "conv.pt"
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ref.pt"),
                "--from",
                "repa",
                "--preset",
                "digits",
                "--out",
                str(conv),
                "model.repa.enabled=true",
            ]
        )
        == 0
    )
    cfg = apply_diff(RunConfig(), {"train.steps": 0, "train.init": str(conv)})  # REPA off here
    with pytest.raises(CheckpointError, match="another model"):
        train(cfg, tmp_path / "run", progress=False)
    from srdit.config import ConfigError

    with pytest.raises(ConfigError, match="train.steps 0 only with train.init"):
        apply_diff(RunConfig(), {"train.steps": 0}).validate()


def test_train_init_is_a_path_field_resolved_like_the_others(tmp_path):
    from srdit.config import PATH_FIELDS, resolve_paths

    assert "train.init" in PATH_FIELDS
    cfg = resolve_paths(apply_diff(RunConfig(), {"train.init": "ckpt/conv.pt"}), tmp_path)
    assert cfg.train.init == str(tmp_path / "ckpt" / "conv.pt")


def test_checkpoint_from_before_the_time_scale_knob_loads_with_dits_scale():
    """Checkpoints written before `model.time_embed_scale` existed were trained with 1000 t."""
    cfg = RunConfig()
    model = build_model(cfg.model)
    config = to_dict(cfg)
    del config["model"]["time_embed_scale"]
    loaded, loaded_cfg = model_from_checkpoint(
        {"model": model.state_dict(), "ema": model.state_dict(), "config": config, "step": 1}
    )
    assert loaded_cfg.model.time_embed_scale == 1000.0 and loaded.t_embed.scale == 1000.0
    current, current_cfg = model_from_checkpoint(
        {"model": model.state_dict(), "ema": model.state_dict(), "config": to_dict(cfg), "step": 1}
    )
    assert current_cfg.model.time_embed_scale == 1.0


@pytest.mark.slow
def test_study_with_a_converted_checkpoint_as_a_fixed_arm(tmp_path, monkeypatch, capsys):
    """A custom diff {train.steps: 0, train.init: <converted>} is a study arm that is evaluated, not trained; its
    path is relative to where the study starts, as every path field."""
    import ray
    import yaml

    from srdit.runtime.driver import run_study
    from srdit.runtime.ray_parts import shutdown_ray
    from srdit.runtime.results import load_results
    from srdit.study.spec import load_study

    monkeypatch.chdir(tmp_path)
    training_file(tmp_path / "ref.pt", "sit")
    assert main(["convert", "ref.pt", "--from", "sit", "--preset", "digits", "--out", "ckpt/sit.pt"]) == 0
    capsys.readouterr()
    base = {
        "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
        "eval": {"n_samples": 50, "batch_size": 50},
        "sample": {"sampler": "euler", "steps": 2},
    }
    study = {
        "name": "fixed_arm",
        "base": base,
        "seeds": [0],
        "techniques": [{"name": "published", "diff": {"train.steps": 0, "train.init": "ckpt/sit.pt"}}],
        "metrics": {"primary": "fd", "direction": "min"},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    spec = load_study(tmp_path / "study.yaml")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        res = run_study(spec, tmp_path / "state")
    finally:
        shutdown_ray()
    assert res.complete and res.statuses == {"finished": 2}
    table = load_results(spec, tmp_path / "state", curves=False)[0].table
    fixed = table[table["published"] == 1].iloc[0]
    assert fixed["status"] == "finished"
    capsys.readouterr()
    assert main(["evaluate", "ckpt/sit.pt", "--n", "50", "--steps", "2", "--sampler", "euler", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fd"] == pytest.approx(float(fixed["fd"]), rel=1e-9)
