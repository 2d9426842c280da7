"""The embedded default dataset: scikit-learn's bundled 8x8 digits (1797 real images, 10 classes).

Images are float32 [N, 1, 8, 8] in [-1, 1] (pixel space, 0..16 scaled linearly); labels are int64. The train /
held-out split is stratified and fixed by `SPLIT_SEED`, independent of any run seed, so every run of every study
trains on the same images and is evaluated against the same held-out reference set.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from srdit.builtins.balanced_labels import balanced_labels  # noqa: F401  re-exported: the technique's module holds it
from srdit.config import digits_file

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
SPLIT_SEED = 20240917
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """Fixed train / held-out split of the digits."""

    train_x: Tensor
    "float32 [N_train, 1, 8, 8] in [-1, 1]."
    train_y: Tensor
    "int64 [N_train], 0..9."
    test_x: Tensor
    "float32 [N_test, 1, 8, 8] in [-1, 1]; the real reference set for metrics."
    test_y: Tensor
    "int64 [N_test]."


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    table = digits_table()
    x = table[:, :-1].reshape(-1, *IMAGE_SHAPE).astype(np.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    y = table[:, -1].astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def digits_table() -> np.ndarray:
    """scikit-learn's digits: float64 [1797, 65], the 64 pixels (0..16, row by row) then the label. Read from the
    file (`srdit.config.digits_file`) as `sklearn.datasets.load_digits` reads it, without importing scikit-learn;
    through `load_digits` where the file is not at its usual place."""
    path = digits_file()
    if path is not None:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return np.loadtxt(f, delimiter=",")
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.column_stack([d.data, d.target])


def _split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # torch.randperm on a CPU generator is stable across versions; per-class shuffles give a stratified split.
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(int(y.max()) + 1):
        idx = np.flatnonzero(y == c)
        perm = idx[torch.randperm(len(idx), generator=g).numpy()]
        n_test = int(round(len(idx) * test_fraction))
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_split(test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> DigitsSplit:
    """The stratified digits split (default ~80/20: 1438 train / 359 held-out). Returns fresh tensors."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _raw_digits()
    tr, te = _split_indices(y, test_fraction, seed)
    return DigitsSplit(
        train_x=torch.from_numpy(x[tr]),
        train_y=torch.from_numpy(y[tr]),
        test_x=torch.from_numpy(x[te]),
        test_y=torch.from_numpy(y[te]),
    )


def random_labels(n: int, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random labels (int64 [n]) drawn from `generator` (CPU)."""
    return torch.randint(0, num_classes, (n,), generator=generator, dtype=torch.int64)


class BatchStream:
    """Deterministic infinite stream of index batches over a dataset of size `n`.

    Each epoch is a permutation drawn from a generator seeded by (seed, epoch) only, so the stream's future is a
    pure function of its position (epoch, offset): saving that position and restoring it reproduces exactly the
    batches an uninterrupted run would have drawn. A batch that runs past the end of an epoch continues into the
    next epoch's permutation, so every sample is seen equally often and no sample is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.epoch = 0
        self.offset = 0
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            # Mix (seed, epoch) into one 63-bit seed; distinct pairs give distinct generator seeds in practice.
            s = (self.seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) & ((1 << 63) - 1)
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(s))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def next_indices(self) -> Tensor:
        """The next batch of indices (int64 [batch_size])."""
        parts, need = [], self.batch_size
        while need > 0:
            perm = self._permutation(self.epoch)
            take = min(need, self.n - self.offset)
            parts.append(perm[self.offset : self.offset + take])
            self.offset += take
            need -= take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def state_dict(self) -> dict:
        """Position and settings as plain ints (loadable with `torch.load(weights_only=True)`)."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict`; the settings must match (else the stream would differ)."""
        for k in ("n", "batch_size", "seed"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(
                    f"BatchStream state has {k}={state[k]} but this stream has {k}={getattr(self, k)}; "
                    f"resume with the settings the checkpoint was written with"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.n:
            raise ValueError(f"invalid BatchStream position epoch={epoch}, offset={offset} for n={self.n}")
        self.epoch, self.offset = epoch, offset
