"""Frozen teachers for representation alignment (REPA patch tokens, REG class token) and the image tokenizers."""

from __future__ import annotations

import torch

from srdit.config import TOKENIZER_NAMES
from srdit.encoders.base import Teacher, Tokenizer
from srdit.encoders.digits import DigitsMetricNet, DigitsTeacher, load_digits_metric_net, load_digits_teacher
from srdit.encoders.dinov2 import DINOV2_NAMES

TEACHERS = ("digits-cnn",) + DINOV2_NAMES
TOKENIZERS = TOKENIZER_NAMES  # names as plain data in the config layer (validated there without torch)


def load_teacher(name: str, path: str | None = None, device: str | torch.device = "cpu") -> Teacher:
    """The teacher named by `data.teacher`: `digits-cnn` (built in-project, cached) or a DINOv2 name loaded from the
    local files under `path` (`data.teacher_path`; layout in `srdit.encoders.dinov2`)."""
    if name == "digits-cnn":
        return load_digits_teacher(device)
    if name in DINOV2_NAMES:
        from srdit.encoders.dinov2 import load_dinov2_teacher

        return load_dinov2_teacher(name, path, device)
    raise ValueError(f"unknown teacher {name!r}; allowed: {', '.join(TEACHERS)}")


def load_tokenizer(name: str, path: str, device: str | torch.device = "cpu") -> Tokenizer:
    """An image tokenizer from local files: `invae` (weights file or folder) or `sdvae` (a diffusers folder)."""
    if name == "invae":
        from srdit.encoders.invae import load_invae

        return load_invae(path, device)
    if name == "sdvae":
        from srdit.encoders.sdvae import load_sdvae

        return load_sdvae(path, device)
    raise ValueError(f"unknown tokenizer {name!r}; allowed: {', '.join(TOKENIZERS)}")


__all__ = [
    "Teacher",
    "TEACHERS",
    "TOKENIZERS",
    "Tokenizer",
    "DigitsTeacher",
    "DigitsMetricNet",
    "load_teacher",
    "load_tokenizer",
    "load_digits_teacher",
    "load_digits_metric_net",
]
