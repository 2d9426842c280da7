"""The INVAE tokenizer (SR-DiT's E2E-INVAE, arXiv:2512.12386 section 1.2); the `Tokenizer` interface it implements
is in `srdit.encoders.base`.

INVAE is an LDM-style KL autoencoder (Rombach et al. 2022) with a 16x down-sampling and 32 latent channels
(channel multipliers [1, 1, 2, 2, 4]): 256 px -> 32 x 16 x 16, 512 px -> 32 x 32 x 32. SR-DiT uses the REPA-E
end-to-end tuned weights (`e2e-invae-400k.pt`, Leng et al. 2025) and feeds the model z = 0.3099 * latent (bias 0)
for all channels.

The module below is written for this project; its parameter names follow the LDM layout (encoder.down.{i}.block.{j},
mid.block_1 / attn_1 / block_2, quant_conv, post_quant_conv, ...) so that the published state dict loads strictly.
Widths, depth and attention placement are configurable so tests can build a tiny one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srdit.cache import load_torch
from srdit.encoders.base import TokenizerLoadError, load_state_dict_strict, posterior_sample

INVAE_SCALE = 0.3099
"SR-DiT's latent scale for E2E-INVAE (all 32 channels)."
INVAE_BIAS = 0.0
INVAE_WEIGHTS = "e2e-invae-400k.pt"
"File name of the REPA-E release (HF repo REPA-E/e2e-invae)."
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvaeConfig:
    """Architecture of the KL autoencoder. Defaults: SR-DiT's VAE_F16D32 (about 70M parameters)."""

    ch: int = 128
    "Base width; level i has ch * ch_mult[i] channels."
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    "Width multipliers per level; len - 1 halvings (f16 for five levels)."
    num_res_blocks: int = 2
    "ResNet blocks per encoder level (the decoder has one more per level)."
    z_channels: int = 32
    "Latent channels."
    attn_levels: tuple[int, ...] | None = None
    "Levels with self-attention after each ResNet block; None = the deepest level only (LDM's 16 px at 256 px)."
    mid_attn: bool = True
    "Self-attention between the two middle ResNet blocks."
    norm_groups: int = 32
    "GroupNorm groups (must divide every width)."
    in_channels: int = 3
    out_channels: int = 3

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def levels_with_attention(self) -> tuple[int, ...]:
        return (len(self.ch_mult) - 1,) if self.attn_levels is None else tuple(self.attn_levels)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 shortcut when the width changes (no time embedding in a VAE)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class SelfAttention(nn.Module):
    """Single-head attention over all pixels with 1x1-conv projections and a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only before the stride-2 conv


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, cfg: InvaeConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResBlock(c, c, cfg.norm_groups)
    if cfg.mid_attn:
        mid.attn_1 = SelfAttention(c, cfg.norm_groups)
    mid.block_2 = ResBlock(c, c, cfg.norm_groups)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    h = mid.block_1(h)
    if hasattr(mid, "attn_1"):
        h = mid.attn_1(h)
    return mid.block_2(h)


class Encoder(nn.Module):
    def __init__(self, cfg: InvaeConfig):
        super().__init__()
        attn = cfg.levels_with_attention()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResBlock(c, cfg.ch * mult, cfg.norm_groups))
                c = cfg.ch * mult
                if level in attn:
                    stage.attn.append(SelfAttention(c, cfg.norm_groups))
            if level < len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(c)
            self.down.append(stage)
        self.mid = _mid(c, cfg)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: InvaeConfig):
        super().__init__()
        attn = cfg.levels_with_attention()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg)
        stages: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResBlock(c, cfg.ch * cfg.ch_mult[level], cfg.norm_groups))
                c = cfg.ch * cfg.ch_mult[level]
                if level in attn:
                    stage.attn.append(SelfAttention(c, cfg.norm_groups))
            if level > 0:
                stage.upsample = Upsample(c)
            stages.insert(0, stage)  # self.up[i] is level i, run from the deepest level up
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class InvaeAutoencoder(nn.Module):
    """KL autoencoder: encoder -> 1x1 quant_conv -> (mean, logvar); 1x1 post_quant_conv -> decoder."""

    def __init__(self, cfg: InvaeConfig = InvaeConfig()):
        super().__init__()
        for c in {cfg.ch * m for m in cfg.ch_mult}:
            if c % cfg.norm_groups:
                raise ValueError(f"InvaeConfig: norm_groups {cfg.norm_groups} does not divide width {c}")
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance of unscaled latents."""
        return self.quant_conv(self.encoder(images)).chunk(2, dim=1)

    def decode_latent(self, latent: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(latent))


# --------------------------------------------------------------------------------------------------------------
# Tokenizer wrapper and loading
# --------------------------------------------------------------------------------------------------------------


class InvaeTokenizer:
    """`Tokenizer` over an `InvaeAutoencoder` (frozen, eval mode)."""

    name = "invae"

    def __init__(self, model: InvaeAutoencoder, scale: float = INVAE_SCALE, bias: float = INVAE_BIAS, source: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.channels, self.downsample = model.cfg.z_channels, model.cfg.downsample
        self.scale, self.bias, self.source = float(scale), float(bias), source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(
        self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        mean, logvar = self.model.moments(images.to(self.device, torch.float32))
        return posterior_sample(mean, logvar, sample, generator, noise) * self.scale + self.bias

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.model.decode_latent((latents.to(self.device, torch.float32) - self.bias) / self.scale)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "channels": self.channels,
            "downsample": self.downsample,
            "scale": self.scale,
            "bias": self.bias,
            "config": dataclasses.asdict(self.model.cfg),
        }


def save_invae(model: InvaeAutoencoder, folder: str | os.PathLike, weights_name: str = "invae.pt") -> Path:
    """Write `config.json` + the state dict into `folder` (the layout `load_invae` reads). Returns the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=1))
    path = folder / weights_name
    torch.save(model.state_dict(), path)
    return path


def _config_from_json(path: Path) -> InvaeConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"{path}: unreadable INVAE config ({e})") from None
    names = {f.name for f in dataclasses.fields(InvaeConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TokenizerLoadError(f"{path}: unknown INVAE config keys {unknown}; allowed: {sorted(names)}")
    for k in ("ch_mult", "attn_levels"):
        if isinstance(data.get(k), list):
            data[k] = tuple(data[k])
    return InvaeConfig(**data)


def _find_weights(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"INVAE weights {path}: no such file or folder; download {INVAE_WEIGHTS} from the HF repo "
            f"REPA-E/e2e-invae on a machine with network access and copy it there (or pass the file itself)"
        )
    if (path / INVAE_WEIGHTS).is_file():
        return path / INVAE_WEIGHTS
    found = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".safetensors"))
    if len(found) == 1:
        return found[0]
    what = "no weights file" if not found else f"{len(found)} weight files ({', '.join(p.name for p in found)})"
    raise FileNotFoundError(
        f"INVAE folder {path}: {what}; put {INVAE_WEIGHTS} (from the HF repo REPA-E/e2e-invae) there, "
        f"or pass the weights file itself"
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = load_torch(path)
    except Exception as e:
        raise TokenizerLoadError(f"{path}: not a readable weights file ({str(e).splitlines()[0][:160]})") from None
    # Releases wrap the state dict in various ways; take the first nested dict of tensors.
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            wrappers = ("state_dict", "model", "ema", "vae", "module")
            inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        raise TokenizerLoadError(
            f"{path}: no state dict of tensors inside (top-level keys: "
            f"{list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})"
        )
    if not (isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise TokenizerLoadError(f"{path}: no state dict of tensors inside")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_invae(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    config: InvaeConfig | None = None,
    scale: float = INVAE_SCALE,
    bias: float = INVAE_BIAS,
) -> InvaeTokenizer:
    """INVAE from local files, loaded strictly. `path`: the weights file, or a folder holding it (and optionally a
    `config.json` with `InvaeConfig` fields; without one, and without `config`, the SR-DiT architecture)."""
    path = Path(path)
    weights = _find_weights(path)
    if config is None:
        cfg_file = (path if path.is_dir() else path.parent) / CONFIG_FILE
        config = _config_from_json(cfg_file) if cfg_file.is_file() else InvaeConfig()
    model = InvaeAutoencoder(config)
    load_state_dict_strict(
        model,
        _read_state_dict(weights),
        str(weights),
        "is it an INVAE (f16, 32 channels) checkpoint, and does config.json describe it?",
    )
    return InvaeTokenizer(model.to(device), scale, bias, source=str(weights))
