"""The backbone: sizes and counts, off = plain SiT bit for bit, identities at init, RoPE, SPRINT routing."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from srdit.config import ModelConfig, RepaConfig, RegConfig, RopeConfig, SprintConfig
from srdit.techniques import TECHNIQUES, preset
from srdit.model import build_model, count_macs
from srdit.model.layers import Rope2d, apply_rope

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


def reference_sit(sd, cfg, x, t, y, depth, heads):
    """An independent, plain functional SiT forward (LayerNorm, GELU-tanh MLP, adaLN-Zero), reading the weights."""
    B, C, H, W = x.shape
    p = cfg.patch_size
    h = F.conv2d(x, sd["patch_embed.weight"], sd["patch_embed.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embed.mlp.0.weight"], sd["t_embed.mlp.0.bias"])),
                    sd["t_embed.mlp.2.weight"], sd["t_embed.mlp.2.bias"])
    c = temb + sd["y_embed.table.weight"][y]
    D = h.shape[-1]
    for i in range(depth):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[pre + "adaLN.1.weight"], sd[pre + "adaLN.1.bias"]).chunk(6, -1)
        a = F.layer_norm(h, (D,), eps=1e-6) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).view(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
        h = h + mod[2][:, None] * F.linear(o, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        m = F.layer_norm(h, (D,), eps=1e-6) * (1 + mod[4][:, None]) + mod[3][:, None]
        m = F.linear(F.gelu(F.linear(m, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        h = h + mod[5][:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final.adaLN.1.weight"], sd["final.adaLN.1.bias"]).chunk(2, -1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = F.linear(h, sd["final.linear.weight"], sd["final.linear.bias"])
    g = H // p
    return torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, C)).reshape(B, C, H, W)


@pytest.mark.parametrize("size,patch,params_m,gmacs", [
    ("S", 2, 33, 6.06), ("B", 2, 130, 23.01),
    pytest.param("L", 2, 458, 80.71, marks=pytest.mark.slow), pytest.param("XL", 2, 675, 118.64, marks=pytest.mark.slow),
])
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
    DEBUG, norm="rmsnorm", qk_norm=True, value_residual=True, rope=RopeConfig(enabled=True),
    sprint=SprintConfig(enabled=True), repa=RepaConfig(enabled=True, depth=2, projector_dim=32, teacher_dim=16),
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


def test_forward_shapes_for_every_technique():
    for name, tech in TECHNIQUES.items():
        if not any(k.startswith("model.") for k in tech.diff):
            continue
        from srdit.config import RunConfig
        from srdit.techniques import with_techniques
        cfg = with_techniques(RunConfig(), [name]).model
        model = randomize(build_model(cfg)).train()
        x, t, y, cls = inputs(cfg)
        out, aux = model(x, t, y, cls)
        assert out.shape == x.shape, name
        out.sum().backward()


def test_rope_scores_depend_only_on_relative_offsets():
    rope = Rope2d(head_dim=16, grid=8, prefix=0, theta=10000.0)
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
    rope = Rope2d(head_dim=16, grid=4, prefix=1, theta=10000.0)
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


def test_reg_requires_class_token():
    model = build_model(dataclasses.replace(DEBUG, reg=RegConfig(enabled=True, dim=16)))
    x, t, y, _ = inputs(DEBUG)
    with pytest.raises(ValueError, match="class token"):
        model(x, t, y)


def test_value_residual_lambdas_start_at_half():
    model = build_model(dataclasses.replace(DEBUG, value_residual=True))
    assert model.blocks[0].attn.v_lambda is None
    assert all(float(b.attn.v_lambda) == 0.5 for b in model.blocks[1:])
