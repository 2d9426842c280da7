"""Training data: the embedded digits default (pixel space) and its deterministic batch sampler."""

from srdit.data.digits import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    BatchStream,
    DigitsSplit,
    balanced_labels,
    load_digits_split,
    random_labels,
)

__all__ = [
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "BatchStream",
    "DigitsSplit",
    "balanced_labels",
    "load_digits_split",
    "random_labels",
]
