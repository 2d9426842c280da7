"""Turning images into metric features with a frozen extractor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class HasFeatures(Protocol):
    def features(self, images: Tensor) -> Tensor: ...


Extractor = HasFeatures | Callable[[Tensor], Tensor]


@contextlib.contextmanager
def exact_float32():
    """Full float32 matmuls and convolutions inside the block: the trainer turns TF32 on for CUDA, and metric
    features computed during training must equal those of `srdit evaluate` and `srdit reference`."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn.flags(
            enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@torch.no_grad()
def extract_features(images: Tensor, extractor: Extractor, batch_size: int = 512) -> Tensor:
    """Features [N, F] (float64, CPU) of `images` ([N, ...] in [-1, 1]), computed in batches on the extractor's
    device (the images are moved there batch by batch)."""
    fn = extractor.features if isinstance(extractor, HasFeatures) else extractor
    device = _device_of(extractor)
    out = []
    with exact_float32():
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            out.append(fn(batch.to(device) if device is not None else batch).to("cpu", torch.float64))
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


def _device_of(extractor: object) -> torch.device | None:
    if isinstance(extractor, torch.nn.Module):
        for p in extractor.parameters():
            return p.device
        for b in extractor.buffers():
            return b.device
    return None
