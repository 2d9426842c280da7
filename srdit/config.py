"""Run configuration: frozen dataclasses, strict YAML loading, dotted overrides, and the size and tokenizer tables.

A run is fully described by a `RunConfig`. YAML is loaded strictly: an unknown key or a wrong type raises a
`ConfigError` naming the YAML path and the allowed keys or values. Every numeric field states its allowed range
once, in its `field(...)` (`ranged`, checked by the strict loader and by `RunConfig.validate`), and every float
field is finite unless its docstring says otherwise. Cross-field rules (`RunConfig.validate`) say what to change.
Every YAML file and override value is read by one loader (`parse_yaml`) that refuses a key given twice in one
mapping, a YAML 1.1 octal (`010` would be 8) or sexagesimal (`1:30` would be 90) number, a non-UTF-8 or binary
file, and a recursive or exponentially aliased document. Techniques (named config diffs), the presets and the
run-YAML loader build on this module in `srdit.techniques`; this module imports only the standard library and
yaml (no torch: `srdit study plan`, the analysis and the CLI's argument checks read it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import stat
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the YAML."""


# ----------------------------------------------------------------------------------------------------------------
# Field rules: the allowed values of a field, stated once next to it
# ----------------------------------------------------------------------------------------------------------------


INT_MAX = 2**31 - 1
"""Largest value of an integer field that states no upper bound (smallest: -INT_MAX - 1): the int32 range of the
tensor sizes and counts they become; a value beyond it (`batch_size: 100000000000000000000`) is a typo, refused
when the config loads instead of failing in an allocation."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (each element of a tuple field): `low` / `high` bounds, inclusive unless
    `low_open` / `high_open`; an integer without a bound stays within +-INT_MAX. Floats must also be finite unless
    `finite` is False (none is today)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and self.finite and not math.isfinite(v):
            return False
        low, high = self.low, self.high
        if isinstance(v, int):
            low, high = (-INT_MAX - 1 if low is None else low), (INT_MAX if high is None else high)
        if low is not None and not (v > low if self.low_open else v >= low):
            return False
        if high is not None and not (v < high if self.high_open else v <= high):
            return False
        return not (isinstance(v, float) and math.isnan(v))

    def describe(self, kind: str) -> str:
        """E.g. 'a finite number in [0, 1)', 'an integer >= 1' (the stated bounds; `check_field` adds INT_MAX)."""
        lo, hi = (
            None if x is None else str(int(x)) if float(x).is_integer() else f"{x:g}" for x in (self.low, self.high)
        )
        if lo is not None and hi is not None:
            return f"{kind} in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{kind} {'>' if self.low_open else '>='} {lo}"
        if hi is not None:
            return f"{kind} {'<' if self.high_open else '<='} {hi}"
        return kind


RANGE = "srdit.range"
PATTERN = "srdit.pattern"
CONVERT = "srdit.convert"
"Field metadata: a converter (value, path) -> value that replaces the type-driven one (the `ext` section)."
OMIT_EMPTY = "srdit.omit_empty"
"Field metadata: `to_dict` leaves the field out while it is empty (so a config without plugins serialises as before)."
FINITE = Range()
"The rule of a float field that states no range: any finite number."


def ranged(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A dataclass field with a default and its allowed range (see `Range`)."""
    return field(default=default, metadata={RANGE: Range(low, high, low_open, high_open)})


def matching(default: str, pattern: str, allowed: str) -> Any:
    """A string field whose value must match the regular expression `pattern` (`allowed` says it in words)."""
    return field(default=default, metadata={PATTERN: (re.compile(pattern), allowed)})


def check_field(f: dataclasses.Field, value: Any, path: str) -> None:
    """Raise ConfigError when `value` breaks the rule of field `f` (its Range or pattern; finite for floats)."""
    if PATTERN in f.metadata and isinstance(value, str):
        rx, allowed = f.metadata[PATTERN]
        if not rx.fullmatch(value):
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {allowed}")
        return
    rule = f.metadata.get(RANGE, FINITE)
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not rule.contains(v):
            kind = "a finite number" if isinstance(v, float) else "an integer"
            allowed = rule.describe(kind)
            if isinstance(v, int) and (v > INT_MAX and rule.high is None or v < -INT_MAX - 1 and rule.low is None):
                allowed += f", at most {INT_MAX} (int32)" if v > 0 else f", at least {-INT_MAX - 1} (int32)"
            raise ConfigError(f"{path}: {v!r} is not allowed; allowed: {allowed}")


def check_fields(obj: Any, path: str = "") -> None:
    """`check_field` on every field of a config dataclass, nested ones included (for configs built in code)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, where)
        else:
            check_field(f, value, where)


SIZES: dict[str, tuple[int, int, int]] = {
    "debug": (6, 64, 4),  # trains on 8x8 digits on a 2-core CPU in about a minute; head dim 16 (2-D RoPE needs 4 | d)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
"Backbone sizes: name -> (depth, hidden width, heads). SiT/DiT sizes as in Peebles & Xie 2023, Table 1."

SEED_MAX = 2**32 - 1
"Largest seed (train.seed, eval.seed): what every random generator srdit seeds accepts."
EVAL_MIN_SAMPLES = 4
"Fewest samples an evaluation can score: precision / recall compare each sample with its k = 3 nearest neighbours."

TEACHER_NAMES = ("digits-cnn",) + tuple(f"dinov2_vit{size}14{reg}" for size in "sblg" for reg in ("", "_reg"))
"Alignment teachers `data.teacher` may name (loaded by `srdit.encoders.load_teacher`; plain data here, without torch)."

TOKENIZER_NAMES = ("invae", "sdvae")
"Image tokenizers a latent run can be decoded with (`data.tokenizer`; loaded by `srdit.encoders.load_tokenizer`)."


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SprintConfig:
    """SPRINT sparse-dense residual fusion (Park et al. 2025; SR-DiT section 1.5)."""

    enabled: bool = False
    "Route the middle blocks over a random subset of tokens during training."
    dense_in: int = ranged(2, 1)
    "Dense encoder blocks before the sparse path (f)."
    dense_out: int = ranged(2, 0)
    "Dense decoder blocks after the fusion (h)."
    drop_ratio: float = ranged(0.75, 0, 1, high_open=True)
    "Fraction of tokens dropped from the sparse path in training (none are dropped at inference)."
    path_drop_prob: float = ranged(0.05, 0, 1)
    "Probability per step of replacing the whole sparse path by the [MASK] token (path-drop learning)."


@dataclass(frozen=True)
class RopeConfig:
    """2-D axial rotary position embedding on q and k, on top of the absolute sin-cos positions (EVA-02 style)."""

    enabled: bool = False
    "Rotate queries and keys by their row / column index."
    theta: float = ranged(10000.0, 0, low_open=True)
    "Base of the rotary frequencies."


@dataclass(frozen=True)
class RepaConfig:
    """REPA: align an intermediate hidden state with a frozen teacher's patch tokens (Yu et al. 2024)."""

    enabled: bool = False
    "Add the projector and the alignment output."
    depth: int = ranged(2, 1)
    "Align the hidden state after this many blocks (SR-DiT: 2, the end of the SPRINT dense encoder)."
    projector_dim: int = ranged(256, 1)
    "Hidden width of the 3-layer projector MLP (SR-DiT: 2048)."
    teacher_dim: int = ranged(64, 1)
    "Width of the teacher's tokens (digits teacher: 64; DINOv2-B: 768)."


@dataclass(frozen=True)
class RegConfig:
    """REG: a noised teacher class token denoised jointly with the image (Wu et al. 2025)."""

    enabled: bool = False
    "Prepend the class token and add its velocity head."
    dim: int = ranged(64, 1)
    "Width of the teacher class token (digits teacher: 64; DINOv2-B: 768)."


@dataclass(frozen=True)
class ModelConfig:
    """SiT backbone and its switches. Every technique is off by default; off means absent."""

    size: str = "debug"
    "Backbone size: debug, S, B, L or XL (depth, width and heads come from the size registry)."
    patch_size: int = ranged(2, 1)
    "Patch size of the patch embedding (1, 2 or 4); digits use 2 (16 tokens of 2x2 pixels)."
    in_channels: int = ranged(1, 1)
    "Channels of the model input (1 for digits, 4 for SD-VAE latents, 32 for INVAE latents)."
    input_size: int = ranged(8, 1)
    "Spatial side of the model input (8 for digits, 32 for SD-VAE at 256 px, 16 for INVAE at 256 px)."
    num_classes: int = ranged(10, 1)
    "Number of class labels; label `num_classes` is the null label for classifier-free guidance."
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    "Block MLP: GELU(tanh) as in SiT, SwiGLU, or ReLU^2 (SR-DiT side branches)."
    time_embed_scale: float = 1.0
    (
        "Factor on t in [0, 1] before the sinusoidal time features: 1 as SiT / REPA / SR-DiT, 1000 as DiT's integer "
        "steps."
    )
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    "Block pre-norms and final norm (no affine, eps 1e-6)."
    qk_norm: bool = False
    "RMSNorm (with affine) over the head dimension on q and k."
    value_residual: bool = False
    "Value residual learning: block i mixes block 0's values with a learned lambda_i (init 0.5)."
    rope: RopeConfig = field(default_factory=RopeConfig)
    sprint: SprintConfig = field(default_factory=SprintConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    reg: RegConfig = field(default_factory=RegConfig)


def digits_file() -> Path | None:
    """The embedded default's data: scikit-learn's bundled digits (`sklearn/datasets/data/digits.csv.gz`, the file
    `sklearn.datasets.load_digits` reads; it ships in the wheel), located without importing scikit-learn (about a
    second of every process that trains, a trial's worker included); None where it is not at that place."""
    spec = importlib.util.find_spec("sklearn")  # a top-level package: located, not imported
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def teacher_widths(cfg: ModelConfig) -> set[int]:
    """Widths of the teacher tokens the objective consumes (REPA's patch targets, REG's class token); empty when
    no technique needs a teacher. Here, not in the objective, so that the checks before a study read it without
    importing torch."""
    return ({cfg.repa.teacher_dim} if cfg.repa.enabled else set()) | ({cfg.reg.dim} if cfg.reg.enabled else set())


# ----------------------------------------------------------------------------------------------------------------
# Transport and loss
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportConfig:
    """Training times and the time shift. Convention: t = 1 noise, t = 0 data, linear path, velocity target."""

    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    "Distribution of training times before the shift."
    logit_mean: float = 0.0
    "Mean of the logit-normal time distribution."
    logit_std: float = ranged(1.0, 0, low_open=True)
    "Standard deviation of the logit-normal time distribution."
    time_shift: bool = False
    "Resolution-dependent time shift t' = s t / (1 + (s - 1) t) on training times and on the sampler grid."
    shift: float | None = ranged(None, 0, low_open=True)
    "Explicit shift s; None means s = sqrt(C * H * W / shift_base)."
    shift_base: int = ranged(4096, 1)
    "Reference dimension of the automatic shift (SD3 / SR-DiT: 4096)."


@dataclass(frozen=True)
class LossConfig:
    """Weights of the named loss terms, applied in one place (`srdit.transport.losses.total`)."""

    repa: float = ranged(0.5, 0)
    "Weight of the REPA negative-cosine term (used when model.repa is enabled)."
    reg: float = ranged(0.03, 0)
    "Weight of the REG class-token velocity term (used when model.reg is enabled)."
    cfm: float = ranged(0.0, 0)
    "Weight of contrastive flow matching (0 = off; SR-DiT: 0.05)."


# ----------------------------------------------------------------------------------------------------------------
# Data, training, sampling, evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from."""

    dataset: Literal["digits", "latents"] = "digits"
    "digits: scikit-learn's bundled 8x8 digits (embedded default); latents: pre-encoded shards on disk."
    path: str | None = None
    "Folder of latent shards (dataset: latents)."
    teacher: str = matching("digits-cnn", "|".join(map(re.escape, TEACHER_NAMES)), ", ".join(TEACHER_NAMES))
    "Alignment teacher for REPA / REG: digits-cnn (in-project) or a DINOv2 name with local weights."
    teacher_path: str | None = None
    "Local folder of the teacher's weights (DINOv2)."
    teacher_cache: str | None = None
    "Latent runs: teacher-token cache folder built by `srdit cache-teacher`; training only reads it."
    tokenizer: str | None = None
    "Tokenizer the latents were made with (invae or sdvae); needed only to decode latent samples to images."
    tokenizer_path: str | None = None
    "Local weights of the tokenizer (INVAE file or folder, SD-VAE diffusers folder); read when decoding samples."


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. Defaults are small-scale; the SR-DiT preset sets the paper's ImageNet values."""

    steps: int = ranged(1500, 0)
    "Optimisation steps (0 only with `init`: the run evaluates the given checkpoint)."
    batch_size: int = ranged(64, 1)
    "Global batch size."
    lr: float = ranged(1e-3, 0, low_open=True)
    "AdamW learning rate (constant; SR-DiT: 1e-4)."
    betas: tuple[float, float] = ranged((0.9, 0.999), 0, 1, high_open=True)
    "AdamW betas (each in [0, 1))."
    weight_decay: float = ranged(0.0, 0)
    "AdamW weight decay."
    grad_clip: float = ranged(1.0, 0)
    "Global gradient-norm clip (0 = off)."
    ema_decay: float = ranged(0.995, 0, 1, high_open=True)
    "EMA decay per step (SR-DiT: 0.9999); the EMA weights are used for sampling and evaluation."
    label_dropout: float = ranged(0.1, 0, 1, high_open=True)
    "Probability of replacing a label by the null label (classifier-free guidance training)."
    seed: int = ranged(0, 0, SEED_MAX)
    "Seed of parameters, data order and noise; a CPU run is deterministic given it."
    log_every: int = ranged(50, 1)
    "Report training metrics every this many steps."
    eval_every: int = ranged(0, 0)
    "Evaluate with the EMA weights every this many steps (0 = only at the end)."
    ckpt_every: int = ranged(500, 1)
    "Write checkpoints/last.pt every this many steps (and at the end)."
    device: str = matching("auto", r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda, cuda:N")
    "auto (CUDA when available), cpu, cuda, cuda:N."
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    "auto: bf16 autocast + TF32 on CUDA, fp32 on CPU."
    compile: bool = False
    "Wrap the model in torch.compile."
    threads: int = ranged(0, 0)
    "CPU threads for torch (0 = leave torch's default)."
    init: str | None = None
    (
        "An srdit checkpoint (e.g. from `srdit convert`) whose EMA weights start the model and its EMA; its model "
        "section must equal this run's. With steps 0 the run only evaluates it (a fixed arm of a study)."
    )


@dataclass(frozen=True)
class SampleConfig:
    """Sampler used for previews and evaluation."""

    sampler: Literal["sde", "euler", "heun"] = "sde"
    "Euler-Maruyama SDE (as in the paper) or an ODE solver."
    steps: int = ranged(50, 1)
    "Number of time steps (SDE: grid 1 -> 0.04 plus a final deterministic step; NFE equals steps without CFG)."
    cfg_scale: float = 1.0
    "Classifier-free guidance scale on the image velocity (1 = off)."
    cls_cfg_scale: float = 1.0
    "Guidance scale on the REG class-token velocity (1 = off)."
    guidance_low: float = ranged(0.0, 0, 1)
    "Guidance is applied only for guidance_low <= t <= guidance_high."
    guidance_high: float = ranged(1.0, 0, 1)
    "Upper end of the guidance interval (SR-DiT's best: 0.75)."
    path_drop_guidance: bool = False
    "The unconditional branch also drops the SPRINT sparse path (requires model.sprint)."
    balanced_labels: bool = False
    "Sample i gets class i mod num_classes (otherwise labels are drawn at random)."


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of generated samples against held-out real data."""

    n_samples: int = ranged(1000, EVAL_MIN_SAMPLES)
    "Generated samples per evaluation."
    batch_size: int = ranged(500, 1)
    "Sampling batch size."
    seed: int = ranged(1234, 0, SEED_MAX)
    "Seed of the evaluation noise and labels (independent of the training seed)."
    reference: str | None = None
    "Latent runs: reference statistics .npz (`srdit reference`, or ADM's VIRTUAL_imagenet256_labeled.npz)."
    inception_path: str | None = None
    "Latent runs: local FID Inception weights (pt_inception-2015-12-05-...pth); default $SRDIT_INCEPTION_WEIGHTS."
    dinov2_path: str | None = None
    "Latent runs: local DINOv2 folder for KD_DINOv2 (the reference must hold DINOv2 features); None skips it."


@dataclass(frozen=True)
class RunConfig:
    """One training run, fully resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    techniques: tuple[str, ...] = ()
    "Names of the techniques applied on top of the base (a record; the diffs are already in the fields)."
    ext: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict, metadata={CONVERT: lambda v, p: convert_ext(v, p), OMIT_EMPTY: True}
    )
    """Plugin techniques that are on (`srdit.ext`): plugin name -> {knob: value}, every knob of the plugin resolved.
    A plugin that is off is absent, and an empty section is left out of the serialised config (`to_dict`), so a
    config without plugins serialises, and is keyed, exactly as before plugins existed. Read-only by convention."""

    def validate(self) -> RunConfig:
        """Check every field's own rule (`check_fields`) and the cross-field rules; raise ConfigError saying what to
        change. Returns self."""
        check_fields(self)
        if self.ext:
            convert_ext(self.ext, "ext")  # knob rules of a config built in code
        m = self.model
        if m.size not in SIZES:
            raise ConfigError(f"model.size: unknown size {m.size!r}; allowed: {', '.join(SIZES)}")
        depth, hidden, heads = SIZES[m.size]
        if m.input_size % m.patch_size:
            raise ConfigError(f"model.patch_size: {m.patch_size} does not divide model.input_size {m.input_size}")
        if not (m.time_embed_scale > 0 and math.isfinite(m.time_embed_scale)):
            raise ConfigError(f"model.time_embed_scale: {m.time_embed_scale} must be a positive finite number")
        head_dim = hidden // heads
        if m.rope.enabled and head_dim % 4:
            raise ConfigError(f"model.rope: head dim {head_dim} must be divisible by 4 for 2-D RoPE")
        if m.sprint.enabled:
            s = m.sprint
            if s.dense_in < 1 or s.dense_out < 0 or s.dense_in + s.dense_out >= depth:
                raise ConfigError(
                    f"model.sprint: dense_in ({s.dense_in}) + dense_out ({s.dense_out}) must leave at least one "
                    f"sparse block in a depth-{depth} model; lower them"
                )
        if m.repa.enabled:
            if not 1 <= m.repa.depth <= depth:
                raise ConfigError(f"model.repa.depth: {m.repa.depth} must be in 1..{depth} (the model depth)")
            if m.sprint.enabled and m.repa.depth > m.sprint.dense_in:
                raise ConfigError(
                    f"model.repa.depth ({m.repa.depth}) lies inside the SPRINT sparse path; set it <= "
                    f"model.sprint.dense_in ({m.sprint.dense_in}) as SR-DiT does (align the dense encoder output)"
                )
        if self.sample.path_drop_guidance and not m.sprint.enabled:
            raise ConfigError(
                "sample.path_drop_guidance needs model.sprint.enabled: true (enable sprint or turn it off)"
            )
        if not self.sample.guidance_low <= self.sample.guidance_high:
            raise ConfigError("sample.guidance_low / guidance_high: need 0 <= low <= high <= 1")
        if self.sample.sampler == "sde" and self.sample.steps < 2:
            raise ConfigError(
                f"sample.steps: {self.sample.steps} with sample.sampler sde; the SDE sampler needs "
                f"steps >= 2 (stochastic steps plus the final Euler step), or use sampler euler / heun"
            )
        if self.data.dataset == "digits" and (m.in_channels, m.input_size, m.num_classes) != (1, 8, 10):
            raise ConfigError(
                "data.dataset digits is 1x8x8 with 10 classes: set model.in_channels 1, model.input_size 8, "
                "model.num_classes 10"
            )
        if self.data.dataset == "latents" and not self.data.path:
            raise ConfigError("data.path: required when data.dataset is latents (a folder of latent shards)")
        if self.data.tokenizer is not None:
            if self.data.tokenizer not in TOKENIZER_NAMES:
                raise ConfigError(
                    f"data.tokenizer: unknown tokenizer {self.data.tokenizer!r}; allowed: "
                    f"{', '.join(TOKENIZER_NAMES)} (or null)"
                )
            if self.data.dataset != "latents":
                raise ConfigError(
                    "data.tokenizer: only latent runs are decoded; set data.dataset latents or data.tokenizer null"
                )
            if not self.data.tokenizer_path:
                raise ConfigError(
                    f"data.tokenizer_path: required with data.tokenizer {self.data.tokenizer} (the "
                    f"local weights that decode the samples)"
                )
        if self.data.dataset == "latents" and self.eval.reference and not self.data.tokenizer:
            raise ConfigError(
                "data.tokenizer: required when eval.reference is set (samples are decoded to images "
                "for the Inception metrics); set data.tokenizer and data.tokenizer_path"
            )
        if self.train.steps == 0 and not self.train.init:
            raise ConfigError("train.steps 0 only with train.init (evaluate a given checkpoint); otherwise >= 1")
        return self

    def shift_value(self) -> float:
        """The time shift s in use (1.0 when shifting is off)."""
        tr = self.transport
        if not tr.time_shift:
            return 1.0
        if tr.shift is not None:
            return float(tr.shift)
        m = self.model
        return math.sqrt(m.in_channels * m.input_size * m.input_size / tr.shift_base)


EXTENSIONS: dict[str, type] = {}
"""Plugin name -> the frozen dataclass of its knobs (fields made with `ranged` / Literal choices), for the plugins
loaded in this process. Filled by `srdit.ext` when it loads a plugin; read here to check `ext.<name>.<knob>`."""


def convert_ext(value: Any, path: str = "ext") -> dict[str, dict[str, Any]]:
    """The `ext` section checked strictly: every name a loaded plugin (`EXTENSIONS`), every knob known and within
    its rule (the same loader as the built-in sections: `from_dict`). Returns {name: {knob: value}} with every knob
    of each plugin resolved (defaults filled in), names sorted. Raises ConfigError naming the key."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping of plugin name -> {{knob: value}}, got {value!r}")
    out = {}
    for name in sorted(value, key=str):
        where = f"{path}.{name}"
        if name not in EXTENSIONS:
            loaded = ", ".join(sorted(EXTENSIONS)) or "none"
            raise ConfigError(
                f"{where}: unknown plugin technique; loaded plugins: {loaded} (list its module or file under "
                f"`plugins:` in the run or study YAML)"
            )
        knobs = value[name] if value[name] is not None else {}
        if dataclasses.is_dataclass(knobs):
            knobs = to_dict(knobs)
        if not isinstance(knobs, Mapping):
            raise ConfigError(f"{where}: expected a mapping of knob -> value, got {knobs!r}")
        out[name] = to_dict(from_dict(EXTENSIONS[name], knobs, where))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Strict conversion dict <-> dataclass
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping with keys {', '.join(_field_names(tp))}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: null is not allowed; expected {_type_name(tp)}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" as a string; accept numeric strings for floats only.
            number = decimal_number(value)
            if number is not None:
                return number
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{path}: {value} is too large for a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in the schema, not in the YAML


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly. `path` prefixes error messages (the YAML path)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"{where}: unknown key; allowed keys{' in ' + path if path else ''}: {', '.join(fields)}")
        convert = fields[key].metadata.get(CONVERT)
        kwargs[key] = convert(value, where) if convert else _convert(hints[key], value, where)
        check_field(fields[key], kwargs[key], where)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get(OMIT_EMPTY) and not getattr(obj, f.name))
        }
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


class _Refused(yaml.YAMLError):
    """What the strict loader refuses, with the line (1-based) it is on."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.message, self.line = message, line


_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_NON_DECIMAL = re.compile(r"[-+]?0[xXbB][0-9a-fA-F_]+")
_DECIMAL = re.compile(r"[-+]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?|(?i:inf|infinity|nan))")
"""A number written in decimal, what a float field accepts as text (YAML 1.1 reads `1e-3` as a string); inf / nan
convert so that the field's range refuses them by name."""


def decimal_number(value: Any) -> float | None:
    """`value` as a float when it is text that writes a number in decimal (`1e-3`, `-2.5`, `inf`); else None.
    Python's float() also reads `1_0`, ` 1 ` and other scripts' digits: a number in a config is plain decimal."""
    return float(value) if isinstance(value, str) and _DECIMAL.fullmatch(value) else None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1: `1e-3` stays a string that float fields convert, `on` / `no` are booleans)
    without the surprises that change a value silently: a key given twice in one mapping (the later value would
    replace the earlier block), an integer with a leading zero (YAML 1.1 octal: `010` is 8), a hexadecimal or
    binary one (`0x10` is 16, `0b11` is 3) and a sexagesimal number (`1:30` is 90): numbers are decimal."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with `<<` may be overridden; complex keys fail in the constructor
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:  # unhashable: the constructor says so
                    continue
                if first is not None:
                    where = f"line {line}" if first == line else f"lines {first} and {line}"
                    raise _Refused(
                        f"key {key!r} is given twice in one mapping ({where}); the second would silently "
                        f"replace the first: merge the two into one",
                        line,
                    )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = str(node.value)
        if ":" in text:
            raise _Refused(
                f"{text} is a YAML 1.1 sexagesimal number (base 60); quote it for text or write the number in decimal",
                node.start_mark.line + 1,
            )
        if _NON_DECIMAL.fullmatch(text):
            raise _Refused(
                f"{text} is a YAML 1.1 {'hexadecimal' if text.lstrip('+-')[1] in 'xX' else 'binary'} number "
                f"({super().construct_yaml_int(node)}); write the number in decimal, or quote it for text",
                node.start_mark.line + 1,
            )
        if _OCTAL.fullmatch(text):
            raise _Refused(
                f"{text} has a leading zero, which YAML 1.1 reads as octal "
                f"({super().construct_yaml_int(node)}); write it without the leading zero, or quote it "
                f"for text",
                node.start_mark.line + 1,
            )
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        if ":" in str(node.value):
            raise _Refused(
                f"{node.value} is a YAML 1.1 sexagesimal number (base 60); quote it for text or write "
                f"the number in decimal",
                node.start_mark.line + 1,
            )
        return super().construct_yaml_float(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)
_StrictLoader.add_constructor("tag:yaml.org,2002:map", _StrictLoader.construct_yaml_map)

YAML_MAX_NODES = 100_000
"Most values a YAML document may expand to (aliases count each time they are used): a guard against alias bombs."


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text strictly (`_StrictLoader`); every failure is a one-line ConfigError starting with `source`.
    Also refused: a recursive alias and a document that expands to more than YAML_MAX_NODES values."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
        _check_tree(data, source)
    except _Refused as e:
        line = f"line {e.line}: " if len(text.strip().splitlines()) > 1 else ""
        raise ConfigError(f"{source}: {line}{e.message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    return data


def _check_tree(data: Any, source: str) -> None:
    count = 0
    open_ids: set[int] = set()

    def walk(node: Any) -> None:
        nonlocal count
        count += 1
        if count > YAML_MAX_NODES:
            raise ConfigError(
                f"{source}: expands to more than {YAML_MAX_NODES} values (aliases of aliases?); not a config"
            )
        if isinstance(node, (dict, list)):
            if id(node) in open_ids:
                raise ConfigError(f"{source}: a recursive alias (a value that contains itself); not a config")
            open_ids.add(id(node))
            for child in node.values() if isinstance(node, dict) else node:
                walk(child)
            open_ids.discard(id(node))

    walk(data)


INPUT_MAX_BYTES = 1 << 30
"Largest input file a command reads whole (a results table, a JSON): 1 GiB, far above any study's table."
YAML_MAX_BYTES = 16 << 20
"Largest YAML file (a run or study config) `read_yaml` reads: 16 MiB, far above any hand-written config."

_NOT_REGULAR = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def input_file_problem(path: str | os.PathLike, max_bytes: int | None = INPUT_MAX_BYTES) -> str | None:
    """Why a command should not read `path` as an input file, as one line naming it; None when it is a regular
    file of at most `max_bytes` (None: any size, e.g. a checkpoint, which is read in chunks by torch). Refused:
    a missing file, a folder, anything not a regular file (/dev/zero, a FIFO, a socket: reading them never ends or
    blocks), and a file over the limit. The one rule of every reader of a command's input files; checked by
    `stat`, which neither opens nor blocks."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: no such file"
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        return f"{path!r}: cannot read ({getattr(e, 'strerror', None) or e})"
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "not a file")
        return f"{path}: is {kind}, not a regular file; give the path of a file"
    if max_bytes is not None and st.st_size > max_bytes:
        return (
            f"{path}: is {_size(st.st_size)}, over the {_size(max_bytes)} limit of an input file; is it the right file?"
        )
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file (UTF-8 text, strict: `parse_yaml`); every failure becomes a one-line ConfigError naming it."""
    p = Path(path)
    try:
        if not p.exists():
            raise ConfigError(f"{path}: no such file")
        if p.is_dir():
            raise ConfigError(f"{path}: is a folder, expected a YAML file")
        problem = input_file_problem(p, YAML_MAX_BYTES)
        if problem:
            raise ConfigError(problem)
        raw = p.read_bytes()
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:  # e.g. a NUL byte in the path (ConfigError, a ValueError too, passes above)
        raise ConfigError(f"{path!r}: not a usable file name ({e})") from None
    if b"\0" in raw:
        raise ConfigError(f"{path}: is a binary file, not YAML text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); a YAML file must be UTF-8 text"
        ) from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Dotted overrides (key=value on the command line, technique diffs)
# ----------------------------------------------------------------------------------------------------------------


def nested_update(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c = value` inside a nested dict, creating levels as needed."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


PATH_FIELDS = (
    "data.path",
    "data.teacher_path",
    "data.tokenizer_path",
    "data.teacher_cache",
    "eval.reference",
    "eval.inception_path",
    "eval.dinov2_path",
    "train.init",
)
"Config fields that name files or folders."


def resolve_paths(cfg: RunConfig, base: str | os.PathLike) -> RunConfig:
    """`cfg` with relative PATH_FIELDS made absolute against `base`: a study trial runs in its own folder (Ray Tune
    changes the working directory), while paths in a study YAML are meant from where the study was started."""
    changes = {}
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not os.path.isabs(os.path.expanduser(value)):
            changes[key] = os.path.join(os.fspath(base), value)
    return apply_diff(cfg, changes) if changes else cfg


def apply_diff(config: RunConfig, diff: Mapping[str, Any]) -> RunConfig:
    """Apply dotted-key overrides strictly (unknown keys and wrong types raise ConfigError). `techniques` is not a
    setting but the record of the techniques applied (srdit.techniques.with_techniques applies and records them),
    so a diff may not write it."""
    tree = to_dict(config)
    for key, value in diff.items():
        if key == "techniques":
            raise ConfigError(
                "techniques: a list of techniques is applied by the run YAML's `techniques:` or the "
                "`techniques=[...]` override of `srdit train`, not written as a config key"
            )
        nested_update(tree, key, value)
    return from_dict(RunConfig, tree)


def convert_value(key: str, value: Any) -> Any:
    """`value` converted to the type of dotted config key `key` as the strict loader would (e.g. the string '3e-3'
    of a float field -> 0.003), so that equal values spelled differently compare equal. ConfigError when the key
    is unknown or the value does not convert."""
    cls: Any = RunConfig
    parts = key.split(".")
    if parts[0] == "ext":  # a plugin's knob: ext.<name>.<knob>
        if len(parts) != 3 or parts[1] not in EXTENSIONS:
            raise ConfigError(f"{key}: unknown config key")
        cls, parts = EXTENSIONS[parts[1]], parts[2:]
    for i, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if name not in fields:
            raise ConfigError(f"{key}: unknown config key")
        tp = typing.get_type_hints(cls)[name]
        if i == len(parts) - 1:
            out = _convert(tp, value, key)
            if not dataclasses.is_dataclass(tp):
                check_field(fields[name], out, key)
            return out
        cls = tp
    raise ConfigError(f"{key}: unknown config key")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `key=value` from the command line; the value is read as YAML (so 1e-3, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=200")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw, f"override {text!r}")
    except ConfigError as e:
        if "YAML syntax error" not in str(e):
            raise
        value = raw  # not YAML: the text itself
    return key.strip(), value


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value} (empty mappings stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten_dict(v, key))
        else:
            out[key] = v
    return out


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """Dotted-key view of a config (for MLflow params and tables)."""
    return flatten_dict(to_dict(cfg))
