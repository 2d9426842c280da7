"""Frozen teachers for representation alignment (REPA patch tokens, REG class token)."""

from __future__ import annotations

import torch

from srdit.encoders.base import Teacher
from srdit.encoders.digits import DigitsMetricNet, DigitsTeacher, load_digits_metric_net, load_digits_teacher

TEACHERS = ("digits-cnn",)


def load_teacher(name: str, path: str | None = None, device: str | torch.device = "cpu") -> Teacher:
    """The teacher named by `data.teacher`: `digits-cnn` (built in-project, cached) or a DINOv2 name."""
    if name == "digits-cnn":
        return load_digits_teacher(device)
    if name.lower().startswith("dinov2"):
        raise NotImplementedError(
            f"teacher {name!r}: the ImageNet DINOv2 teacher loads from local files (a repo checkout plus "
            f"<name>_pretrain.pth, path={path!r}) and is not available in this version yet; "
            f"use data.teacher: digits-cnn")
    raise ValueError(f"unknown teacher {name!r}; allowed: {', '.join(TEACHERS)} or a dinov2_* name")


__all__ = ["Teacher", "TEACHERS", "DigitsTeacher", "DigitsMetricNet", "load_teacher", "load_digits_teacher",
           "load_digits_metric_net"]
