"""Sample grids as PNG (a small zlib encoder, so no imaging library is needed) and .npz."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 image [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] on a black background."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[
            i
        ]
    return grid


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write uint8 [H, W] or [H, W, 1|3] as PNG, atomically."""
    img = np.ascontiguousarray(image if image.ndim == 3 else image[..., None])
    h, w, c = img.shape
    if c not in (1, 3):
        raise ValueError(f"write_png: expected 1 or 3 channels, got {c}")
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def save_samples(
    images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, nrow: int = 10, max_grid: int = 100, scale: int = 4
) -> tuple[Path, Path]:
    """samples.png (first `max_grid` images, `nrow` per row) and samples.npz (all images as uint8, labels)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(images)
    png = write_png(make_grid(u8[:max_grid], nrow=nrow, scale=scale), out_dir / "samples.png")
    npz = out_dir / "samples.npz"
    tmp = out_dir / "samples.tmp.npz"
    np.savez_compressed(tmp, images=u8, labels=labels.cpu().numpy())
    os.replace(tmp, npz)
    return png, npz
