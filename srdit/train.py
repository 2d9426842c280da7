"""One training run from a resolved RunConfig: AdamW + EMA, checkpoints with exact resume, periodic evaluation.

The trainer knows nothing of Ray or MLflow: it reports through a `Reporter`. Failures are results: a non-finite
loss or gradient ends the run with status `diverged`, an out-of-memory error with status `oom`.

Data parallel: when `torch.distributed` is initialised (torchrun, or a Ray Train worker), each rank trains on its
slice of the global batch under DistributedDataParallel and rank 0 reports, evaluates and writes checkpoints; the
trajectory equals the single-process run with the same global batch (see `srdit.parallel`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from srdit import stop
from srdit.cache import load_torch, save_atomic, write_atomic
from srdit.config import ConfigError, RunConfig, flatten_dict, from_dict, input_file_problem, to_dict, to_yaml
from srdit.model import build_model
from srdit.parallel import DataParallel, check_device
from srdit.provenance import provenance
from srdit.stop import Interrupted
from srdit.transport.objective import TEACHER_SETTINGS, StepNoise, teacher_widths, training_losses

CHECKPOINT = "checkpoints/last.pt"
EMA_SNAPSHOT = "checkpoints/ema_step{step:07d}.pt"
"""The EMA weights at an evaluation step (`train(..., snapshots=True)`): what `evaluate_trained` evaluates a
further evaluation-time setting from, without training again."""
TRAIN_LOG = "train_metrics.jsonl"
"Every training report (loss, throughput; no evaluation) of a run kept with snapshots, one JSON line each."
EVALS = "evals"
"Folder of evals/step_N.json: the metrics of each completed evaluation."
SAMPLES = "samples"
"Folder of the evaluation sample shards of latent runs (samples/step_N)."
METRICS_LOG = "metrics.jsonl"
"Every report of `srdit train` (JsonlReporter), one JSON line each."
WARMUP_FRACTION = 0.1
"""Throughput windows ending in the first tenth of the steps (and always the first window: compilation, allocator
and cache warm-up) are left out of the run's throughput summary."""


def throughput_summary(windows: list[tuple[int, float, float]], steps: int) -> dict[str, float]:
    """Median steps/s and images/s over the post-warm-up log windows [(end step, steps/s, images/s)]; a median
    resists the windows slowed by evaluations or by another process on the machine. Falls back to every window
    when warm-up leaves none."""
    if not windows:
        return {}
    post = [w for i, w in enumerate(windows) if i > 0 and w[0] > WARMUP_FRACTION * steps] or windows
    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    return {
        "steps_per_s_median": med([w[1] for w in post]),
        "images_per_s_median": med([w[2] for w in post]),
        "throughput_windows": float(len(post)),
    }


class Reporter(Protocol):
    def report(self, step: int, metrics: dict[str, float]) -> None: ...


class NullReporter:
    def report(self, step: int, metrics: dict[str, float]) -> None:
        pass


class JsonlReporter:
    """Appends every report to metrics.jsonl in the run folder (what `srdit train` leaves behind).

    A resumed run replays the steps between its checkpoint and the interruption bit-exactly: a key already in the
    file at that step or later is not written again (each step once)."""

    def __init__(self, path: Path, inner: Reporter | None = None):
        self.path, self.inner = Path(path), inner
        self._upto: dict[str, int] | None = None  # read at the first report (train() clears the file on a fresh start)

    def _logged_upto(self) -> dict[str, int]:
        if self._upto is None:
            self._upto = {}
            if self.path.is_file():
                for line in self.path.read_text().splitlines():
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        row = json.loads(line)
                        for k in row:
                            if k != "step":
                                self._upto[k] = max(self._upto.get(k, -1), int(row["step"]))
        return self._upto

    def report(self, step: int, metrics: dict[str, float]) -> None:
        upto = self._logged_upto()
        new = {k: v for k, v in metrics.items() if upto.get(k, -1) < step}
        if new:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **new}) + "\n")
            upto.update({k: step for k in new})
        if self.inner is not None:
            self.inner.report(step, metrics)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.inner is not None and hasattr(self.inner, "artifact"):
            self.inner.artifact(path, artifact_path)


@dataclass
class TrainResult:
    status: str  # finished | diverged | oom
    reason: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    "Final training metrics and the final evaluation of the run's own config."
    out_dir: Path | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    "Final training metrics only (last log window, throughput summary)."
    evaluations: list[dict[str, float]] = field(default_factory=list)
    "Final evaluation metrics of each extra `Evaluation`, in the order given."


@dataclass(frozen=True)
class Evaluation:
    """A further evaluation of the model being trained: the config of a cell that trains the same model (equal
    `srdit.techniques.training_config`) and differs only in evaluation-time settings (sampler, guidance, label
    balance, sample count). `train` evaluates the EMA weights under `cfg` at every evaluation step, leaves
    `out_dir/evals/step_N.json`, the preview grid and config.yaml there, and sends `reporter` the training reports
    as well as this evaluation's metrics (it stands for a run of that cell)."""

    cfg: RunConfig
    out_dir: Path
    reporter: Reporter


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (not srdit's, from another model, unreadable)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint file that is not there: a missing file, which a study counts as its infrastructure's failure
    (`srdit.runtime.worker.crash_cause`), not the training code's."""


# --------------------------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------------------------


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The torch device `name` (a value of `train.device`: auto, cpu, cuda, cuda:N) names on this machine; auto is
    CUDA when available. ConfigError, one line naming `key`, when this machine cannot use it (no CUDA, or
    cuda:N beyond its device count): checked when the run starts, not at its first tensor."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name, key, any_index=DataParallel.current().active)
    # The launcher picked this process's GPU (torch.cuda.set_device); data-parallel ranks never share one.
    if name == "cuda" or (name.startswith("cuda") and DataParallel.current().active):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


_CPU_ALLOCATION_FAILED = ("can't allocate memory", "Cannot allocate memory")
"What torch's CPU allocator says when the operating system refuses memory (a RuntimeError, not a MemoryError)."


def out_of_memory(e: BaseException, cfg: RunConfig | None = None) -> str | None:
    """One line for an allocation failure `e` (torch's OutOfMemoryError on a GPU, the CPU allocator's
    RuntimeError "can't allocate memory", Python's MemoryError): out of memory, the size it tried to allocate,
    and what to lower (`cfg`'s batch size and model size); None when `e` is not one."""
    import re

    text = str(e)
    cpu = isinstance(e, RuntimeError) and any(m in text for m in _CPU_ALLOCATION_FAILED)
    if not (cpu or isinstance(e, (torch.OutOfMemoryError, MemoryError))):
        return None
    where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
    asked = re.search(r"allocate (\d+) bytes", text)  # the CPU allocator's; CUDA's says "Tried to allocate 2.00 GiB"
    cuda = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]?i?B)", text)
    size = f" allocating {_bytes(int(asked.group(1)))}" if asked else f" allocating {cuda.group(1)}" if cuda else ""
    lower = (
        f"; lower train.batch_size (now {cfg.train.batch_size}) or the model size (model.size {cfg.model.size})"
        if cfg is not None
        else "; lower the batch size or the model size"
    )
    return f"out of {where} memory{size}{lower}"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    resume: bool = True,
    progress: bool | None = None,
    evaluations: Sequence[Evaluation] = (),
    snapshots: bool = False,
) -> TrainResult:
    """Train `cfg` into `out_dir` (config.yaml, metrics.jsonl, samples.png/.npz, checkpoints/last.pt).

    With `resume`, a checkpoint in `out_dir` is continued exactly: same batches, same noise, same weights as the
    uninterrupted run. `evaluations`: further evaluation-time settings of the same model (see `Evaluation`),
    evaluated at every evaluation step alongside `cfg`'s own; ValueError when one would train another model.
    `snapshots`: keep the EMA weights of every evaluation step (`EMA_SNAPSHOT`) and the training reports
    (`TRAIN_LOG`), from which `evaluate_trained` evaluates another evaluation-time setting later without training.
    An evaluation step whose record (evals/step_N.json) exists is not evaluated again (a resumed run).

    Running out of memory in a training step is a result (status "oom", `out_of_memory`'s line as its reason);
    anywhere else (building the model, evaluating) it raises MemoryError with that line. A write the operating
    system refuses (a full disk) raises OSError naming the file (`srdit.cache.write_atomic`); the last complete
    checkpoint is kept, and the run resumes from it."""
    try:
        return _train(cfg, out_dir, reporter, resume, progress, evaluations, snapshots)
    except Exception as e:
        line = out_of_memory(e, cfg)
        if line is None or isinstance(e, MemoryError) and str(e) == line:
            raise
        raise MemoryError(line) from e


def autocast_for(cfg: RunConfig, device: torch.device):
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _teacher_for(cfg: RunConfig, device):
    """The alignment teacher when the objective needs one, checked against the model's widths; None otherwise."""
    want = teacher_widths(cfg.model)
    if not want:
        return None
    from srdit.encoders import load_teacher

    teacher = load_teacher(cfg.data.teacher, cfg.data.teacher_path, device)
    if want != {teacher.dim}:
        raise ValueError(
            f"teacher {cfg.data.teacher} gives {teacher.dim}-d tokens: set "
            f"{' and '.join(TEACHER_SETTINGS)} to {teacher.dim}"
        )
    return teacher


def teacher_identity(name: str, path: str | None) -> dict:
    """What identifies a teacher's tokens (the key of a teacher cache): {"teacher": name}, plus the weights file's
    sha256 (`weights_sha256`) for DINOv2."""
    if name == "digits-cnn":
        return {"teacher": name}
    from srdit.encoders.dinov2 import teacher_fingerprint

    return teacher_fingerprint(name, path)


class DigitsBatches:
    """The embedded default: digits in memory, a deterministic index stream, and teacher tokens computed once.

    There is no augmentation, so the teacher's tokens are a pure function of the image index; computing them
    once removes the per-step teacher cost that bottlenecked the paper's run."""

    def __init__(self, cfg: RunConfig, device: torch.device, dp: DataParallel = DataParallel()):
        from srdit.data.digits import BatchStream, load_digits_split

        split = load_digits_split()
        self.x, self.y = split.train_x.to(device), split.train_y.to(device)
        self.stream = BatchStream(len(self.x), cfg.train.batch_size, cfg.train.seed)
        self.dp = dp
        self.patches = self.cls_tokens = None
        teacher = _teacher_for(cfg, "cpu")
        if teacher is not None:
            with torch.no_grad():
                patches, cls_tokens = teacher(split.train_x, cfg.model.input_size // cfg.model.patch_size)
            self.patches, self.cls_tokens = patches.to(device), cls_tokens.to(device)

    def next(self):
        """(x0, labels, teacher patch tokens or None, teacher class token or None)."""
        idx = self.dp.part(self.stream.next_indices()).to(self.x.device)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return self.x[idx], self.y[idx], pick(self.patches), pick(self.cls_tokens)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class LatentBatches:
    """Pre-encoded latent shards (see `srdit preprocess`), streamed. The alignment teacher's tokens come from the
    read-only teacher cache (`data.teacher_cache`, built by `srdit cache-teacher`), read in the stream's prefetch
    thread, or else from the teacher run every step on the stored raw crops."""

    def __init__(self, cfg: RunConfig, device: torch.device, dp: DataParallel = DataParallel()):
        from srdit.data.latents import LatentStream, index_fingerprint

        m = cfg.model
        self.grid = m.input_size // m.patch_size
        self.teacher = cache = None
        want = teacher_widths(m)
        if want and cfg.data.teacher_cache:
            # Running the teacher every step bottlenecked the paper's run (SR-DiT section 4.1): read cached tokens.
            from srdit.data.teacher_cache import TeacherCache

            cache = TeacherCache(
                cfg.data.teacher_cache,
                expect={
                    **teacher_identity(cfg.data.teacher, cfg.data.teacher_path),
                    "grid": self.grid,
                    "latents": index_fingerprint(cfg.data.path),
                },
            )
            if want != {cache.dim}:
                raise ValueError(
                    f"{cfg.data.teacher_cache}: the cached {cfg.data.teacher} tokens are {cache.dim}-d: "
                    f"set {' and '.join(TEACHER_SETTINGS)} to {cache.dim}"
                )
        elif want:
            # Building the teacher must not move the seeded RNG that initialises the model next: a run trains the
            # same model whether its tokens come from the cache or from the online teacher.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.teacher = _teacher_for(cfg, device)
        self.cached = cache is not None
        self.stream = LatentStream(
            cfg.data.path,
            cfg.train.batch_size,
            cfg.train.seed,
            images=self.teacher is not None,
            device=device,
            prefetch=2,
            part=(dp.rank, dp.world),
            teacher_cache=cache,
        )
        shape = tuple(self.stream.data.latent_shape)
        if shape != (m.in_channels, m.input_size, m.input_size) or self.stream.data.num_classes != m.num_classes:
            raise ValueError(
                f"{cfg.data.path}: latents are {shape} with {self.stream.data.num_classes} classes; set "
                f"model.in_channels, model.input_size and model.num_classes to match"
            )

    def next(self):
        x0, y, crops = self.stream.next_batch()
        if self.cached:
            return (x0, y, *self.stream.last_teacher)
        if self.teacher is None:
            return x0, y, None, None
        with torch.no_grad():
            patches, cls_tokens = self.teacher(crops, self.grid)
        return x0, y, patches.float(), cls_tokens.float()

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def make_batches(cfg: RunConfig, device: torch.device, dp: DataParallel = DataParallel()):
    """This rank's part of each global batch: (x0, labels, teacher patch tokens or None, class token or None)."""
    return (DigitsBatches if cfg.data.dataset == "digits" else LatentBatches)(cfg, device, dp)


def make_optimizer(
    model: torch.nn.Module, cfg: RunConfig, device: torch.device, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: fused (one kernel for all parameters, and the implementation that can
    skip a non-finite update on the device) on CUDA, foreach (a few multi-tensor kernels; the same numbers as the
    per-parameter loop) elsewhere."""
    tc = cfg.train
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=tc.lr,
        betas=tc.betas,
        weight_decay=tc.weight_decay,
        **({"fused": True} if fused else {"foreach": True}),
    )


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state written by any device's trainer, keeping this optimizer's implementation (fused /
    foreach): `Optimizer.load_state_dict` would otherwise take the writer's flags with the hyper-parameters."""
    mine = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    opt.load_state_dict({**state, "param_groups": [{**g, **m} for g, m in zip(state["param_groups"], mine)]})


class TrainStep:
    """One optimisation step exactly as `train` runs it (noise, forward, losses, backward, clip, AdamW, EMA), with
    no host synchronisation: the metrics accumulate on the device and the finiteness of each step is recorded there.

    `flush()` hands over the window's metrics and the first non-finite step (one all-reduce, one device->host
    copy); `train` calls it every `log_every` steps, so a diverged run is recorded at most `log_every` steps late.
    `skip_nonfinite` (default: on when the optimizer is fused, where it costs nothing) additionally leaves the
    weights, the optimizer state and the EMA untouched by a step whose gradient norm is not finite (decided on the
    device; the gradient norm is the same on every rank after the all-reduce, so the ranks stay in step).

    The benchmark (`bench/gpu_bench.py`) times this object, so it measures the trainer's own code path."""

    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        ema: torch.nn.Module,
        opt: torch.optim.AdamW,
        device: torch.device,
        dp: DataParallel = DataParallel(),
        net: torch.nn.Module | None = None,
        skip_nonfinite: bool | None = None,
    ):
        self.cfg, self.model, self.opt, self.device, self.dp = cfg, model, opt, device, dp
        self.net = net if net is not None else model
        fused = bool(opt.param_groups[0].get("fused"))
        self.skip_nonfinite = fused if skip_nonfinite is None else skip_nonfinite
        if self.skip_nonfinite and not fused:
            raise ValueError(
                "skip_nonfinite needs the fused AdamW (make_optimizer(..., fused=True)): only it "
                "skips an update on the device"
            )
        pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
        self.ema_params, self.params = [e for e, _ in pairs], [p for _, p in pairs]
        self.shift = cfg.shift_value()
        self.autocast = autocast_for(cfg, device)
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # float64 [len(names)] on the device
        self.count = 0
        # First step (1-based, 0 = none) with a non-finite loss / gradient norm, on the device.
        self.first_bad = torch.zeros(2, dtype=torch.int64, device=device)

    def __call__(self, x0: torch.Tensor, y: torch.Tensor, teacher_out, step: int) -> dict[str, torch.Tensor]:
        """Train on this rank's batch as step `step` (1-based); returns the step's metrics (device scalars)."""
        cfg, tc = self.cfg, self.cfg.train
        noise = StepNoise.draw(cfg, self.model, x0.shape, self.shift, self.device, self.dp)
        losses = training_losses(
            self.net,
            x0,
            y,
            teacher_out,
            cfg,
            noise,
            roll=self.dp.rolled,
            autocast=self.autocast,
            gather=self.dp.all_gather,
        )
        loss = losses["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
        grad_ok = torch.isfinite(grad_norm)
        if self.skip_nonfinite:
            self.opt.found_inf = (~grad_ok).float()  # read by the fused kernel: no update, step count kept
            self.opt.step()
            with torch.no_grad():
                w = grad_ok.float() * (1.0 - tc.ema_decay)
                torch._foreach_lerp_(self.ema_params, self.params, [w] * len(self.params))
        else:
            self.opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.params, 1.0 - tc.ema_decay)
        bad = torch.stack([~torch.isfinite(loss.detach()), ~grad_ok])
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)
        metrics = {
            "loss": loss.detach(),
            "grad_norm": grad_norm.detach(),
            **{f"loss/{k}": v.detach() for k, v in losses.items() if k != "loss"},
        }
        values = torch.stack([v.float() for v in metrics.values()]).double()
        if self.sums is None:
            self.names, self.sums = list(metrics), values
        else:
            self.sums = self.sums + values
        self.count += 1
        return metrics

    def flush(self) -> tuple[dict[str, float], tuple[int, str] | None]:
        """(window means over steps and ranks, (first non-finite step, "loss" | "gradient norm") or None); resets
        the window. One all-reduce (under data parallel) and one device->host copy: call it on every rank."""
        n = len(self.names)
        sums = self.sums if self.sums is not None else torch.zeros(0, dtype=torch.float64, device=self.device)
        host = self.dp.sum(torch.cat([sums, self._bad_slots()])).tolist()  # the one synchronisation
        means = [v / self.dp.world for v in host[:n]] if self.dp.active else host[:n]
        means = [v / max(self.count, 1) for v in means]  # float64 as the device's, the same roundings
        self.sums, self.count = None, 0
        return dict(zip(self.names, means)), self._first_bad(host[n:])

    def window(self) -> dict | None:
        """This rank's open metrics window (names, float64 sums, step count), for a checkpoint written between two
        logging steps: the resumed run's next logged means then cover the same steps as without the interruption.
        None when the window is empty."""
        if not self.count:
            return None
        return {"names": list(self.names), "sums": self.sums.detach().cpu(), "count": self.count}

    def load_window(self, window: dict | None) -> None:
        """Reopen a window saved by `window` (a checkpoint of this rank)."""
        if window:
            self.names, self.count = list(window["names"]), int(window["count"])
            self.sums = window["sums"].to(self.device)

    def diverged(self) -> tuple[int, str] | None:
        """The first non-finite step so far on any rank, without closing the metrics window (before a checkpoint
        or an evaluation, which synchronise anyway): one small all-reduce and one copy."""
        return self._first_bad(self.dp.sum(self._bad_slots()).tolist())

    def _bad_slots(self) -> torch.Tensor:
        """[world * 2] float64: this rank's first bad steps in its own slots, zeros elsewhere, so that the sum over
        ranks gathers every rank's."""
        slots = torch.zeros(self.dp.world, 2, dtype=torch.float64, device=self.device)
        slots[self.dp.rank] = self.first_bad.double()
        return slots.flatten()

    @staticmethod
    def _first_bad(values: list[float]) -> tuple[int, str] | None:
        firsts = [(int(v), ("loss", "gradient norm")[i % 2]) for i, v in enumerate(values) if v]
        return min(firsts, key=lambda f: (f[0], f[1] != "loss")) if firsts else None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `train` (weights_only=True); CheckpointError with one line naming the file
    otherwise: missing, a folder, empty, text, a plain pickle, another program's file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (a run's checkpoint is RUN/{CHECKPOINT})")
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such checkpoint file")
    problem = input_file_problem(path, max_bytes=None)  # e.g. /dev/zero, a FIFO
    if problem:
        raise CheckpointError(problem)
    try:
        ckpt = load_torch(path)
    except Exception:  # pickle / zip errors carry long messages: say what the file is instead
        raise CheckpointError(f"{path}: not a readable srdit checkpoint: {_not_a_checkpoint(path)}") from None
    if (
        not isinstance(ckpt, dict)
        or not {"model", "ema", "config", "step"} <= set(ckpt)
        or not isinstance(ckpt["config"], dict)
    ):
        raise CheckpointError(f"{path}: not an srdit checkpoint (expected model, ema, config and step entries)")
    return ckpt


def _not_a_checkpoint(path: Path) -> str:
    """What `path` is, judged from its first bytes, when torch cannot read it (torch's own errors run to many
    lines)."""
    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty (0 bytes; cut short?)"
    if head[:1] == b"\x80":  # the pickle protocol opcode: torch.save's zip archive starts with PK instead
        return "a plain pickle, not a file written by torch.save (`srdit train` writes RUN/checkpoints/last.pt)"
    try:
        head.decode("utf-8")
        return "a text file, not a PyTorch checkpoint (`srdit train` writes RUN/checkpoints/last.pt)"
    except UnicodeDecodeError:
        pass
    if head[:2] == b"PK":
        return "a zip archive that torch cannot read (cut short, or another program's archive)"
    return "an unknown binary format, not a PyTorch checkpoint"


def checkpoint_plugins(cfg: RunConfig) -> dict:
    """{"plugins": [...]} for a checkpoint of a run with plugin techniques on (`srdit.provenance.plugin_sources`:
    name, where it was loaded from, its code version), {} without: what `model_from_checkpoint` loads again."""
    if not cfg.ext:
        return {}
    from srdit.provenance import plugin_sources

    return {"plugins": plugin_sources(cfg.ext)}


def load_checkpoint_plugins(ckpt: dict) -> None:
    """Load the plugin techniques a checkpoint was trained with (`checkpoint_plugins`) that this process has not
    loaded (`--plugins` loads them from elsewhere first), and refuse one whose code is not the code it was trained
    with: ConfigError with one line naming the plugin, both code versions and the fix."""
    from srdit import ext
    from srdit.provenance import plugin_versions
    from srdit.techniques import load_plugins

    for s in ckpt.get("plugins", ()):
        if s["name"] not in ext.PLUGINS:
            try:
                load_plugins([s["origin"]], where=f"plugin {s['name']} (recorded in the checkpoint)")
            except ConfigError as e:
                raise ConfigError(f"{e}; pass --plugins with its file, folder or module") from None
        now = plugin_versions({s["name"]: {}})[s["name"]]
        if now != s["version"]:
            raise ConfigError(
                f"plugin {s['name']} ({ext.PLUGINS[s['name']].where()}): its code version {now} is not the one the "
                f"checkpoint was trained with ({s['version']}); pass --plugins with that code"
            )


def model_from_checkpoint(ckpt: dict, weights: str = "ema") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model a checkpoint was trained with and load its (EMA) weights strictly. Plugin techniques it
    was trained with are loaded first (`load_checkpoint_plugins`; ConfigError when their code differs).

    A checkpoint whose config predates `model.time_embed_scale` was trained with DiT's 1000 t time features (the
    only behaviour then), so it loads with scale 1000; its position table is restored from its own weights."""
    load_checkpoint_plugins(ckpt)
    config = ckpt["config"]
    if isinstance(config.get("model"), dict) and "time_embed_scale" not in config["model"]:
        config = {**config, "model": {**config["model"], "time_embed_scale": 1000.0}}
    cfg = from_dict(RunConfig, config).validate()
    model = build_model(cfg.model, cfg.ext)
    try:
        model.load_state_dict(ckpt[weights], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match its model config ({str(e).splitlines()[0]})") from None
    return model.eval(), cfg


def init_weights(model: torch.nn.Module, ema: torch.nn.Module, cfg: RunConfig, path: str | Path) -> None:
    """Start `model` and `ema` from the EMA weights of the srdit checkpoint `path` (`train.init`); its model
    section must equal `cfg.model` (a parameter-free switch such as the norm would otherwise load silently)."""
    init, init_cfg = model_from_checkpoint(load_checkpoint(path))
    check_same_model(cfg, init_cfg, f"train.init {path}")
    state = init.state_dict()
    model.load_state_dict(state)
    ema.load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


class _Progress:
    """Progress on stderr (stdout keeps `srdit train`'s summary). `enabled` True: a rich progress bar whose last
    logged figures (loss, it/s, img/s) stay until the next logging step; None: that bar on a terminal, otherwise
    (a pipe, nohup, a batch job) one plain line per logging step; False: nothing (study trials, `--quiet`)."""

    def __init__(self, total: int, start: int, enabled: bool | None):
        self.bar = None
        self.plain = enabled is None and not sys.stderr.isatty()
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        if enabled or (enabled is None and not self.plain):
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str | None = None) -> None:
        """At every step; `info`: the figures of a logging step (kept on the bar until the next one)."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({} if info is None else {"info": info}))
        elif self.plain and info is not None:
            done, left = step - self.start, self.total - step
            eta = f"  ETA {(time.perf_counter() - self.t0) / done * left:.0f} s" if done > 0 and left > 0 else ""
            print(f"train step {step}/{self.total}  {info}{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _train(
    cfg: RunConfig,
    out_dir: str | Path,
    reporter: Reporter | None,
    resume: bool,
    progress: bool | None,
    evaluations: Sequence[Evaluation],
    snapshots: bool,
) -> TrainResult:
    cfg = cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = [Evaluation(e.cfg.validate(), Path(e.out_dir), e.reporter) for e in evaluations]
    for e in extra:
        check_same_training(cfg, e.cfg, str(e.out_dir))
    dp = DataParallel.current()
    dp.local_batch(cfg.train.batch_size)  # a clear error before anything is built
    if cfg.data.dataset != "digits" and cfg.eval.reference:
        from srdit.evaluate import check_evaluation

        check_evaluation(cfg)  # missing weights or reference: now, not after training
    reporter = (reporter or NullReporter()) if dp.main else NullReporter()
    if not dp.main:
        extra = [Evaluation(e.cfg, e.out_dir, NullReporter()) for e in extra]
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(tc.seed)
    data = make_batches(cfg, device, dp)
    model = build_model(cfg.model, cfg.ext).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, cfg, device)
    step = 0
    open_window = None  # a checkpoint written between two logging steps: its metrics window, reopened
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["config"] != to_dict(cfg):
            raise CheckpointError(f"{ckpt_path}: written by a different config; use another --out or remove it")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        load_optimizer_state(opt, ckpt["opt"])
        data.load_state_dict(ckpt["data"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        step = int(ckpt["step"])
        open_window = ckpt.get("window")
    elif tc.init:
        init_weights(model, ema, cfg, tc.init)
    if dp.main:
        (out / "config.yaml").write_text(to_yaml(cfg))
        for tmp in ckpt_path.parent.glob(f".{ckpt_path.name}.*.tmp"):  # a write killed before its rename
            tmp.unlink(missing_ok=True)
        if step == 0:  # a fresh start: evaluations and metrics left by an earlier run in this folder are not this run's
            for folder in [out] + [e.out_dir for e in extra]:
                for old in (folder / EVALS, folder / SAMPLES):
                    shutil.rmtree(old, ignore_errors=True)
            (out / METRICS_LOG).unlink(missing_ok=True)
            (out / TRAIN_LOG).unlink(missing_ok=True)
            for old in ckpt_path.parent.glob("ema_step*.pt"):
                old.unlink(missing_ok=True)
        for e in extra:
            e.out_dir.mkdir(parents=True, exist_ok=True)
            (e.out_dir / "config.yaml").write_text(to_yaml(e.cfg))
    # Training reports reach every run that stands for this training; evaluations only their own config's.
    train_log = JsonlReporter(out / TRAIN_LOG) if snapshots and dp.main else NullReporter()
    sinks = [reporter, *(e.reporter for e in extra), train_log]

    def report_training(at: int, metrics: dict[str, float]) -> None:
        for sink in sinks:
            sink.report(at, metrics)

    ckpt_plugins = checkpoint_plugins(cfg)  # their code versions, read once per run

    def save() -> None:
        if not dp.main:
            return
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        save_atomic(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "rng": rng,
                "data": data.state_dict(),
                "config": to_dict(cfg),
                **ckpt_plugins,
                **({"window": window} if (window := train_step.window()) else {}),
                **provenance(device),
            },
            ckpt_path,
        )

    # Digits evaluate in memory on rank 0; latent runs (with eval.reference) write sample shards on every rank.
    own = Evaluation(cfg, out, reporter)
    targets = [t for t in [own, *extra] if evaluates(t.cfg)]

    def evaluate_now() -> list[dict[str, float]]:
        """Evaluate the EMA weights at this step under every target config (`evaluate_target`), keeping a snapshot
        of them first when asked. Returns the metrics of each target (own config first when it evaluates)."""
        if snapshots and dp.main:
            snap = out / EMA_SNAPSHOT.format(step=step)
            if not snap.is_file():
                save_atomic({"ema": ema.state_dict(), "step": step, "config": to_dict(cfg), **ckpt_plugins}, snap)
        return [evaluate_target(ema, t, step, step < tc.steps, device, dp) for t in targets]

    def stop_requested() -> str | None:
        """Why to stop now (`srdit.stop`), or None. One process: at every step. Data parallel: at logging steps
        only, where the ranks already synchronise, and as one decision of all ranks (any rank's request)."""
        if not dp.active:
            return stop.requested()
        if step % tc.log_every and step != tc.steps:
            return None
        mine = torch.tensor([1.0 if stop.requested() else 0.0], device=device)
        return (stop.requested() or "a peer's stop request") if float(dp.sum(mine)) > 0 else None

    def evaluation_due() -> bool:
        return bool(targets) and bool(tc.eval_every) and step % tc.eval_every == 0 and 0 < step < tc.steps

    net = model
    if dp.active:
        from torch.nn.parallel import DistributedDataParallel

        # The RoPE tables are constant buffers: nothing to broadcast each step; gradients live in the buckets.
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
    net = torch.compile(net) if tc.compile else net
    train_step = TrainStep(cfg, model, ema, opt, device, dp, net)
    train_step.load_window(open_window if dp.main and not dp.active else None)  # rank 0 saved only its own
    bar = _Progress(tc.steps, step, progress if dp.main else False)
    t_window = time.perf_counter()
    windows: list[tuple[int, float, float]] = []
    status, reason, last = "finished", "", {}

    def stop_if_diverged(found) -> bool:
        nonlocal status, reason, step
        if found is None:
            return False
        bad_step, what = found
        status, reason, step = "diverged", f"non-finite {what} at step {bad_step}", bad_step - 1
        return True

    if evaluation_due():
        evaluate_now()  # resumed from a checkpoint whose evaluation was interrupted (done ones are read back)
    model.train()
    try:
        while step < tc.steps:
            x0, y, *teacher_out = data.next()
            train_step(x0, y, teacher_out, step + 1)  # no host synchronisation in here
            step += 1
            if step % tc.log_every == 0 or step == tc.steps:
                count = train_step.count
                means, found = train_step.flush()
                if stop_if_diverged(found):
                    break
                dt = time.perf_counter() - t_window
                last = means | {"steps_per_s": count / dt, "images_per_s": count * tc.batch_size / dt}
                windows.append((step, last["steps_per_s"], last["images_per_s"]))
                report_training(step, last)
                bar.update(
                    step, f"loss {last['loss']:.4f}  {last['steps_per_s']:.1f} it/s  {last['images_per_s']:.0f} img/s"
                )
                t_window = time.perf_counter()
            else:
                bar.update(step)
            saving = step % tc.ckpt_every == 0 and step < tc.steps
            if (saving or evaluation_due()) and stop_if_diverged(train_step.diverged()):
                break  # never checkpoint or evaluate weights past a non-finite step
            if saving:
                save()
            if evaluation_due():
                evaluate_now()
                t_window = time.perf_counter()
            why = stop_requested()
            if why:
                if stop_if_diverged(train_step.diverged()):
                    break
                if not saving:
                    save()
                dp.barrier()
                raise Interrupted(why, step, str(ckpt_path))
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        line = out_of_memory(e, cfg)
        if line is None or dp.active:  # the other ranks wait in a collective: fail the group; the launcher records it
            raise
        status, reason = "oom", f"{line} (at step {step + 1})"
    finally:
        bar.close()

    if status != "finished":
        report_training(step, {"diverged_step" if status == "diverged" else "oom_step": float(step + 1)})
        return _result(out, dp, cfg, status, reason, step, dict(last), dict(last), [{} for _ in extra])
    last |= throughput_summary(windows, tc.steps)
    save()
    if snapshots and dp.main:  # the throughput summary is a training report too (what a later evaluation copies)
        train_log.report(
            step, {k: last[k] for k in ("steps_per_s_median", "images_per_s_median", "throughput_windows") if k in last}
        )
    finals = dict(zip((id(t) for t in targets), evaluate_now())) if targets else {}
    for t in [own, *extra]:
        if dp.main:
            finish_outputs(ema, t, device)
    final = finals.get(id(own), {})
    return _result(
        out, dp, cfg, status, reason, step, {**last, **final}, dict(last), [finals.get(id(e), {}) for e in extra]
    )


def evaluates(cfg: RunConfig) -> bool:
    """Whether runs of `cfg` evaluate: digits always (in memory), latent runs when eval.reference is set."""
    return cfg.data.dataset == "digits" or cfg.eval.reference is not None


def check_same_training(cfg: RunConfig, other: RunConfig, where: str) -> None:
    """ValueError unless `other` trains the same model as `cfg` (equal `srdit.techniques.training_config`)."""
    from srdit.techniques import training_config

    a, b = training_config(to_dict(cfg)), training_config(to_dict(other))
    if a != b:
        diff = sorted(
            k for k in set(flatten_dict(a)) | set(flatten_dict(b)) if flatten_dict(a).get(k) != flatten_dict(b).get(k)
        )
        raise ValueError(
            f"{where}: its config trains another model than this training (differs in "
            f"{', '.join(diff[:4])}); only sample.* / eval.* settings and evaluation-time techniques "
            f"may differ"
        )


def evaluate_target(
    ema: torch.nn.Module,
    target: Evaluation,
    step: int,
    intermediate: bool,
    device: torch.device,
    dp: DataParallel = DataParallel(),
) -> dict[str, float]:
    """Evaluate `ema` under `target.cfg` at `step` (srdit.evaluate.evaluate); rank 0 reports to `target.reporter`
    and leaves evals/step_N.json in `target.out_dir` (the record that this evaluation completed: when it exists,
    its metrics are reported again instead of evaluating twice). Latent runs sample into samples/step_N (cleared
    first: shards of other weights or another world size must not mix in), kept for the final step only (50K
    images are ~10 GB)."""
    from srdit.evaluate import evaluate

    record = target.out_dir / EVALS / f"step_{step:07d}.json"
    done = record.is_file()  # every rank sees the same folder (rank 0 wrote it before a barrier)
    dp.barrier()
    if done:
        metrics = json.loads(record.read_text())
        if dp.main:
            target.reporter.report(step, metrics)
        return metrics
    cfg = target.cfg
    folder = target.out_dir / SAMPLES / f"step_{step:07d}"
    if dp.main:
        shutil.rmtree(folder, ignore_errors=True)
    dp.barrier()
    metrics: dict[str, float] = {}
    if cfg.data.dataset != "digits" or dp.main:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = evaluate(ema, cfg, device, samples_dir=None if cfg.data.dataset == "digits" else folder)
    if dp.main:
        target.reporter.report(step, metrics)
        record.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(record, lambda f: f.write(json.dumps(metrics).encode()))
        if intermediate:
            shutil.rmtree(folder, ignore_errors=True)
    dp.barrier()
    return metrics


def finish_outputs(ema: torch.nn.Module, target: Evaluation, device: torch.device) -> None:
    """The end of a run of `target.cfg` (rank 0): the 100-image preview grid (samples.png), config.yaml, the
    metrics logs (train_metrics.jsonl / metrics.jsonl, where this run wrote them) and the evaluation JSONs (under
    `evals/`) as artifacts of its reporter."""
    cfg, out, reporter = target.cfg, target.out_dir, target.reporter
    if cfg.data.dataset == "digits" or cfg.data.tokenizer:  # latents: decoded with data.tokenizer
        from srdit.generate import generate, to_images
        from srdit.imaging import save_samples

        # The preview grid always shows class i mod 10 so that each column is one class.
        grid_cfg = dataclasses.replace(cfg.sample, balanced_labels=True)
        samples, labels, _ = generate(ema, cfg, 100, cfg.eval.seed, device, 100, sample_cfg=grid_cfg)
        images = to_images(samples, cfg, device, batch_size=25)
        png, _ = save_samples(images, labels, out, scale=max(1, 32 // images.shape[-1]))
        if hasattr(reporter, "artifact"):
            reporter.artifact(png)
    if hasattr(reporter, "artifact"):
        reporter.artifact(out / "config.yaml")
        for log in (TRAIN_LOG, "metrics.jsonl"):
            if (out / log).is_file():
                reporter.artifact(out / log)
        for ev in sorted((out / "evals").glob("*.json")):
            reporter.artifact(ev, "evals")


def snapshot_steps(run_dir: str | Path) -> list[int]:
    """Steps of the EMA snapshots a run kept (`train(..., snapshots=True)`), ascending."""
    folder = Path(run_dir) / Path(EMA_SNAPSHOT).parent
    return sorted(int(p.stem[len("ema_step") :]) for p in folder.glob("ema_step*.pt") if p.stem[8:].isdigit())


def evaluate_trained(
    run_dir: str | Path, cfg: RunConfig, out_dir: str | Path, reporter: Reporter | None = None
) -> TrainResult:
    """Evaluate a finished training (a `train(..., snapshots=True)` folder) under `cfg`, an evaluation-time variant
    of it (equal `srdit.techniques.training_config`), without training: `reporter` gets the training reports
    (`TRAIN_LOG`) and the evaluation of every kept EMA snapshot under `cfg`, the same numbers the training would
    have reported for it had `cfg` been one of its `evaluations`. A training that diverged or ran out of memory
    gives its status, reason and curve. Evaluations already recorded in `out_dir/evals` are reported from their
    record, not redone. ValueError when `run_dir` holds no finished training or `cfg` trains another model."""
    src, out = Path(run_dir), Path(out_dir)
    cfg = cfg.validate()
    if not (src / "result.json").is_file():
        raise ValueError(f"{src}: no finished training here (result.json missing); train it first")
    res = json.loads((src / "result.json").read_text())
    if "config" not in res:
        raise ValueError(f"{src}: result.json does not record its config (written by an older srdit); train it again")
    trained = from_dict(RunConfig, res["config"])
    check_same_training(trained, cfg, str(out))
    reporter = reporter or NullReporter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    rows: list[tuple[int, dict]] = []
    if (src / TRAIN_LOG).is_file():
        for line in (src / TRAIN_LOG).read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                rows.append((int(row.pop("step")), row))

    def replay(upto: float) -> None:  # training reports in step order, before the evaluation of their step
        while rows and rows[0][0] <= upto:
            reporter.report(*rows.pop(0))

    train_metrics = dict(res.get("train_metrics", {}))
    if res["status"] != "finished":
        replay(math.inf)
        return TrainResult(res["status"], res["reason"], int(res["step"]), train_metrics, out, train_metrics)
    device = resolve_device(cfg.train.device)
    target = Evaluation(cfg, out, reporter)
    final: dict[str, float] = {}
    ema = None
    # the final step's EMA is also in checkpoints/last.pt (a training that evaluated nothing kept no snapshot)
    steps = sorted(set(snapshot_steps(src)) | {int(res["step"])}) if evaluates(cfg) else []
    for at in steps:
        replay(at)
        ema = load_snapshot(src, at, trained, device)
        final = evaluate_target(ema, target, at, at < int(res["step"]), device)
    replay(math.inf)
    if ema is None:
        ema = load_snapshot(src, int(res["step"]), trained, device)
    finish_outputs(ema, target, device)
    return TrainResult("finished", "", int(res["step"]), {**train_metrics, **final}, out, train_metrics, [])


def evaluate_checkpoint(
    path: str | Path, cfg: RunConfig, out_dir: str | Path, reporter: Reporter | None = None
) -> TrainResult:
    """Evaluate the EMA weights of the checkpoint `path` (`srdit train` or `srdit convert` output) under `cfg`'s
    sample and eval settings, at the checkpoint's step, into `out_dir` (evals/, samples.png, config.yaml): a fixed
    checkpoint's evaluation arm. CheckpointError when it is not an srdit checkpoint or its model section differs
    from `cfg.model`."""
    cfg = cfg.validate()
    ckpt = load_checkpoint(path)
    model, trained = model_from_checkpoint(ckpt)
    check_same_model(cfg, trained, f"checkpoint {path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    device = resolve_device(cfg.train.device)
    model = model.to(device).requires_grad_(False)
    target = Evaluation(cfg, out, reporter or NullReporter())
    step = int(ckpt["step"])
    final = evaluate_target(model, target, step, False, device) if evaluates(cfg) else {}
    finish_outputs(model, target, device)
    return TrainResult("finished", "", step, final, out)


def check_same_model(cfg: RunConfig, other: RunConfig, what: str) -> None:
    """CheckpointError unless the model sections agree (a parameter-free switch such as the norm would otherwise
    load silently)."""
    ours, theirs = to_dict(cfg)["model"], to_dict(other)["model"]
    if ours != theirs:
        diff = [f"model.{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if ours[k] != theirs.get(k)]
        raise CheckpointError(f"{what}: another model ({'; '.join(diff[:4])})")


def load_snapshot(run_dir: str | Path, step: int, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The EMA model of a run's snapshot at `step` (final step: checkpoints/last.pt when no snapshot was kept)."""
    path = Path(run_dir) / EMA_SNAPSHOT.format(step=step)
    if not path.is_file():
        path = Path(run_dir) / CHECKPOINT
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if int(ckpt["step"]) != step:
        raise ValueError(f"{path}: holds step {ckpt['step']}, not {step}")
    model = build_model(cfg.model, cfg.ext)
    model.load_state_dict(ckpt["ema"], strict=True)
    return model.to(device).requires_grad_(False).eval()


def _result(
    out: Path,
    dp: DataParallel,
    cfg: RunConfig,
    status: str,
    reason: str,
    step: int,
    metrics: dict,
    train_metrics: dict,
    evaluations: list[dict],
) -> TrainResult:
    """The run's outcome, also left in result.json (rank 0) for whoever launched it. Ranks leave together."""
    dp.barrier()
    if dp.main:
        (out / "result.json").write_text(
            json.dumps(
                {
                    "status": status,
                    "reason": reason,
                    "step": step,
                    "metrics": metrics,
                    "train_metrics": train_metrics,
                    "config": to_dict(cfg),
                },
                indent=1,
            )
        )
    return TrainResult(status, reason, step, metrics, out, train_metrics, evaluations)
