"""Sampling from a trained model and decoding latent samples to images (evaluation: `srdit.evaluate`).

Sampling protocol: the n samples are cut into batches of a fixed *protocol batch size*, and batch b draws its labels,
initial state (`transport.initial_state`) and SDE noise from its own generator seeded by `batch_seed(seed, b)`.
Any subset of batches can be generated alone (one shard of a multi-GPU run) and the union equals the unsharded
output: samples depend on the seed, the protocol batch size and n (the last batch may be short), never on the
number of shards or devices. Batch 0 is seeded with `seed` itself, so n <= batch_size reproduces the earlier
one-generator protocol bit for bit.

On CUDA the model runs under bf16 autocast with TF32 matmuls (unless `train.precision` is fp32) while the sampler's
state stays float64 and every random draw stays on the batch's CPU generator: the same noise as on CPU, the model's
arithmetic in the precision it was trained in. The SDE noise is drawn into pinned buffers by a background thread while
the GPU samples and reaches the device one chunk at a time (`srdit.transport.samplers.SdeNoise`), not per step. CPU
sampling is unchanged (fp32, bit for bit).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from srdit.config import RunConfig, SampleConfig
from srdit.data.digits import random_labels
from srdit.ext import builtin_enabled, checked_labels, guidance_rule, label_rule, solver_rule
from srdit.transport import guided_velocity, initial_state, sample

if TYPE_CHECKING:
    from srdit.encoders import Tokenizer

_MASK63 = (1 << 63) - 1


def batch_seed(seed: int, batch: int) -> int:
    """Seed of sampling batch `batch`: `seed` for batch 0 (the historical single-generator protocol), else a
    63-bit mix of (seed, batch) only."""
    if batch == 0:
        return int(seed)
    return (int(seed) * 0x9E3779B97F4A7C15 + int(batch) * 0xBF58476D1CE4E5B9) & _MASK63


def num_batches(n: int, batch_size: int) -> int:
    """Number of protocol batches holding n samples (the last one may be short)."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return -(-n // batch_size)


def batch_slice(n: int, batch_size: int, batch: int) -> slice:
    """Global sample indices of batch `batch`."""
    if not 0 <= batch < num_batches(n, batch_size):
        raise ValueError(
            f"batch {batch} out of range: {n} samples make {num_batches(n, batch_size)} batches of {batch_size}"
        )
    return slice(batch * batch_size, min(n, (batch + 1) * batch_size))


def shard_batches(n: int, batch_size: int, shard: int, num_shards: int) -> range:
    """Batches of shard `shard` of `num_shards`: shard, shard + W, shard + 2W, ... (round robin, so shards differ by
    at most one batch)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need 0 <= shard < num_shards")
    return range(shard, num_batches(n, batch_size), num_shards)


def _generate_batch(
    model, cfg: RunConfig, sc: SampleConfig, n: int, seed: int, batch: int, batch_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Samples, labels and NFE of one protocol batch. Draw order (labels, initial state, SDE noise) is fixed:
    it is what makes batch 0 match the historical protocol."""
    m = cfg.model
    sl = batch_slice(n, batch_size, batch)
    size = sl.stop - sl.start
    g = torch.Generator().manual_seed(batch_seed(seed, batch))
    rule = _label_rule(cfg, sc)
    labels = (
        rule(n, m.num_classes, range(sl.start, sl.stop), g)
        if rule is not None
        else random_labels(size, m.num_classes, g)
    )
    state = initial_state(m, size, g)
    velocity = guided_velocity(
        model,
        labels.to(device),
        m.num_classes,
        sc.cfg_scale,
        sc.cls_cfg_scale,
        sc.guidance_low,
        sc.guidance_high,
        unconditional=_unconditional(cfg, sc),
        rule=guidance_rule(cfg.ext) if cfg.ext else None,
    )
    with sampling_precision(cfg, device):
        res = sample(
            velocity,
            [s.to(device) for s in state],
            sc.sampler,
            sc.steps,
            cfg.shift_value(),
            generator=g,
            solver=solver_rule(cfg.ext) if cfg.ext else None,
        )
    return res.state[0].float().cpu(), labels, res.nfe


def _label_rule(cfg: RunConfig, sc: SampleConfig):
    """The evaluation labels of a plugin's `labels` hook, else of a built-in's (balanced labels, switched by the
    sampling settings `sc` in use), as `rule(n, num_classes, rows, generator)`; None: the uniform random draw."""
    rule = label_rule(cfg.ext) if cfg.ext else None
    if rule is None:
        hooked = builtin_enabled(dataclasses.replace(cfg, sample=sc), "labels")
        if hooked:
            (builtin, knobs), *_ = hooked
            rule = checked_labels(f"built-in {builtin.name}", knobs, builtin.hooks["labels"])
    return rule


def _unconditional(cfg: RunConfig, sc: SampleConfig) -> dict[str, bool]:
    """What guidance's unconditional branch passes the model besides the null label: the `unconditional` hooks of
    the built-ins that are on under the sampling settings `sc` in use (path-drop guidance)."""
    out: dict[str, bool] = {}
    for builtin, knobs in builtin_enabled(dataclasses.replace(cfg, sample=sc), "unconditional"):
        out.update(builtin.hooks["unconditional"](knobs))
    return out


@contextlib.contextmanager
def sampling_precision(cfg: RunConfig, device: torch.device | str):
    """bf16 autocast for the model's forward and TF32 matmuls on CUDA (restored afterwards), as the trainer runs
    on CUDA; nothing on CPU or with train.precision fp32."""
    device = torch.device(device)
    if device.type != "cuda" or cfg.train.precision == "fp32":
        yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@torch.no_grad()
def generate(
    model,
    cfg: RunConfig,
    n: int,
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    sample_cfg: SampleConfig | None = None,
    batches: Iterable[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Samples (CPU float32), their labels, and the NFE per sample, for n samples at protocol batch size
    `batch_size` (default `cfg.eval.batch_size`).

    Digits samples are images clamped to [-1, 1]; latent runs return raw model latents (decode with `to_images`).
    `batches` selects protocol batches (default: all) and returns them concatenated in the order given; see the
    module docstring for why any selection reproduces the same rows as the full run (bit for bit on CPU)."""
    sc = sample_cfg or cfg.sample
    batch_size = batch_size or cfg.eval.batch_size
    chosen = list(range(num_batches(n, batch_size)) if batches is None else batches)
    m = cfg.model
    was_training = model.training
    model.eval()
    out = [torch.empty(0, m.in_channels, m.input_size, m.input_size)]
    labels = [torch.empty(0, dtype=torch.int64)]
    nfe = 0
    try:
        for b in chosen:
            x, y, nfe = _generate_batch(model, cfg, sc, n, seed, b, batch_size, device)
            out.append(x)
            labels.append(y)
    finally:
        model.train(was_training)
    samples = torch.cat(out)
    return (samples.clamp(-1, 1) if cfg.data.dataset == "digits" else samples), torch.cat(labels), nfe


def load_decoder(cfg: RunConfig, device: torch.device | str = "cpu") -> Tokenizer:
    """The tokenizer that decodes a latent run's samples (`data.tokenizer` from `data.tokenizer_path`)."""
    d = cfg.data
    if not d.tokenizer or not d.tokenizer_path:
        raise ValueError(
            "decoding latent samples needs the tokenizer they were encoded with: set data.tokenizer "
            "(invae or sdvae) and data.tokenizer_path (its local weights), e.g. "
            "`srdit sample CKPT --tokenizer invae --tokenizer-path e2e-invae-400k.pt`"
        )
    from srdit.encoders import load_tokenizer

    return load_tokenizer(d.tokenizer, d.tokenizer_path, device)


@torch.no_grad()
def to_images(
    samples: torch.Tensor,
    cfg: RunConfig,
    device: torch.device | str = "cpu",
    tokenizer: Tokenizer | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Samples from `generate` -> images in [-1, 1] (CPU float32, [N, C, H, W]).

    Digits samples already are images. Latent samples are model latents (`scale * latent + bias`);
    `Tokenizer.decode` undoes that scale itself, so they go to it unchanged, in chunks of `batch_size`
    (default `cfg.eval.batch_size`) to bound decoder memory. Pass `tokenizer` to avoid reloading it per call."""
    if cfg.data.dataset == "digits":
        return samples.float().clamp(-1, 1)
    tok = load_decoder(cfg, device) if tokenizer is None else tokenizer
    if samples.shape[1] != tok.channels:
        raise ValueError(
            f"samples have {samples.shape[1]} channels but tokenizer {tok.name} decodes {tok.channels}; "
            f"is data.tokenizer the one the latents were made with?"
        )
    step = batch_size or cfg.eval.batch_size
    chunks = [tok.decode(samples[i : i + step]).float().clamp(-1, 1).cpu() for i in range(0, len(samples), step)]
    if not chunks:
        side = samples.shape[-1] * tok.downsample
        return torch.empty(0, 3, side, side)
    return torch.cat(chunks)


def with_sampler(cfg: RunConfig, **changes) -> SampleConfig:
    """The run's sample settings with command-line changes (None values ignored)."""
    return dataclasses.replace(cfg.sample, **{k: v for k, v in changes.items() if v is not None})
