"""Sharded sample generation for cluster-scale evaluation (e.g. the 50K samples of ImageNet FID over many GPUs).

Shard k of W generates protocol batches k, k + W, k + 2W, ... (`srdit.generate.shard_batches`) and writes
`samples_{k:05d}-of-{W:05d}.npz` holding

    arr_0     uint8 [N, H, W, C] images: the sample-batch format of the ADM evaluator (guided-diffusion)
    labels    int64 [N] class labels
    batches   int64 [B] the protocol batch indices held, in file order
    meta      JSON: the settings that decide the content (n, seed, batch size, sampler, weights fingerprint, ...)
    nfe       model evaluations per sample

Every batch has its own seed, so the samples do not depend on W and `collect` reassembles them in global order.
Files are written atomically; a rerun skips a shard already written with the same settings (resume) and refuses one
written with other settings, so a folder never mixes two checkpoints or samplers. While a shard is generated, each
finished protocol batch is written at once to `samples_KKKKK-of-WWWWW.parts/batch_BBBBBB.npz` (same settings in
its meta): a crash keeps what was done, the rerun generates only the missing batches, and the parts folder is
removed once the shard file is written. Shard index and count default to
torchrun's RANK / WORLD_SIZE, and the device to cuda:LOCAL_RANK.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srdit.cache import write_atomic
from srdit.config import RunConfig, SampleConfig, to_dict
from srdit.generate import generate, load_decoder, num_batches, shard_batches, to_images
from srdit.imaging import to_uint8
from srdit.parallel import check_device

SHARD_GLOB = "samples_*-of-*.npz"
_SHARD_RE = re.compile(r"samples_(\d{5})-of-(\d{5})\.npz")


@dataclass(frozen=True)
class ShardResult:
    path: Path
    shard: int
    num_shards: int
    batches: tuple[int, ...]
    num_samples: int
    nfe: int
    skipped: bool
    "True when the shard was already on disk with the same settings (nothing was generated)."


def shard_path(out_dir: str | os.PathLike, shard: int, num_shards: int) -> Path:
    return Path(out_dir) / f"samples_{shard:05d}-of-{num_shards:05d}.npz"


def combined_path(out_dir: str | os.PathLike, n: int) -> Path:
    return Path(out_dir) / f"samples_{n}.npz"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_shard(shard: int | None = None, num_shards: int | None = None) -> tuple[int, int]:
    """(shard, num_shards) from the arguments, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    shard = shard if shard is not None else _env_int("RANK")
    num_shards = num_shards if num_shards is not None else _env_int("WORLD_SIZE")
    if num_shards is None:
        num_shards = 1 if shard in (None, 0) else None
    if shard is None:
        shard = 0 if num_shards == 1 else None
    if shard is None or num_shards is None:
        raise ValueError(
            "give both the shard index and the shard count (--shard K --num-shards W), or run under "
            "torchrun (RANK / WORLD_SIZE)"
        )
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need 0 <= shard < num_shards")
    return shard, num_shards


def shard_device(name: str = "auto") -> torch.device:
    """`auto`: this process's GPU under torchrun (cuda:LOCAL_RANK), else cuda, else cpu; other names as given
    (ConfigError naming --device when this machine lacks it: `srdit.parallel.check_device`)."""
    if name != "auto":
        check_device(name, "--device")
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", _env_int("LOCAL_RANK") or 0)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) over the model's state dict, so shards of different checkpoints are never merged."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def sampling_settings(
    model: torch.nn.Module, cfg: RunConfig, n: int, seed: int, batch_size: int, sample_cfg: SampleConfig, tokenizer=None
) -> dict:
    """Everything that decides a shard's content except which batches it holds (JSON-able, compared on resume)."""
    settings = {
        "n": n,
        "seed": seed,
        "batch_size": batch_size,
        "num_batches": num_batches(n, batch_size),
        "dataset": cfg.data.dataset,
        "sample": to_dict(sample_cfg),
        "weights": weights_fingerprint(model),
    }
    if tokenizer is not None:  # weights, not the path: ranks on other nodes may keep them elsewhere
        module = next(
            (m for m in (getattr(tokenizer, a, None) for a in ("model", "vae")) if isinstance(m, torch.nn.Module)), None
        )
        settings["tokenizer"] = {
            "name": tokenizer.name,
            "scale": tokenizer.scale,
            "bias": tokenizer.bias,
            "weights": weights_fingerprint(module) if module is not None else None,
        }
    return json.loads(json.dumps(settings))  # normalise (tuples -> lists) so it compares equal to a re-read copy


def read_meta(path: str | os.PathLike) -> dict:
    """The settings stored in a shard (reads only the small `meta` member)."""
    with np.load(path) as z:
        return json.loads(str(z["meta"]))


def parts_dir(path: Path) -> Path:
    """Where the finished batches of shard file `path` wait until the shard is complete."""
    return path.with_suffix(".parts")


def _batch_part(parts: Path, b: int, settings: dict) -> tuple[np.ndarray, np.ndarray, int] | None:
    """A finished batch of an interrupted run with these settings, or None (absent, unreadable, other settings)."""
    path = parts / f"batch_{b:06d}.npz"
    try:
        with np.load(path) as z:
            if json.loads(str(z["meta"])) != settings:
                return None
            return z["arr_0"], z["labels"], int(z["nfe"])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _generate_shard(
    model,
    cfg: RunConfig,
    n: int,
    seed: int,
    batches: range,
    device: torch.device,
    batch_size: int,
    sc: SampleConfig,
    tokenizer,
    parts: Path,
    settings: dict,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Images (uint8 NHWC) and labels of `batches`, one batch at a time so latents are decoded as they come; each
    batch is written to `parts` as soon as it is done, and batches already there are read instead of redone."""
    images, labels, nfe = [], [], 0
    meta = np.asarray(json.dumps(settings, sort_keys=True))
    for b in batches:
        done = _batch_part(parts, b, settings)
        if done is None:
            x, y, nfe = generate(model, cfg, n, seed, device, batch_size, sc, batches=[b])
            img, lab = to_uint8(to_images(x, cfg, device, tokenizer, batch_size)), y.numpy()
            parts.mkdir(parents=True, exist_ok=True)
            # write_atomic calls the writer at once, so the loop variables are this batch's
            write_atomic(
                parts / f"batch_{b:06d}.npz",
                lambda f: np.savez(f, arr_0=img, labels=lab, meta=meta, nfe=np.int64(nfe)),  # noqa: B023
            )
        else:
            img, lab, nfe = done
        images.append(img)
        labels.append(lab)
    if not images:  # more shards than batches: an empty (but valid) shard
        images.append(np.zeros((0, 0, 0, 0), np.uint8))
        labels.append(np.zeros(0, np.int64))
    return np.concatenate(images), np.concatenate(labels), nfe


def write_shard(
    model,
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    shard: int | None = None,
    num_shards: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    sample_cfg: SampleConfig | None = None,
    tokenizer=None,
) -> ShardResult:
    """Generate shard `shard` of `num_shards` (default: torchrun's RANK / WORLD_SIZE) of n samples and write it
    atomically to `out_dir`; skip it when it is already there with the same settings. Latent runs are decoded with
    `tokenizer` (default: loaded from data.tokenizer / data.tokenizer_path)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shard, num_shards = resolve_shard(shard, num_shards)
    batch_size = batch_size or cfg.eval.batch_size
    sc = sample_cfg or cfg.sample
    if cfg.data.dataset != "digits" and tokenizer is None:
        tokenizer = load_decoder(cfg, device)
    settings = sampling_settings(model, cfg, n, seed, batch_size, sc, tokenizer)
    path = shard_path(out_dir, shard, num_shards)
    batches = shard_batches(n, batch_size, shard, num_shards)
    if path.exists():
        done = _finished(path, settings)
        if done is not None:
            return ShardResult(path, shard, num_shards, tuple(batches), *done, skipped=True)
    images, labels, nfe = _generate_shard(
        model, cfg, n, seed, batches, torch.device(device), batch_size, sc, tokenizer, parts_dir(path), settings
    )
    write_atomic(
        path,
        lambda f: np.savez(
            f,
            arr_0=images,
            labels=labels,
            batches=np.asarray(batches, np.int64),
            meta=np.asarray(json.dumps(settings, sort_keys=True)),
            nfe=np.int64(nfe),
        ),
    )
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    return ShardResult(path, shard, num_shards, tuple(batches), len(labels), nfe, skipped=False)


def _finished(path: Path, settings: dict) -> tuple[int, int] | None:
    """(samples, nfe) of a complete shard with these settings; None if unreadable (regenerate it); ValueError if it
    was written with other settings."""
    try:
        with np.load(path) as z:
            meta, count, nfe = json.loads(str(z["meta"])), len(z["labels"]), int(z["nfe"])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):  # written atomically: a foreign file
        return None
    if meta != settings:
        changed = sorted(k for k in set(meta) | set(settings) if meta.get(k) != settings.get(k))
        raise ValueError(
            f"{path} was written with other settings ({', '.join(changed)} differ); use another output "
            f"folder or delete the folder's shards"
        )
    return count, nfe


def _ranges(values: list[int], limit: int = 20) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (at most `limit` runs, then '...')."""
    runs: list[str] = []
    start = prev = None
    for v in values + [None]:
        if start is not None and v is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(runs[:limit]) + (", ..." if len(runs) > limit else "")


def _check_complete(out_dir: Path, owners: dict[int, list[Path]], expected: int, counts: set[int]) -> None:
    """Every batch 0..expected-1 exactly once; otherwise a ValueError naming the missing / duplicated batches."""
    dup = sorted(b for b, files in owners.items() if len(files) > 1)
    if dup:
        files = sorted({p.name for b in dup for p in owners[b]})
        raise ValueError(
            f"{out_dir}: batches {_ranges(dup)} appear in more than one shard ({', '.join(files[:6])}); "
            f"the folder mixes shard counts - keep one set of samples_*-of-WWWWW.npz"
        )
    missing = [b for b in range(expected) if b not in owners]
    if missing:
        hint = ""
        if len(counts) == 1:
            w = counts.pop()
            shards = sorted({b % w for b in missing})
            hint = f"; missing shard files: {', '.join(shard_path(out_dir, k, w).name for k in shards[:10])}" + (
                " ..." if len(shards) > 10 else ""
            )
        raise ValueError(
            f"{out_dir}: incomplete samples: batches {_ranges(missing)} of 0-{expected - 1} are missing"
            f"{hint}; run those shards (rerunning finished ones is a no-op)"
        )


def collect(out_dir: str | os.PathLike, n: int) -> tuple[np.ndarray, np.ndarray]:
    """All n samples of the shards in `out_dir` in global order: (uint8 [n, H, W, C], int64 [n] labels).

    Checks that the shards share one set of settings for these n samples and hold every protocol batch exactly once.
    """
    out_dir = Path(out_dir)
    files = sorted(p for p in out_dir.glob(SHARD_GLOB) if _SHARD_RE.fullmatch(p.name))
    if not files:
        raise FileNotFoundError(
            f"{out_dir}: no sample shards (samples_KKKKK-of-WWWWW.npz); write them first with "
            f"`srdit sample CKPT --n {n} --out {out_dir} --shard K --num-shards W`"
        )
    metas = {p: read_meta(p) for p in files}
    settings = metas[files[0]]
    if settings["n"] != n:
        raise ValueError(f"{files[0]}: holds samples of a run with n={settings['n']}, not n={n}")
    for p, meta in metas.items():
        if meta != settings:
            raise ValueError(
                f"{out_dir}: {files[0].name} and {p.name} were written with different settings; "
                f"one folder must hold one sampling run"
            )
    owners: dict[int, list[Path]] = {}
    for p in files:
        with np.load(p) as z:
            for b in z["batches"].tolist():
                owners.setdefault(b, []).append(p)
    counts = {int(_SHARD_RE.fullmatch(p.name).group(2)) for p in files}
    _check_complete(out_dir, owners, settings["num_batches"], counts)
    return _assemble(files, n, settings["batch_size"])


def _assemble(files: list[Path], n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    images: np.ndarray | None = None
    labels = np.zeros(n, np.int64)
    for p in files:
        with np.load(p) as z:
            arr, lab, batches = z["arr_0"], z["labels"], z["batches"].tolist()
        if images is None and len(arr):
            images = np.empty((n, *arr.shape[1:]), np.uint8)
        row = 0
        for b in batches:
            start, stop = b * batch_size, min(n, (b + 1) * batch_size)
            images[start:stop] = arr[row : row + stop - start]
            labels[start:stop] = lab[row : row + stop - start]
            row += stop - start
    assert images is not None  # n >= 1 and every batch present
    return images, labels


def merge(out_dir: str | os.PathLike, n: int) -> Path:
    """`collect` the shards and write them as one `samples_{n}.npz` (arr_0, labels) next to them, atomically."""
    images, labels = collect(out_dir, n)
    path = combined_path(out_dir, n)
    write_atomic(path, lambda f: np.savez(f, arr_0=images, labels=labels))
    return path


__all__ = [
    "ShardResult",
    "collect",
    "combined_path",
    "merge",
    "resolve_shard",
    "sampling_settings",
    "shard_device",
    "shard_path",
    "write_shard",
]
