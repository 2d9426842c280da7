"""The SD-VAE tokenizer (Rombach et al. 2022; the f8 / 4-channel latent space of DiT, SiT and REPA) from a local
folder, through diffusers' `AutoencoderKL`.

The folder is what `AutoencoderKL.save_pretrained` writes and what the `stabilityai/sd-vae-ft-ema` repo holds:
`config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`). A pipeline folder with a `vae/` sub-folder works
too. Nothing is downloaded: loading uses `local_files_only=True`.
Model latents are `scaling_factor * (latent - shift_factor)` from the folder's config (0.18215 and no shift for SD-VAE).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from srdit.encoders.base import TokenizerLoadError, posterior_sample

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _diffusers_autoencoder():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError(
            "the SD-VAE tokenizer needs diffusers: pip install 'srdit[imagenet]' (or pip install diffusers)"
        ) from None
    return AutoencoderKL


class SDVAETokenizer:
    """`Tokenizer` over a diffusers `AutoencoderKL` (frozen, eval mode)."""

    name = "sdvae"

    def __init__(self, vae, source: str = ""):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None) or 0.0
        self.bias = -float(shift) * self.scale  # scale * (latent - shift) = scale * latent + bias
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(
        self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        dist = self.vae.encode(images.to(self.device, torch.float32)).latent_dist
        return posterior_sample(dist.mean, dist.logvar, sample, generator, noise) * self.scale + self.bias

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode((latents.to(self.device, torch.float32) - self.bias) / self.scale).sample

    def describe(self) -> dict:
        cfg = self.vae.config
        return {
            "name": self.name,
            "channels": self.channels,
            "downsample": self.downsample,
            "scale": self.scale,
            "bias": self.bias,
            "config": {
                "block_out_channels": list(cfg.block_out_channels),
                "latent_channels": int(cfg.latent_channels),
                "layers_per_block": int(cfg.layers_per_block),
            },
        }


def sdvae_folder(path: str | os.PathLike) -> Path:
    """The folder holding config.json + weights (`path` itself or its `vae/` sub-folder); clear errors otherwise."""
    path = Path(path)
    how = (
        "save the `stabilityai/sd-vae-ft-ema` (or -mse) repo files there on a machine with network access, or "
        "`AutoencoderKL.from_pretrained(...).save_pretrained(DIR)`"
    )
    if not path.is_dir():
        raise FileNotFoundError(f"SD-VAE folder {path}: no such folder; {how}")
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            if not any((folder / w).is_file() for w in WEIGHT_FILES):
                raise FileNotFoundError(
                    f"SD-VAE folder {folder}: config.json but no {WEIGHT_FILES[0]} (or {WEIGHT_FILES[1]}); {how}"
                )
            return folder
    raise FileNotFoundError(f"SD-VAE folder {path}: no config.json (nor vae/config.json); {how}")


def load_sdvae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SDVAETokenizer:
    """SD-VAE from a local diffusers folder (no network)."""
    folder = sdvae_folder(path)
    AutoencoderKL = _diffusers_autoencoder()
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise TokenizerLoadError(f"SD-VAE folder {folder}: cannot load it ({str(e).splitlines()[0][:200]})") from None
    return SDVAETokenizer(vae.to(device), source=str(folder))
