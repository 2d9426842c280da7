"""Tokenizers from local files: the in-project INVAE (strict state-dict loading, SR-DiT's 0.3099 scale) and SD-VAE
through diffusers' AutoencoderKL. Tiny random stand-ins, built here; no network."""

from __future__ import annotations

import pytest
import torch

from srdit.encoders import Tokenizer, load_tokenizer
from srdit.encoders.invae import INVAE_SCALE, InvaeAutoencoder, InvaeConfig, TokenizerLoadError, load_invae, save_invae

TINY = InvaeConfig(ch=8, num_res_blocks=1, norm_groups=4)  # SR-DiT's f16 / 32-channel layout, narrow


def _images(n=2, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tiny_invae_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = InvaeAutoencoder(TINY)
    folder = tmp_path_factory.mktemp("invae")
    save_invae(model, folder)
    return folder, model


def test_invae_architecture_matches_the_ldm_layout():
    # The full SR-DiT VAE_F16D32, built without memory: f16, 32 channels, attention at the deepest level and in
    # the middle, LDM parameter names (so the published e2e-invae-400k.pt loads strictly).
    with torch.device("meta"):
        full = InvaeAutoencoder()
    keys = set(full.state_dict())
    assert full.cfg.downsample == 16 and full.cfg.z_channels == 32
    for k in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.4.attn.1.proj_out.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up.4.attn.2.k.weight",
        "decoder.up.0.block.2.norm1.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.mid.block_2.conv1.weight",
    ):
        assert k in keys, k
    assert "encoder.down.4.downsample.conv.weight" not in keys and "decoder.up.0.upsample.conv.weight" not in keys
    assert "encoder.down.3.attn.0.q.weight" not in keys
    assert tuple(full.state_dict()["encoder.conv_out.weight"].shape) == (64, 512, 3, 3)  # mean + logvar
    n = sum(p.numel() for p in full.parameters())
    assert 60e6 < n < 90e6


def test_invae_round_trip_and_scale(tiny_invae_dir):
    folder, model = tiny_invae_dir
    tok = load_invae(folder)
    assert isinstance(tok, Tokenizer)
    assert (tok.channels, tok.downsample, tok.scale, tok.bias) == (32, 16, INVAE_SCALE, 0.0)
    x = _images()
    with torch.no_grad():
        mean, logvar = model.moments(x)
    z = tok.encode(x, sample=False)
    assert z.shape == (2, 32, 4, 4)
    torch.testing.assert_close(z, mean * INVAE_SCALE)  # strict reload reproduces the saved model exactly
    noise = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(3))
    zs = tok.encode(x, sample=True, noise=noise)
    torch.testing.assert_close(zs, (mean + torch.exp(0.5 * logvar) * noise) * INVAE_SCALE)
    # a generator-drawn sample is reproducible and differs from the mean
    a = tok.encode(x, generator=torch.Generator().manual_seed(5))
    b = tok.encode(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, z)
    y = tok.decode(z)
    with torch.no_grad():
        ref = model.decode_latent(mean)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # decode undoes the scale (up to float rounding)
    assert load_tokenizer("invae", str(folder)).channels == 32


def test_invae_loader_messages(tiny_invae_dir, tmp_path):
    folder, model = tiny_invae_dir
    with pytest.raises(FileNotFoundError, match="e2e-invae-400k.pt"):
        load_invae(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no weights file.*e2e-invae-400k.pt"):
        load_invae(tmp_path)
    # a wider architecture than the weights: shape mismatches are named
    with pytest.raises(TokenizerLoadError, match="another shape"):
        load_invae(folder / "invae.pt", config=InvaeConfig(ch=16, num_res_blocks=1, norm_groups=4))
    # missing keys are named
    sd = model.state_dict()
    sd.pop("quant_conv.weight")
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(TokenizerLoadError, match=r"1 missing \(e\.g\. quant_conv\.weight\)"):
        load_invae(tmp_path / "broken.pt", config=TINY)
    # a wrapped checkpoint ({"model": state_dict}) with DDP prefixes loads
    torch.save(
        {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 400000}, tmp_path / "wrapped.pt"
    )
    tok = load_invae(tmp_path / "wrapped.pt", config=TINY)
    x = _images(1)
    torch.testing.assert_close(tok.encode(x, sample=False), load_invae(folder).encode(x, sample=False))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TokenizerLoadError, match="not a readable weights file"):
        load_invae(tmp_path / "junk.pt", config=TINY)


# ------------------------------------------------------------------------------------------------------------
# SD-VAE through diffusers
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdvae_dir(tmp_path_factory):
    import diffusers  # a dev dependency (the SD-VAE path)

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    root = tmp_path_factory.mktemp("sdvae")
    vae.save_pretrained(root / "pipeline" / "vae")
    return root / "pipeline", vae.eval()


def test_sdvae_from_local_folder(tiny_sdvae_dir):
    from srdit.encoders.sdvae import load_sdvae

    folder, vae = tiny_sdvae_dir
    tok = load_sdvae(folder)  # a pipeline folder: the vae/ sub-folder is found
    assert isinstance(tok, Tokenizer)
    assert (tok.channels, tok.downsample, tok.scale, tok.bias) == (4, 4, 0.18215, 0.0)
    x = _images(2, 32)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    z = tok.encode(x, sample=False)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, dist.mean * 0.18215)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tok.encode(x, noise=noise), (dist.mean + dist.std * noise) * 0.18215)
    with torch.no_grad():
        ref = vae.decode(dist.mean).sample
    torch.testing.assert_close(tok.decode(z), ref)


def test_sdvae_missing_files(tiny_sdvae_dir, tmp_path):
    from srdit.encoders.sdvae import load_sdvae

    with pytest.raises(FileNotFoundError, match="no such folder.*sd-vae-ft-ema"):
        load_sdvae(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sdvae(tmp_path)
    folder, _ = tiny_sdvae_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "vae" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_sdvae(bare)
