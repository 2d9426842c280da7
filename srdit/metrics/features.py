"""Turning images into metric features with a frozen extractor."""

from __future__ import annotations

from typing import Callable, Protocol, Union, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class HasFeatures(Protocol):
    def features(self, images: Tensor) -> Tensor: ...


Extractor = Union[HasFeatures, Callable[[Tensor], Tensor]]


@torch.no_grad()
def extract_features(images: Tensor, extractor: Extractor, batch_size: int = 512) -> Tensor:
    """Features [N, F] (float64, CPU) of `images` ([N, ...] in [-1, 1]), computed in batches on the extractor's
    device (the images are moved there batch by batch)."""
    fn = extractor.features if isinstance(extractor, HasFeatures) else extractor
    device = _device_of(extractor)
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
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
