"""The contracts the encoders implement: the teacher interface (the in-project digits encoder and the DINOv2
encoders used on ImageNet) and the image tokenizer interface (INVAE, SD-VAE), with the helpers every tokenizer
shares (posterior sampling, strict weight loading)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Teacher(Protocol):
    """A frozen representation network used as the REPA / REG target.

    Calling it runs without gradients and never changes its weights.
    """

    dim: int
    "Width of the patch tokens and of the class token."

    def __call__(self, images: Tensor, grid: int) -> tuple[Tensor, Tensor]:
        """Encode `images` ([B, C, H, W] in [-1, 1], pixel space) into
        (patch tokens [B, grid*grid, dim] in row-major order, class token [B, dim]),
        where `grid` is the diffusion model's token grid side so that token i of both models covers the same
        image region."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """Images <-> model latents. Model latents are `scale * latent + bias`, the tensors the diffusion model sees."""

    name: str
    channels: int
    "Latent channels (INVAE 32, SD-VAE 4)."
    downsample: int
    "Spatial down-sampling factor (INVAE 16, SD-VAE 8)."
    scale: float
    bias: float

    def encode(
        self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> scaled latents [B, channels, H/down, W/down]. With `sample`, one draw
        from the posterior (mean + std * eps; eps = `noise` if given, else drawn from `generator`), else the mean."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images [B, 3, H, W] (nominally in [-1, 1]; not clamped)."""
        ...


class TokenizerLoadError(ValueError):
    """Weights that do not fit the tokenizer's architecture (a key or shape mismatch)."""


def posterior_sample(
    mean: Tensor, logvar: Tensor, sample: bool, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """A draw of the diagonal Gaussian posterior (log-variance clamped to [-30, 20] as in LDM), or its mean."""
    if not sample:
        return mean
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if noise is None:
        noise = torch.randn(
            mean.shape, generator=generator, device=generator.device if generator else mean.device, dtype=mean.dtype
        )
    if noise.shape != mean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the posterior {tuple(mean.shape)}")
    return mean + std * noise.to(mean.device, mean.dtype)


def load_state_dict_strict(
    model: nn.Module, state: dict[str, Tensor], source: str, hint: str, error: type[Exception] = TokenizerLoadError
) -> None:
    """`load_state_dict(strict=True)` with a one-line message naming the mismatched keys / shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {'; '.join(shapes[:2])})")
        raise error(f"{source}: weights do not match the architecture: {'; '.join(parts)}; {hint}")
    model.load_state_dict(state, strict=True)
