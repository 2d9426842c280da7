"""ImageNet sample-quality metrics (FID, sFID, Inception Score, precision / recall) from local Inception weights.

The network is the "FID Inception": Inception-v3 as ported from TensorFlow's 2015-12-05 graph by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`), the graph that TF FID, ADM's evaluator and pytorch-fid all use. It is
written here (no torchvision, which cannot be installed beside the CPU torch) with torchvision's module names so
that the state dict of pytorch-fid's file loads strictly. It differs from torchvision's Inception-v3 in the ways
the TF graph does: a 1008-way classifier, no auxiliary head, 3x3 average pools that ignore the zero padding
(TF's AvgPool), and a max pool in Mixed_7c's pool branch.

Protocol (LABEL): images (uint8 [0, 255] or float [-1, 1]) are resized to 299x299 bilinearly (align_corners=False,
no antialias, as pytorch-fid) and mapped to [-1, 1]; FID uses the 2048-d global pool, sFID a 17x17 spatial slice of
an intermediate layer (as ADM), IS the 1008 bias-free logits, precision / recall (k=3) the pool features. The TF
graph that ADM's evaluator runs resizes with TF1's legacy (corner-aligned, not half-pixel) bilinear kernel and maps
[0, 255] by (x - 128) / 128, so numbers here match pytorch-fid's and are close to, not bit-equal with, ADM's.
Nothing here downloads anything.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srdit.cache import load_torch
from srdit.metrics.distances import _f64, _psd_sqrt, precision_recall
from srdit.metrics.features import exact_float32

LABEL = (
    "ImageNet FID/sFID/IS/precision-recall(k=3): pytorch-fid Inception-v3 (TF 2015-12-05 weights), "
    "299 bilinear resize, 50K samples vs the reference batch"
)
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
ENV_VAR = "SRDIT_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
NUM_CLASSES = 1008
# ADM's sFID feature is the TF node "mixed_6/conv:0", sliced to its first 7 channels. The TF graph numbers its
# eleven Inception blocks mixed, mixed_1 .. mixed_10 (= Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c), so our
# reading is that mixed_6 = Mixed_6d (torch-fidelity's TF->PyTorch weight map says the same: mixed_6/conv ->
# Mixed_6d.branch1x1), and "mixed_6/conv" (the scope's own name, not .../Conv2D or .../batchnorm) is the ReLU output
# of its 1x1 branch. Unverified against the TF graph here: check one image against ADM's evaluator where possible.
SPATIAL_BLOCK = "Mixed_6d"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
IS_SPLIT = 5000
"Samples per Inception Score split, as ADM's evaluator (its 50K protocol: 10 splits)."


class BasicConv2d(nn.Module):
    """conv (no bias) + BatchNorm (eps=1e-3, TF's) + ReLU; keys `conv.weight`, `bn.*` as torchvision's."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # TF's 3x3 SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _Mixed(nn.Module):
    """An Inception block: `branches(x)` lists the branch outputs (so that one of them can be read out), `forward`
    concatenates them along channels."""

    def branches(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionA(_Mixed):
    """35x35 block (Mixed_5b/5c/5d)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def branches(self, x: Tensor) -> list[Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ]


class InceptionB(_Mixed):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def branches(self, x: Tensor) -> list[Tensor]:
        return [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]


class InceptionC(_Mixed):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def branches(self, x: Tensor) -> list[Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_avg3(x))]


class InceptionD(_Mixed):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def branches(self, x: Tensor) -> list[Tensor]:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)]


class InceptionE(_Mixed):
    """8x8 block with split 1x3 / 3x1 convolutions (Mixed_7b: average pool; Mixed_7c: max pool, as the TF graph,
    not the paper, has it)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def branches(self, x: Tensor) -> list[Tensor]:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1),
            self.branch_pool(pooled),
        ]


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3. `forward(images)` -> {"pool": [B, 2048], "spatial": [B, 2023], "logits": [B, 1008]}
    (float32, on the network's device; logits without the fc bias, see forward); images [B, 3, H, W], uint8 in
    [0, 255] or float in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 [0, 255] or float [-1, 1] -> float32 [-1, 1] at 299x299 (bilinear, as pytorch-fid; the resize is
        linear, so mapping to [-1, 1] before or after it is the same)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.preprocess(images)
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        spatial = None
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ):
            parts = getattr(self, name).branches(x)
            if name == SPATIAL_BLOCK:
                # ADM slices the NHWC tensor ([..., :7]) and flattens it: keep its (h, w, c) order, so that our
                # mu_s / sigma_s line up with the ones in ADM's reference batches.
                s = parts[0][:, :SPATIAL_CHANNELS]
                spatial = s.permute(0, 2, 3, 1).reshape(len(s), -1)
            x = torch.cat(parts, 1)
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        assert spatial is not None
        # The Inception Score's logits leave out the classifier bias: the original implementation (improved-GAN),
        # ADM's evaluator and torch-fidelity ("logits_unbiased") all take softmax(pool_3 @ W) from the graph's
        # softmax/logits/MatMul weights only. fc.bias is kept for the state dict's layout.
        return {"pool": pool, "spatial": spatial, "logits": F.linear(pool, self.fc.weight)}


def _is_batch_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def resolve_weights(path: str | os.PathLike | None) -> Path:
    how = (
        f"download {WEIGHTS_NAME} ({WEIGHTS_URL}) on a machine with network access, copy it to this machine and "
        f"set eval.inception_path (or --inception), or set {ENV_VAR}"
    )
    if path is None or str(path) == "":
        path = os.environ.get(ENV_VAR) or None
        if path is None:
            raise FileNotFoundError(f"no Inception weights given (no path and {ENV_VAR} unset): {how}")
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"Inception weights {p} not found: {how}")
    return p


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception in eval mode from a local state dict (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`,
    or a folder holding it; None: `$SRDIT_INCEPTION_WEIGHTS`). Loads strictly: FileNotFoundError when the file is
    missing, ValueError when it is not this network's state dict. The file's BatchNorm layers carry no
    `num_batches_tracked` counters (unused in eval mode); they are accepted either way. Never downloads."""
    p = resolve_weights(path)
    try:
        state = load_torch(p)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{p}: not a loadable PyTorch state dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{p}: expected a state dict of tensors, got {type(state).__name__}")
    net = FIDInceptionV3()
    expected = {k: v for k, v in net.state_dict().items() if not _is_batch_counter(k)}  # 472 entries
    given = {k: v for k, v in state.items() if not _is_batch_counter(k)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k} {tuple(given[k].shape)}!={tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    if missing or unexpected or shapes:

        def few(items: list[str]) -> str:
            return ", ".join(items[:4]) + (", ..." if len(items) > 4 else "")

        raise ValueError(
            f"{p}: not the FID Inception state dict ({WEIGHTS_NAME}): {len(missing)} missing "
            f"[{few(missing)}], {len(unexpected)} unexpected [{few(unexpected)}], {len(shapes)} with "
            f"wrong shape [{few(shapes)}]"
        )
    own = net.state_dict()
    net.load_state_dict({k: state.get(k, own[k]) for k in own}, strict=True)  # absent counters keep their init
    return net.eval().requires_grad_(False).to(device)


def _batches(images: Tensor | np.ndarray | Iterable[Tensor | np.ndarray], batch_size: int) -> Iterable[Tensor]:
    def chunks(x: Tensor | np.ndarray) -> Iterable[Tensor]:
        if isinstance(x, np.ndarray):  # numpy images are channels-last, as in ADM's .npz files and save_samples
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"numpy images must be [N, H, W, 3], got shape {x.shape}")
            x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size]

    if isinstance(images, (Tensor, np.ndarray)):
        yield from chunks(images)
    else:
        for batch in images:
            yield from chunks(batch)


def inception_features(
    images: Tensor | np.ndarray | Iterable[Tensor | np.ndarray], net: FIDInceptionV3, batch_size: int = 100
) -> dict[str, np.ndarray]:
    """{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]} as float64 CPU arrays. `images`: a tensor
    [N, 3, H, W] (uint8 or [-1, 1] float), a numpy array [N, H, W, 3], or an iterable of such batches (e.g. a
    generator, so that 50K samples need not be held at once); they are fed `batch_size` at a time on the network's
    device. TF32 is switched off meanwhile (matmuls and convolutions): the features stay float32-exact on Ampere+
    GPUs, also inside a training run that enabled TF32."""
    device = next(net.parameters()).device
    out: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    with torch.inference_mode(), exact_float32():
        for batch in _batches(images, batch_size):
            feats = net(batch.to(device, non_blocking=True))
            for k, v in feats.items():
                out[k].append(v.to("cpu", torch.float64).numpy())
    if not out["pool"]:
        raise ValueError("no images to compute Inception features of")
    return {k: np.concatenate(v) for k, v in out.items()}


def inception_score(logits: np.ndarray | Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std over splits) of exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean prediction, softmax over all
    1008 logits; split boundaries i*N//splits as in the original (improved-GAN) implementation."""
    z = torch.as_tensor(
        np.asarray(logits, dtype=np.float64) if not isinstance(logits, Tensor) else logits, dtype=torch.float64
    ).cpu()
    if z.ndim != 2:
        raise ValueError(f"logits must be [N, classes], got shape {tuple(z.shape)}")
    n = len(z)
    if splits < 1 or n < splits:
        raise ValueError(f"need 1 <= splits <= N, got splits={splits}, N={n}")
    logp = torch.log_softmax(z, dim=1)
    scores = []
    for i in range(splits):
        part = logp[i * n // splits : (i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(len(part))  # log of the mean of p(y|x) over the split
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) from Gaussian statistics (e.g. a reference .npz), with the
    same symmetric trace-of-root as `srdit.metrics.distances.frechet_distance` (equal to it on the features)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    middle = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt, 0.0))


def _stats(feats: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = _f64(feats)
    if len(a) < 2:
        raise ValueError("need at least two samples for a covariance")
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


@dataclass(frozen=True)
class Reference:
    """Reference-set statistics: FID's (mu, sigma), sFID's (mu_s, sigma_s; None in FID-only files) and the pool
    features for precision / recall (None in ADM's files, which hold images instead)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None


def save_reference(
    path: str | os.PathLike,
    pool: np.ndarray | Tensor,
    spatial: np.ndarray | Tensor,
    *,
    pool_keep: np.ndarray | None = None,
    **extra: np.ndarray,
) -> Path:
    """Write reference statistics as .npz with ADM's keys (mu, sigma, mu_s, sigma_s; unbiased covariances, float64)
    plus the pool features (`pool`, float32 to halve the file; only the rows `pool_keep` when given) for precision /
    recall, and any `extra` arrays (e.g. `dinov2` features for KD_DINOv2). Atomic."""
    mu, sigma = _stats(pool)
    mu_s, sigma_s = _stats(spatial)
    kept = _f64(pool) if pool_keep is None else _f64(pool)[np.asarray(pool_keep)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name without it
        np.savez(f, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=kept.astype(np.float32), **extra)
    os.replace(tmp, path)
    return path


def load_reference(path: str | os.PathLike) -> Reference:
    """Reference statistics from our .npz (`save_reference`), an ADM reference batch (e.g.
    VIRTUAL_imagenet256_labeled.npz: mu, sigma, mu_s, sigma_s and images, no pool features, so no precision /
    recall) or a pytorch-fid stats file (mu, sigma only, so no sFID either). Only those keys are read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics {path} not found (make them with `srdit reference LATENT_DIR "
            f"{path} --inception WEIGHTS`, or use an ADM reference batch such as "
            "VIRTUAL_imagenet256_labeled.npz)"
        )
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{path}: no mu / sigma arrays (keys: {', '.join(z.files)})")

        def get(key: str, dtype: type = np.float64) -> np.ndarray | None:
            return np.asarray(z[key], dtype=dtype) if key in z.files else None

        ref = Reference(
            mu=get("mu"), sigma=get("sigma"), mu_s=get("mu_s"), sigma_s=get("sigma_s"), pool=get("pool", np.float32)
        )
    if (ref.mu_s is None) != (ref.sigma_s is None):
        raise ValueError(f"{path}: has only one of mu_s / sigma_s")
    return ref


def metrics_from_features(
    features: Mapping[str, np.ndarray],
    reference: Reference | str | os.PathLike,
    *,
    splits: int | None = None,
    k: int = 3,
) -> dict[str, float]:
    """The metrics of `imagenet_metrics` from precomputed `inception_features` of the generated images."""
    ref = reference if isinstance(reference, Reference) else load_reference(reference)
    mu, sigma = _stats(features["pool"])
    out = {"fid": frechet_from_stats(mu, sigma, ref.mu, ref.sigma)}
    if ref.mu_s is not None:
        mu_s, sigma_s = _stats(features["spatial"])
        out["sfid"] = frechet_from_stats(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
    n = len(features["logits"])
    splits = splits or max(1, -(-n // IS_SPLIT))  # ADM's evaluator: splits of 5000 samples (10 at 50K)
    out["inception_score"], out["inception_score_std"] = inception_score(features["logits"], splits)
    if ref.pool is not None:
        out["precision"], out["recall"] = precision_recall(ref.pool, features["pool"], k=k)
    out["n"] = len(features["pool"])
    return out


def imagenet_metrics(
    fake: Tensor | np.ndarray | Iterable[Tensor | np.ndarray],
    reference: Reference | str | os.PathLike,
    net: FIDInceptionV3,
    *,
    batch_size: int = 100,
    splits: int | None = None,
    k: int = 3,
) -> dict[str, float]:
    """{"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "n"} of generated images
    (anything `inception_features` takes) against reference statistics (a `Reference` or an .npz path). sfid is
    left out when the reference has no mu_s / sigma_s, precision / recall (k-NN, k=3, on pool features) when it
    has no pool features. n = number of generated images: FID is biased at small n, compare runs at equal n
    (the standard protocol is 50K)."""
    return metrics_from_features(inception_features(fake, net, batch_size), reference, splits=splits, k=k)


__all__ = [
    "ENV_VAR",
    "LABEL",
    "WEIGHTS_NAME",
    "WEIGHTS_URL",
    "FIDInceptionV3",
    "Reference",
    "frechet_from_stats",
    "imagenet_metrics",
    "inception_features",
    "inception_score",
    "load_inception",
    "load_reference",
    "metrics_from_features",
    "save_reference",
]
