"""The digits split and the resumable batch stream."""

import numpy as np
import pytest
import torch

from srdit.data import BatchStream, balanced_labels, load_digits_split, random_labels
from srdit.data import digits as D


def test_split_shapes_range_and_dtypes():
    s = load_digits_split()
    assert s.train_x.shape == (1438, 1, 8, 8) and s.test_x.shape == (359, 1, 8, 8)
    assert s.train_x.dtype == s.test_x.dtype == torch.float32
    assert s.train_y.dtype == s.test_y.dtype == torch.int64
    both = torch.cat([s.train_x, s.test_x])
    assert both.min() == -1.0 and both.max() == 1.0
    # Values are the 17 levels 0..16 mapped linearly onto [-1, 1].
    levels = torch.unique(both)
    assert len(levels) == 17 and torch.allclose(levels, torch.arange(17) / 8.0 - 1.0)


def test_the_digits_are_scikit_learns_bit_for_bit_and_read_without_importing_it(monkeypatch):
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = D._raw_digits()
    assert x.tobytes() == ((d.images.astype(np.float32) / 8.0 - 1.0)[:, None]).tobytes()
    assert np.array_equal(y, d.target) and y.dtype == np.int64
    # where the file is not at its usual place, the same table through load_digits
    monkeypatch.setattr(D, "digits_file", lambda: None)
    assert np.array_equal(D.digits_table(), np.column_stack([d.data, d.target]))
    # a process that loads the digits does not pay for importing scikit-learn
    code = "import sys; from srdit.data import load_digits_split; load_digits_split(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_split_is_a_stratified_partition():
    _, y = D._raw_digits()
    tr, te = D._split_indices(y, D.TEST_FRACTION, D.SPLIT_SEED)
    assert len(np.intersect1d(tr, te)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(y)))
    s = load_digits_split()
    per_class = np.bincount(y, minlength=10)
    test_counts = s.test_y.bincount(minlength=10).numpy()
    assert np.all(np.abs(test_counts - per_class * D.TEST_FRACTION) <= 0.5 + 1e-9)
    assert np.array_equal(s.train_y.bincount(minlength=10).numpy() + test_counts, per_class)


def test_split_is_fixed_and_independent_of_global_seed():
    torch.manual_seed(1)
    a = load_digits_split()
    torch.manual_seed(2)
    b = load_digits_split()
    for f in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    a.train_x.zero_()  # callers get fresh tensors: mutating one result must not leak into the next
    assert load_digits_split().train_x.abs().sum() > 0
    other = load_digits_split(seed=D.SPLIT_SEED + 1)
    assert not torch.equal(other.test_y, b.test_y) or not torch.equal(other.test_x, b.test_x)


def test_stream_epochs_are_permutations_and_batches_span_epochs():
    s = BatchStream(10, 4, seed=3)
    flat = torch.cat([s.next_indices() for _ in range(5)])  # 20 indices = exactly two epochs
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])  # a new permutation each epoch
    big = BatchStream(3, 7, seed=0).next_indices()  # batch larger than the dataset
    assert len(big) == 7 and sorted(big[:6].tolist()) == [0, 0, 1, 1, 2, 2]


def test_stream_resume_reproduces_the_same_batches(tmp_path):
    ref = BatchStream(37, 5, seed=11)
    expected = [ref.next_indices() for _ in range(60)]
    s = BatchStream(37, 5, seed=11)
    for _ in range(17):
        s.next_indices()
    torch.save({"stream": s.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["stream"]
    resumed = BatchStream(37, 5, seed=11)
    resumed.load_state_dict(state)
    for i in range(17, 60):
        assert torch.equal(resumed.next_indices(), expected[i])


def test_stream_seed_matters_and_mismatched_state_is_refused():
    a, b = BatchStream(50, 8, seed=0), BatchStream(50, 8, seed=1)
    assert not torch.equal(a.next_indices(), b.next_indices())
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(50, 16, seed=0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError):
        BatchStream(0, 8)


def test_label_helpers():
    lab = balanced_labels(23, 10)
    assert lab.dtype == torch.int64 and lab.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert lab.bincount().max() - lab.bincount().min() <= 1
    r1 = random_labels(1000, 10, torch.Generator().manual_seed(5))
    r2 = random_labels(1000, 10, torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2) and r1.dtype == torch.int64
    assert r1.min() >= 0 and r1.max() <= 9 and len(r1.unique()) == 10
