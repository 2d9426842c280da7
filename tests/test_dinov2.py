"""The DINOv2 teacher from local files: a tiny DINOv2-shaped ViT in a temporary "repository" (hubconf.py), built
with torch.hub.load(source="local"), its weights saved and strictly reloaded; the REPA / REG outputs through the
Teacher protocol; clear messages for missing files; the on-disk feature cache."""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pytest
import torch

from srdit.encoders import Teacher, load_teacher
from srdit.encoders.dinov2 import (
    DINOV2_NAMES,
    DinoV2Teacher,
    FeatureCache,
    TeacherLoadError,
    load_dinov2,
    precompute_features,
    resample_pos_embed,
)

# A miniature of DINOv2's hub backbone: patch 14, a 37 x 37 pretraining grid (518 px), a class token, optional
# register tokens, run-time position interpolation, and forward_features() with DINOv2's output keys.
HUBCONF = textwrap.dedent("""
    import math
    import torch
    import torch.nn.functional as F
    from torch import nn

    dependencies = ["torch"]


    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))


    class TinyDinoVisionTransformer(nn.Module):
        def __init__(self, embed_dim=32, depth=2, heads=2, num_register_tokens=0, img_size=518, patch_size=14):
            super().__init__()
            self.embed_dim, self.patch_size, self.num_register_tokens = embed_dim, patch_size, num_register_tokens
            n = img_size // patch_size
            self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
            self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + n * n, embed_dim) * 0.02)
            self.register_tokens = (nn.Parameter(torch.randn(1, num_register_tokens, embed_dim) * 0.02)
                                    if num_register_tokens else None)
            self.blocks = nn.ModuleList(Block(embed_dim, heads) for _ in range(depth))
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        def interpolate_pos_encoding(self, x, w, h):
            npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
            if npatch == n and w == h:
                return self.pos_embed
            m = int(math.sqrt(n))
            grid = self.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h // self.patch_size, w // self.patch_size), mode="bicubic")
            return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

        def forward_features(self, x, masks=None):
            b, _, h, w = x.shape
            if h % self.patch_size or w % self.patch_size:
                raise AssertionError(f"Input image height {h} is not a multiple of patch height {self.patch_size}")
            t = self.patch_embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
            t = t + self.interpolate_pos_encoding(t, w, h)
            if self.register_tokens is not None:
                t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], dim=1)
            for blk in self.blocks:
                t = blk(t)
            n = self.norm(t)
            r = 1 + self.num_register_tokens
            return {"x_norm_clstoken": n[:, 0], "x_norm_regtokens": n[:, 1:r], "x_norm_patchtokens": n[:, r:],
                    "x_prenorm": t, "masks": masks}

        def forward(self, x):
            return self.forward_features(x)["x_norm_clstoken"]


    def dinov2_vits14(pretrained=False, **kwargs):
        assert not pretrained, "this test repository has no downloadable weights"
        return TinyDinoVisionTransformer(**kwargs)


    def dinov2_vits14_reg(pretrained=False, **kwargs):
        assert not pretrained
        return TinyDinoVisionTransformer(num_register_tokens=4, **kwargs)
""")


@pytest.fixture(scope="module")
def dino_root(tmp_path_factory):
    """teacher_path layout: <root>/dinov2/hubconf.py (the repo checkout) + <root>/<name>_pretrain.pth."""
    root = tmp_path_factory.mktemp("dino")
    (root / "dinov2").mkdir()
    (root / "dinov2" / "hubconf.py").write_text(HUBCONF)
    torch.manual_seed(0)
    model = torch.hub.load(str(root / "dinov2"), "dinov2_vits14", source="local", pretrained=False)
    torch.save(model.state_dict(), root / "dinov2_vits14_pretrain.pth")
    reg = torch.hub.load(str(root / "dinov2"), "dinov2_vits14_reg", source="local", pretrained=False)
    torch.save(reg.state_dict(), root / "dinov2_vits14_reg4_pretrain.pth")  # the official _reg4_ file name
    return root, model.eval()


def _images(n=3, side=64, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_names():
    want = {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vitb14_reg"}
    assert want <= set(DINOV2_NAMES)


def test_teacher_outputs_repa_and_reg_tokens(dino_root):
    root, ref = dino_root
    teacher = load_teacher("dinov2_vits14", str(root))
    assert isinstance(teacher, DinoV2Teacher) and isinstance(teacher, Teacher) and teacher.dim == 32
    x = _images()
    patches, cls = teacher(x, 4)  # a 4 x 4 token grid: the image is resized to 56 px
    assert patches.shape == (3, 16, 32) and cls.shape == (3, 32)
    assert patches.dtype == torch.float32 and not patches.requires_grad
    # The reference: ImageNet normalisation, bicubic resize to 14 * grid, position embedding resampled once to the
    # grid (bicubic, anti-aliased), then DINOv2's normalised patch / class tokens. Strict reload = same weights.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xin = torch.nn.functional.interpolate(((x + 1) / 2 - mean) / std, size=(56, 56), mode="bicubic")
    native = ref.pos_embed.detach().clone()
    with torch.no_grad():
        ref.pos_embed.data = resample_pos_embed(native, 4)
        out = ref.forward_features(xin)
        ref.pos_embed.data = native
    torch.testing.assert_close(patches, out["x_norm_patchtokens"])
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    # uint8 crops (the stored shards) give the same tokens as the equivalent [-1, 1] floats
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    p8, c8 = teacher(u8, 4)
    p_f, c_f = teacher(u8.float() / 127.5 - 1, 4)
    torch.testing.assert_close(p8, p_f, rtol=1e-4, atol=1e-4)
    # another grid resamples again from the native 37 x 37 table (not from the previous grid)
    p2, _ = teacher(x, 2)
    assert p2.shape == (3, 4, 32)
    torch.testing.assert_close(teacher(x, 4)[0], patches)


def test_pos_embed_resampling():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], pos[:, 0])
    assert resample_pos_embed(pos, 37) is pos
    smooth = torch.linspace(0, 1, 37).repeat(37, 1).reshape(1, 37 * 37, 1)  # a ramp along x stays a ramp
    ramp = resample_pos_embed(torch.cat([torch.zeros(1, 1, 1), smooth], 1), 16)[0, 1:, 0].reshape(16, 16)
    assert (ramp[:, 1:] > ramp[:, :-1]).all() and torch.allclose(ramp[0], ramp[5])


def test_register_variant_and_strict_loading(dino_root, tmp_path):
    root, ref = dino_root
    reg = load_dinov2("dinov2_vits14_reg", root)
    assert reg.num_register_tokens == 4
    p, c = DinoV2Teacher(reg)(_images(2), 4)
    assert p.shape == (2, 16, 32)
    # missing key
    bad = tmp_path / "bad"
    (bad / "dinov2").mkdir(parents=True)
    (bad / "dinov2" / "hubconf.py").write_text(HUBCONF)
    sd = ref.state_dict()
    sd.pop("norm.weight")
    torch.save(sd, bad / "dinov2_vits14_pretrain.pth")
    with pytest.raises(TeacherLoadError, match=r"1 missing \(e\.g\. norm\.weight\)"):
        load_dinov2("dinov2_vits14", bad)
    # weights of another model (the register variant's extra tensor)
    torch.save(reg.state_dict(), bad / "dinov2_vits14_pretrain.pth")
    with pytest.raises(TeacherLoadError, match="unexpected.*register_tokens"):
        load_dinov2("dinov2_vits14", bad)
    # a hubconf without the entry point
    with pytest.raises(TeacherLoadError, match="cannot build it"):
        load_dinov2("dinov2_vitb14", _with_weights(tmp_path / "nob", "dinov2_vitb14_pretrain.pth"))


def _with_weights(root, name):
    root.mkdir()
    (root / "hubconf.py").write_text(HUBCONF)
    (root / name).write_bytes(b"")
    return root


def test_missing_files_give_clear_messages(dino_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="set data.teacher_path"):
        load_teacher("dinov2_vitb14", None)
    with pytest.raises(FileNotFoundError, match="hubconf.py.*git clone https://github.com/facebookresearch/dinov2"):
        load_teacher("dinov2_vitb14", str(tmp_path))
    (tmp_path / "hubconf.py").write_text(HUBCONF)
    with pytest.raises(
        FileNotFoundError,
        match=r"dinov2_vitb14_pretrain\.pth missing; download "
        r"https://dl\.fbaipublicfiles\.com/dinov2/dinov2_vitb14/",
    ):
        load_teacher("dinov2_vitb14", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"dinov2_vitl14_reg4_pretrain\.pth missing"):
        load_teacher("dinov2_vitl14_reg", str(tmp_path))
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("dinov3_vitb16", str(tmp_path))


def test_feature_cache(dino_root, tmp_path):
    root, _ = dino_root
    teacher = load_teacher("dinov2_vits14", str(root))
    x = _images(6)
    cache = FeatureCache(tmp_path / "cache", num_images=10, grid=4, dim=32, meta={"teacher": "dinov2_vits14"})
    want_p, want_c = teacher(x, 4)
    # rows 2, 7, 9 computed from their images and stored (fp16 on disk)
    p, c = cache.tokens(teacher, x[:3], [2, 7, 9], 4)
    torch.testing.assert_close(p, want_p[:3], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(c, want_c[:3], rtol=2e-3, atol=2e-3)
    assert cache.filled([2, 7, 9]).all() and not cache.filled([0, 1]).any()
    # a new process: cached rows need no images; a mixed batch computes only the missing rows
    again = FeatureCache(tmp_path / "cache", num_images=10, grid=4, dim=32, meta={"teacher": "dinov2_vits14"})
    p2, _ = again.tokens(teacher, None, [9, 2], 4)
    torch.testing.assert_close(p2, p[[2, 0]])
    p3, _ = again.tokens(teacher, x[3:5], [7, 0], 4)
    torch.testing.assert_close(p3[1], want_p[4], rtol=2e-3, atol=2e-3)
    with pytest.raises(KeyError, match="not filled|no images"):
        again.tokens(teacher, None, [5], 4)
    with pytest.raises(ValueError, match="differs in: grid"):
        FeatureCache(tmp_path / "cache", num_images=10, grid=2, dim=32, meta={"teacher": "dinov2_vits14"})


def _latent_folder(tmp_path, images: int, shard_size: int, seed: int) -> None:
    """tmp_path/lat: `images` random 40x48 images in 2 classes, 32 px crops kept, through a tiny random INVAE."""
    from PIL import Image

    from srdit.data.preprocess import preprocess
    from srdit.encoders.invae import InvaeAutoencoder, InvaeConfig, load_invae, save_invae

    rng = np.random.default_rng(seed)
    for i in range(images):
        d = tmp_path / "imgs" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    save_invae(InvaeAutoencoder(InvaeConfig(ch=8, num_res_blocks=1, norm_groups=4)), tmp_path / "vae")
    preprocess(
        tmp_path / "imgs",
        tmp_path / "lat",
        load_invae(tmp_path / "vae"),
        resolution=32,
        shard_size=shard_size,
        keep_images=True,
    )


def test_precompute_from_latent_folder(dino_root, tmp_path):

    from srdit.data.latents import LatentStream

    root, _ = dino_root
    _latent_folder(tmp_path, images=5, shard_size=2, seed=0)
    teacher = load_teacher("dinov2_vits14", str(root))
    cache = FeatureCache(tmp_path / "feat", num_images=5, grid=2, dim=32)
    assert precompute_features(tmp_path / "lat", teacher, cache, batch_size=2) == 5
    assert precompute_features(tmp_path / "lat", teacher, cache, batch_size=2) == 0  # all filled
    stream = LatentStream(tmp_path / "lat", batch_size=3, seed=0, images=True)
    _, _, crops = stream.next_batch()
    p, c = cache.tokens(teacher, None, stream.last_indices, 2)  # what a training step reads
    want_p, want_c = teacher(crops, 2)
    torch.testing.assert_close(p, want_p, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(c, want_c, rtol=2e-3, atol=2e-3)


def test_kd_dinov2_extractor(dino_root):
    from srdit.metrics import extract_features
    from srdit.metrics.dinov2_kd import LABEL, kd_dinov2, load_kd_extractor

    root, _ = dino_root
    ext = load_kd_extractor(root, "dinov2_vits14")
    real = _images(40, 32, seed=1)
    f_real = extract_features(real, ext, batch_size=16)
    assert f_real.shape == (40, 32)
    f_same = extract_features(_images(40, 32, seed=2), ext)
    f_far = extract_features(-real.abs(), ext)  # a different image distribution
    near = kd_dinov2(f_real, f_same, subsets=5, subset_size=20)
    far = kd_dinov2(f_real, f_far, subsets=5, subset_size=20)
    assert far["kd_dinov2"] > near["kd_dinov2"] and set(near) == {"kd_dinov2", "kd_dinov2_std"}
    assert "ViT-L/14" in LABEL


def test_trainer_reads_teacher_tokens_through_the_cache(dino_root, tmp_path):
    """data.teacher_cache: built once by `srdit cache-teacher`, the cache trains like the online teacher (float16
    storage), is only read (no row written, no crops read, no teacher loaded) and refuses a missing cache."""

    from srdit.commands.cache_teacher import main as cache_teacher
    from srdit.config import DataConfig, ModelConfig, RegConfig, RepaConfig, RunConfig, TrainConfig
    from srdit.techniques import with_techniques
    from srdit.train import LatentBatches, train

    root, _ = dino_root
    _latent_folder(tmp_path, images=6, shard_size=3, seed=1)
    base = RunConfig(
        model=ModelConfig(
            size="debug",
            patch_size=1,
            in_channels=32,
            input_size=2,
            num_classes=2,
            repa=RepaConfig(teacher_dim=32, depth=2),
            reg=RegConfig(dim=32),
        ),
        data=DataConfig(dataset="latents", path=str(tmp_path / "lat"), teacher="dinov2_vits14", teacher_path=str(root)),
        train=TrainConfig(steps=6, batch_size=3, log_every=1, ckpt_every=6, threads=1),
    )
    base = with_techniques(base, ["repa", "reg"])
    cached = dataclasses.replace(base, data=dataclasses.replace(base.data, teacher_cache=str(tmp_path / "feat")))

    def losses(cfg, out):
        rows = {}

        class Rec:
            def report(self, step, m):
                if "loss/repa" in m:
                    rows[step] = m["loss/repa"]

        assert train(cfg, out, Rec(), progress=False).status == "finished"
        return rows

    with pytest.raises(FileNotFoundError, match="srdit cache-teacher"):
        LatentBatches(cached, torch.device("cpu"))
    assert (
        cache_teacher(
            [
                str(tmp_path / "lat"),
                "--teacher",
                "dinov2_vits14",
                "--teacher-path",
                str(root),
                "--out",
                str(tmp_path / "feat"),
                "--ray",
                "2",
            ]
        )
        == 0
    )
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "feat").rglob("*.npy")}
    plain, first = losses(base, tmp_path / "a"), losses(cached, tmp_path / "b")
    assert plain.keys() == first.keys()
    for step in plain:
        assert first[step] == pytest.approx(plain[step], rel=1e-2, abs=1e-3)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "feat").rglob("*.npy")} == stamps  # read-only
    data = LatentBatches(cached, torch.device("cpu"))
    assert not data.stream.images and data.teacher is None  # the crops are not even read, no teacher loaded
    assert losses(cached, tmp_path / "c") == first
