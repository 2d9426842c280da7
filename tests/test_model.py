"""The backbone: sizes and counts, off = plain SiT bit for bit, identities at init, RoPE, SPRINT routing."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srdit.builtins import qk_norm, relu2, swiglu
from srdit.builtins.rope import axial_angles
from srdit.config import ModelConfig, RegConfig, RepaConfig, RopeConfig, SprintConfig
from srdit.model import build_model, count_macs
from srdit.model.attention import Attention
from srdit.model.layers import Mlp, Rotary, TimestepEmbedder, apply_rope, gelu_tanh, sincos_2d
from srdit.techniques import TECHNIQUES, preset

DEBUG = ModelConfig(size="debug", patch_size=1, in_channels=1, input_size=8, num_classes=10)


def inputs(cfg, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    cls = torch.randn(batch, cfg.reg.dim, generator=g) if cfg.reg.enabled else None
    return x, t, y, cls


def randomize(model, seed=3):
    """Non-zero weights everywhere so that zero-initialised paths do not hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def mae_sincos_2d(dim, grid):
    """The fixed 2-D position table as MAE / DiT / SiT / REPA write it (`get_2d_sincos_pos_embed`): meshgrid with
    the width coordinate first, so the first half of the channels encodes the column."""

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)  # w first
    g = g.reshape(2, 1, grid, grid)
    return np.concatenate([one_axis(dim // 2, g[0]), one_axis(dim // 2, g[1])], axis=1)


def sit_timestep_embedding(t, dim=256, max_period=10000):
    """SiT's `TimestepEmbedder.timestep_embedding` (GLIDE's): t enters as given; SiT feeds t in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def reference_sit(sd, cfg, x, t, y, depth, heads):
    """An independent, plain functional SiT forward (LayerNorm, GELU-tanh MLP, adaLN-Zero), reading the weights;
    the position table and the time features are SiT's own definitions, not read from the model."""
    B, C, H, W = x.shape
    p = cfg.patch_size
    h = F.conv2d(x, sd["patch_embed.weight"], sd["patch_embed.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + torch.from_numpy(mae_sincos_2d(h.shape[-1], H // p)).float()[None]
    temb = sit_timestep_embedding(t)
    temb = F.linear(
        F.silu(F.linear(temb, sd["t_embed.mlp.0.weight"], sd["t_embed.mlp.0.bias"])),
        sd["t_embed.mlp.2.weight"],
        sd["t_embed.mlp.2.bias"],
    )
    c = temb + sd["y_embed.table.weight"][y]
    D = h.shape[-1]
    for i in range(depth):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[pre + "adaLN.1.weight"], sd[pre + "adaLN.1.bias"]).chunk(6, -1)
        a = F.layer_norm(h, (D,), eps=1e-6) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = (
            F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
            .view(B, -1, 3, heads, D // heads)
            .permute(2, 0, 3, 1, 4)
        )
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
        h = h + mod[2][:, None] * F.linear(o, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        m = F.layer_norm(h, (D,), eps=1e-6) * (1 + mod[4][:, None]) + mod[3][:, None]
        m = F.linear(
            F.gelu(F.linear(m, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh"),
            sd[pre + "mlp.fc2.weight"],
            sd[pre + "mlp.fc2.bias"],
        )
        h = h + mod[5][:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final.adaLN.1.weight"], sd["final.adaLN.1.bias"]).chunk(2, -1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = F.linear(h, sd["final.linear.weight"], sd["final.linear.bias"])
    g = H // p
    return torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, C)).reshape(B, C, H, W)


@pytest.mark.parametrize(
    "size,patch,params_m,gmacs",
    [
        ("S", 2, 33, 6.06),
        ("B", 2, 130, 23.01),
        pytest.param("L", 2, 458, 80.71, marks=pytest.mark.slow),
        pytest.param("XL", 2, 675, 118.64, marks=pytest.mark.slow),
    ],
)
def test_dit_table_counts(size, patch, params_m, gmacs):
    """DiT paper (Peebles & Xie 2023), Table 1 / Figure 3: params and GMACs at 256 px (latent 4x32x32)."""
    model = build_model(ModelConfig(size=size, patch_size=patch, in_channels=4, input_size=32, num_classes=1000))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - params_m) / params_m < 0.01
    assert abs(count_macs(model) / 1e9 - gmacs) / gmacs < 0.03


def test_srdit_b1_params():
    model = build_model(preset("SR-DiT-B/1").model)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 140.2) / 140.2 < 0.01
    assert model.inference_parameters() < sum(p.numel() for p in model.parameters())  # projector is train-only


def test_plain_backbone_matches_independent_reference():
    model = randomize(build_model(DEBUG)).eval()
    x, t, y, _ = inputs(DEBUG)
    out, aux = model(x, t, y)
    depth, heads = model.depth, model.heads
    ref = reference_sit(model.state_dict(), DEBUG, x, t, y, depth, heads)
    assert aux == {}
    assert torch.equal(out, ref)


def test_position_table_is_the_reference_table():
    """Same table as MAE / SiT / REPA / SR-DiT, channel halves included (columns first), at several widths."""
    for dim, grid in ((64, 4), (768, 16), (1152, 16)):
        assert np.array_equal(sincos_2d(dim, grid).astype(np.float32), mae_sincos_2d(dim, grid).astype(np.float32))
    table = sincos_2d(8, 3)  # token 1 is (row 0, column 1): its first half moves, its second half does not
    assert np.array_equal(table[1, 4:], table[0, 4:]) and not np.array_equal(table[1, :4], table[0, :4])


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_time_features_pin_the_sinusoid_arguments(t):
    """Argument k of the time sinusoid is t * 10000^(-k/128) (SiT / REPA / SR-DiT: t in [0, 1] unscaled), so every
    argument stays within 1 radian; DiT's scale 1000 multiplies each argument by 1000."""
    emb = TimestepEmbedder(16)
    k = torch.tensor([0, 1, 64, 127])
    a = t * 10000.0 ** (-k.double() / 128)
    f = emb.frequencies(torch.tensor([t]))[0].double()
    assert torch.allclose(f[k], torch.cos(a), atol=1e-6) and torch.allclose(f[128 + k], torch.sin(a), atol=1e-6)
    args = torch.atan2(f[128:], f[:128])  # recovers the arguments exactly while they stay below pi
    assert float(args.abs().max()) <= 1.0 + 1e-6
    assert abs(float(args[0]) - t) < 1e-6
    dit = TimestepEmbedder(16, scale=1000.0).frequencies(torch.tensor([t]))[0].double()
    a1000 = 1000 * a
    assert torch.allclose(dit[k], torch.cos(a1000), atol=1e-4) and torch.allclose(
        dit[128 + k], torch.sin(a1000), atol=1e-4
    )
    assert torch.equal(emb.frequencies(torch.tensor([t])), sit_timestep_embedding(torch.tensor([t])))


def test_time_embed_scale_is_a_model_knob():
    """`model.time_embed_scale: 1000` is DiT's convention: the same weights at t give the default model's output at
    1000 t; the default (1) is SiT's."""
    assert ModelConfig().time_embed_scale == 1.0
    torch.manual_seed(0)
    base = randomize(build_model(DEBUG)).eval()
    dit = build_model(dataclasses.replace(DEBUG, time_embed_scale=1000.0)).eval()
    dit.load_state_dict(base.state_dict())
    x, t, y, _ = inputs(DEBUG)
    assert torch.allclose(dit(x, t, y)[0], base(x, 1000.0 * t, y)[0], atol=1e-5)
    assert not torch.allclose(dit(x, t, y)[0], base(x, t, y)[0], atol=1e-3)


SWITCHES = {
    "sprint": {"sprint": SprintConfig(enabled=False, drop_ratio=0.5)},
    "rope": {"rope": RopeConfig(enabled=False, theta=100.0)},
    "repa": {"repa": RepaConfig(enabled=False, depth=3)},
    "reg": {"reg": RegConfig(enabled=False, dim=16)},
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_off_is_bit_identical(name):
    """A technique configured but off builds the same parameters from the same seed and gives the same output."""
    torch.manual_seed(7)
    base = build_model(DEBUG).train()
    torch.manual_seed(7)
    off = build_model(dataclasses.replace(DEBUG, **SWITCHES[name])).train()
    assert [k for k, _ in base.named_parameters()] == [k for k, _ in off.named_parameters()]
    x, t, y, _ = inputs(DEBUG)
    torch.manual_seed(11)
    a, _ = base(x, t, y)
    torch.manual_seed(11)
    b, _ = off(x, t, y)
    assert torch.equal(a, b)


FULL = dataclasses.replace(
    DEBUG,
    norm="rmsnorm",
    qk_norm=True,
    value_residual=True,
    rope=RopeConfig(enabled=True),
    sprint=SprintConfig(enabled=True),
    repa=RepaConfig(enabled=True, depth=2, projector_dim=32, teacher_dim=16),
    reg=RegConfig(enabled=True, dim=16),
)


@pytest.mark.parametrize("cfg", [DEBUG, FULL], ids=["plain", "full"])
def test_zero_init_paths_are_identity(cfg):
    model = build_model(cfg).train()
    x, t, y, cls = inputs(cfg)
    out, aux = model(x, t, y, cls)
    assert torch.count_nonzero(out) == 0  # zero final layer
    if cfg.reg.enabled:
        assert torch.count_nonzero(aux["reg"]) == 0  # zero class-token head
        assert aux["repa"].shape == (x.shape[0], 65, 16)
    h = torch.randn(2, 65, model.dim)
    c = torch.randn(2, model.dim)
    for block in model.blocks:  # adaLN-Zero: every block is the identity at init
        assert torch.equal(block(h, c)[0], h)


MODEL_TECHNIQUES = [name for name, tech in TECHNIQUES.items() if any(k.startswith("model.") for k in tech.diff)]


def aux_outputs(tech) -> set[str]:
    """The aux outputs of a technique's model in training, from its declaration: one per teacher-aligned model
    section (`srdit.transport.objective.TEACHER_SETTINGS`: REPA's patch tokens, REG's class token) that its diff
    enables, under the section's name."""
    from srdit.transport.objective import TEACHER_SETTINGS

    sections = {key.split(".")[1] for key in TEACHER_SETTINGS}
    return {s for s in sections if tech.diff.get(f"model.{s}.enabled") is True}


@pytest.mark.parametrize("name", MODEL_TECHNIQUES)
def test_every_model_technique(name):
    """Each technique that changes the model: right shape, finite, deterministic given the seed, aux outputs
    exactly when it needs them, finite gradients, and a prediction that differs from plain SiT's with the shared
    weights unless it only adds a training signal (REPA)."""
    from srdit.config import RunConfig
    from srdit.techniques import with_techniques

    cfg = with_techniques(RunConfig(), [name]).model
    x, t, y, cls_token = inputs(cfg)

    def run(seed=5):
        torch.manual_seed(seed)
        model = randomize(build_model(cfg)).train()
        return model, *model(x, t, y, cls_token)

    model, out, aux = run()
    _, out2, aux2 = run()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, out2) and aux.keys() == aux2.keys() and all(torch.equal(aux[k], aux2[k]) for k in aux)
    needs = aux_outputs(TECHNIQUES[name])
    assert set(aux) == needs
    assert all(torch.isfinite(v).all() for v in aux.values())
    if "repa" in aux:
        assert aux["repa"].shape == (x.shape[0], model.grid**2, cfg.repa.teacher_dim)
    if "reg" in aux:
        assert aux["reg"].shape == (x.shape[0], cfg.reg.dim)
    (out.square().mean() + sum(v.square().mean() for v in aux.values())).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        out_eval, aux_eval = model(x, t, y, cls_token)
    assert set(aux_eval) == needs - {"repa"}  # the REPA projector is train-only
    plain = build_model(RunConfig().model).eval()
    plain_sd = plain.state_dict()
    shared = {k: v for k, v in model.state_dict().items() if k in plain_sd and v.shape == plain_sd[k].shape}
    missing, _ = plain.load_state_dict(shared, strict=False)
    assert all(".mlp." in k for k in missing) and (name == "swiglu" or not missing)
    with torch.no_grad():
        out_plain, _ = plain(x, t, y)
    if name == "repa":
        assert torch.equal(out_eval, out_plain)
    else:
        assert not torch.allclose(out_eval, out_plain, atol=1e-4)


def test_rope_scores_depend_only_on_relative_offsets():
    rope = Rotary(axial_angles(head_dim=16, grid=8, prefix=0, theta=10000.0))
    cos, sin = rope.tables()
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 64, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 1, 64, 16)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    score = lambda i, j: (qr[0, 0, i] * kr[0, 0, j]).sum()
    pos = lambda r, c: r * 8 + c
    # same offset (1, 2) at two different places
    assert torch.allclose(score(pos(0, 0), pos(1, 2)), score(pos(4, 3), pos(5, 5)), atol=1e-5)
    # a different offset gives a different score
    assert not torch.allclose(score(pos(0, 0), pos(1, 2)), score(pos(0, 0), pos(2, 1)), atol=1e-3)
    # rotation preserves norms
    assert torch.allclose(qr.norm(dim=-1), q.norm(dim=-1), atol=1e-5)


def test_rope_leaves_class_token_unrotated():
    rope = Rotary(axial_angles(head_dim=16, grid=4, prefix=1, theta=10000.0))
    cos, sin = rope.tables()
    q = torch.randn(1, 1, 17, 16)
    assert torch.equal(apply_rope(q, cos, sin)[:, :, 0], q[:, :, 0])


def test_sprint_keeps_stated_tokens_in_training_and_all_in_eval():
    cfg = dataclasses.replace(FULL, sprint=SprintConfig(enabled=True, drop_ratio=0.75, path_drop_prob=0.0))
    model = build_model(cfg)
    seen = []
    hook = model.blocks[2].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    x, t, y, cls = inputs(cfg)
    model.train()(x, t, y, cls)
    model.eval()(x, t, y, cls)
    hook.remove()
    assert seen == [int(65 * 0.25), 65]


def test_sprint_drops_differently_per_sample():
    model = build_model(dataclasses.replace(DEBUG, sprint=SprintConfig(enabled=True))).train()
    idx = model.sprint.select(4, 64, torch.device("cpu"))
    assert idx.shape == (4, 16)
    assert len({tuple(r.tolist()) for r in idx}) > 1
    assert all(len(set(r.tolist())) == 16 for r in idx)


def test_path_drop_replaces_sparse_path():
    cfg = dataclasses.replace(DEBUG, sprint=SprintConfig(enabled=True))
    model = randomize(build_model(cfg)).eval()
    x, t, y, _ = inputs(cfg)
    a, _ = model(x, t, y, drop_sparse_path=True)
    # with the middle blocks scrambled, the output must not change when the sparse path is dropped
    with torch.no_grad():
        for p in model.blocks[2].parameters():
            p.add_(1.0)
    b, _ = model(x, t, y, drop_sparse_path=True)
    c, _ = model(x, t, y)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_path_drop_per_sample_equals_separate_calls():
    """A [B] drop mask (guidance's halves in one batch) gives each sample what a whole-batch call gives it; in eval
    a dropped path is [MASK] exactly as in training's `0 * g + [MASK]`, without running the middle blocks."""
    cfg = dataclasses.replace(
        DEBUG,
        sprint=SprintConfig(enabled=True),
        value_residual=True,
        rope=RopeConfig(True),
        reg=RegConfig(enabled=True, dim=16),
    )
    model = randomize(build_model(cfg)).eval()
    x, t, y, cls = inputs(cfg, batch=4)
    drop = torch.tensor([False, True, True, False])
    out, aux = model(x, t, y, cls, drop_sparse_path=drop)
    kept, kaux = model(x, t, y, cls)
    dropped, daux = model(x, t, y, cls, drop_sparse_path=True)
    for i, d in enumerate(drop):
        ref, ref_reg = (dropped, daux["reg"]) if d else (kept, kaux["reg"])
        assert torch.allclose(out[i], ref[i], atol=1e-5) and torch.allclose(aux["reg"][i], ref_reg[i], atol=1e-5)
    train_drop = randomize(build_model(cfg)).train()
    train_drop.sprint.path_drop_prob = 0.0
    train_drop.sprint.drop_ratio = 0.0  # every token: training's drop equals eval's
    train_drop.load_state_dict(model.state_dict())
    assert torch.equal(train_drop(x, t, y, cls, drop_sparse_path=True)[0], dropped)
    with pytest.raises(ValueError, match="per-sample"):
        train_drop(x, t, y, cls, drop_sparse_path=drop)


def test_reg_requires_class_token():
    model = build_model(dataclasses.replace(DEBUG, reg=RegConfig(enabled=True, dim=16)))
    x, t, y, _ = inputs(DEBUG)
    with pytest.raises(ValueError, match="class token"):
        model(x, t, y)


def test_value_residual_lambdas_start_at_half():
    model = build_model(dataclasses.replace(DEBUG, value_residual=True))
    assert model.blocks[0].attn.v_lambda is None
    assert all(float(b.attn.v_lambda) == 0.5 for b in model.blocks[1:])


def _explicit_attention(attn, x, v_first=None, lam=None, qk_weights=None):
    """Attention written out: qkv projection, optional RMSNorm over the head dim with affine weights, explicit
    softmax(q k^T / sqrt(d)), value mix V' = lam V_1 + (1 - lam) V, output projection."""
    B, T, D = x.shape
    H, d = attn.heads, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    if qk_weights is not None:
        eps = torch.finfo(x.dtype).eps  # nn.RMSNorm's default eps
        rms = lambda z, w: z / torch.sqrt(z.square().mean(-1, keepdim=True) + eps) * w  # noqa: E731
        q, k = rms(q, qk_weights[0]), rms(k, qk_weights[1])
    if lam is not None:
        v = lam * v_first + (1 - lam) * v
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(B, T, D), attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.3])
def test_value_residual_mix_closed_form(lam):
    """V' = lambda V_1 + (1 - lambda) V: lambda = 0 is plain attention (bit for bit), lambda = 1 attends with
    block 0's values only; the returned values are this block's own, before the mix."""
    torch.manual_seed(0)
    attn = Attention(32, 4, v_lambda=torch.nn.Parameter(torch.tensor(0.5))).double()
    with torch.no_grad():
        attn.v_lambda.fill_(lam)
    x, v_first = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 4, 5, 8, dtype=torch.float64)
    out, v_raw = attn(x, v_first=v_first)
    own_v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)[2]
    assert torch.equal(v_raw, own_v)
    assert torch.allclose(out, _explicit_attention(attn, x, v_first, lam), atol=1e-12)
    if lam == 0.0:
        plain = Attention(32, 4).double()
        plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "v_lambda"})
        assert torch.equal(out, plain(x)[0])
    if lam == 1.0:  # the block's own values drop out entirely: changing them changes nothing
        with torch.no_grad():
            attn.qkv.weight[64:].add_(1.0)
            attn.qkv.bias[64:].add_(1.0)
        assert torch.equal(attn(x, v_first=v_first)[0], out)
    assert torch.equal(attn(x)[0], attn(x, v_first=None)[0])  # no source (block 0): no mix


def test_qk_norm_matches_direct_computation():
    """QK-norm = RMSNorm over the head dimension with a learnable scale on q and on k, before attention."""
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=qk_norm.qk_norm(None, None, 8)).double()
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.rand(8, dtype=torch.float64) + 0.5)
        attn.k_norm.weight.copy_(torch.rand(8, dtype=torch.float64) + 0.5)
    x = 3 * torch.randn(2, 5, 32, dtype=torch.float64)
    out, _ = attn(x)
    ref = _explicit_attention(attn, x, qk_weights=(attn.q_norm.weight, attn.k_norm.weight))
    assert torch.allclose(out, ref, atol=1e-12)
    assert not torch.allclose(out, _explicit_attention(attn, x), atol=1e-3)  # the norm does something


@pytest.mark.parametrize("dim", [64, 96, 384, 768, 1024, 1152])
def test_swiglu_weight_count_against_dense_mlp(dim):
    """The dense MLP (ratio 4) has h = 4 D hidden units and 2 h D = 8 D^2 weights. SwiGLU has h' = int(2 h / 3)
    and 3 h' D weights = 8 D^2 - r D with r = 2 h mod 3: exactly the dense count when 3 divides D (S, B, XL:
    384, 768, 1152), D or 2 D fewer otherwise. Biases: 2 h' + D against h + D. Totals agree within 1%."""
    dense, gated = Mlp(dim, 4.0), Mlp(dim, 4.0, *swiglu.activation(None, None))
    weights = lambda m: m.fc1.weight.numel() + m.fc2.weight.numel()  # noqa: E731
    biases = lambda m: m.fc1.bias.numel() + m.fc2.bias.numel()  # noqa: E731
    h = 4 * dim
    h2 = int(2 * h / 3)
    assert weights(dense) == 2 * h * dim == 8 * dim * dim
    assert weights(gated) == 3 * h2 * dim == weights(dense) - ((2 * h) % 3) * dim
    assert (weights(gated) == weights(dense)) == (dim % 3 == 0)
    assert biases(dense) == h + dim and biases(gated) == 2 * h2 + dim
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(total(gated) - total(dense)) / total(dense) < 0.01


@pytest.mark.parametrize("kind", ["gelu", "relu2", "swiglu"])
def test_mlp_activations_closed_form(kind):
    torch.manual_seed(0)
    activation = {"gelu": (gelu_tanh, False), "relu2": relu2.activation(None, None)}.get(kind)
    mlp = Mlp(16, 4.0, *(activation or swiglu.activation(None, None))).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    h = F.linear(x, mlp.fc1.weight, mlp.fc1.bias)
    if kind == "gelu":
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    elif kind == "relu2":
        h = h.clamp(min=0) ** 2
    else:
        a, b = h.chunk(2, dim=-1)
        h = a * torch.sigmoid(a) * b
    assert torch.allclose(mlp(x), F.linear(h, mlp.fc2.weight, mlp.fc2.bias), atol=1e-12)
