"""ImageNet-style image folders: a deterministic scan and the ADM center crop.

A folder holds one sub-folder per class (`root/<class>/**/<image>.{jpg,jpeg,png}`), as in the ImageNet train set.
Classes are the sorted sub-folder names (label = position); files are sorted within each class, so the image
index of every file is a pure function of the folder's contents. The same index keys the latent shards, the raw
crops and the teacher-feature cache.

The crop is the one of ADM (Dhariwal & Nichol 2021, "center-crop-dhariwal"), which SR-DiT uses for its INVAE
latents (arXiv:2512.12386, section 1.2; no flip augmentation): halve the image with a box filter while its short
side is at least twice the target, resize the short side to the target with bicubic filtering, then cut the
central square.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srdit.config import input_file_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of matplotlib and of the imagenet extra
        raise ImportError(
            "decoding images needs Pillow: pip install 'srdit[imagenet]' (or pip install pillow)"
        ) from None
    return Image


@dataclass(frozen=True)
class ImageFolder:
    """The sorted contents of an ImageNet-style folder."""

    root: Path
    classes: tuple[str, ...]
    "Class (sub-folder) names; the label of a class is its position."
    files: tuple[str, ...]
    "Image paths relative to `root` (POSIX separators), sorted by class then path."
    labels: np.ndarray
    "int64 [N], the label of every file."

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def fingerprint(self) -> str:
        """sha256 of the class list and file list (what decides every image index)."""
        h = hashlib.sha256()
        for c in self.classes:
            h.update(b"c\0" + c.encode() + b"\0")
        for f in self.files:
            h.update(b"f\0" + f.encode() + b"\0")
        return h.hexdigest()


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List the classes and images of `root`. Raises FileNotFoundError / ValueError with a one-line reason."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder (expected one sub-folder of images per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders; expected root/<class>/<image>.jpg as in ImageNet's train set")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(Path(dirpath, fn).relative_to(root).as_posix())
        found.sort()
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root}: no images (.jpg, .jpeg, .png) in its {len(classes)} class folders")
    return ImageFolder(root, tuple(classes), tuple(files), np.asarray(labels, dtype=np.int64))


def center_crop_adm(image, size: int) -> np.ndarray:
    """ADM center crop of a PIL image to `size` x `size`; uint8 [size, size, 3] RGB."""
    Image = _pil()
    image = image.convert("RGB")
    # Box-filter halvings first: cheap, and they avoid aliasing of one large bicubic down-scale.
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(
        (round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.Resampling.BICUBIC
    )
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def load_crop(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image file and ADM-center-crop it: uint8 [3, size, size] (channels first, as the trainer wants).
    ValueError naming the file when it cannot be decoded or is no regular file of a sane size (a FIFO among the
    images would block the decoder for ever: `srdit.config.input_file_problem`)."""
    problem = input_file_problem(path)
    if problem:
        raise ValueError(problem)
    Image = _pil()
    try:
        with Image.open(path) as im:
            arr = center_crop_adm(im, size)
    except OSError as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None
    return arr.transpose(2, 0, 1).copy()


def to_unit_range(images_uint8) -> torch.Tensor:
    """uint8 [B, 3, H, W] (numpy or torch) -> float32 in [-1, 1], the range of the tokenizers and teachers."""
    x = torch.as_tensor(images_uint8)
    return x.float().div_(127.5).sub_(1.0)
