"""The teacher interface shared by the in-project digits encoder and the DINOv2 encoders used on ImageNet."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


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
