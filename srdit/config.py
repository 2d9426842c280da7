"""Run configuration: frozen dataclasses, strict YAML loading, dotted overrides, and the size and tokenizer tables.

A run is fully described by a `RunConfig`. YAML is loaded strictly: an unknown key or a wrong type raises a
`ConfigError` naming the YAML path and the allowed keys or values. Cross-field rules (`RunConfig.validate`) say
what to change. Techniques (named config diffs), the presets and the run-YAML loader build on this module in
`srdit.techniques`; this module imports only the standard library and yaml (no torch: `srdit study plan`, the
analysis and the CLI's argument checks read it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the YAML."""


SIZES: dict[str, tuple[int, int, int]] = {
    "debug": (6, 64, 4),  # trains on 8x8 digits on a 2-core CPU in about a minute; head dim 16 (2-D RoPE needs 4 | d)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
"Backbone sizes: name -> (depth, hidden width, heads). SiT/DiT sizes as in Peebles & Xie 2023, Table 1."

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
    dense_in: int = 2
    "Dense encoder blocks before the sparse path (f)."
    dense_out: int = 2
    "Dense decoder blocks after the fusion (h)."
    drop_ratio: float = 0.75
    "Fraction of tokens dropped from the sparse path in training (none are dropped at inference)."
    path_drop_prob: float = 0.05
    "Probability per step of replacing the whole sparse path by the [MASK] token (path-drop learning)."


@dataclass(frozen=True)
class RopeConfig:
    """2-D axial rotary position embedding on q and k, on top of the absolute sin-cos positions (EVA-02 style)."""

    enabled: bool = False
    "Rotate queries and keys by their row / column index."
    theta: float = 10000.0
    "Base of the rotary frequencies."


@dataclass(frozen=True)
class RepaConfig:
    """REPA: align an intermediate hidden state with a frozen teacher's patch tokens (Yu et al. 2024)."""

    enabled: bool = False
    "Add the projector and the alignment output."
    depth: int = 2
    "Align the hidden state after this many blocks (SR-DiT: 2, the end of the SPRINT dense encoder)."
    projector_dim: int = 256
    "Hidden width of the 3-layer projector MLP (SR-DiT: 2048)."
    teacher_dim: int = 64
    "Width of the teacher's tokens (digits teacher: 64; DINOv2-B: 768)."


@dataclass(frozen=True)
class RegConfig:
    """REG: a noised teacher class token denoised jointly with the image (Wu et al. 2025)."""

    enabled: bool = False
    "Prepend the class token and add its velocity head."
    dim: int = 64
    "Width of the teacher class token (digits teacher: 64; DINOv2-B: 768)."


@dataclass(frozen=True)
class ModelConfig:
    """SiT backbone and its switches. Every technique is off by default; off means absent."""

    size: str = "debug"
    "Backbone size: debug, S, B, L or XL (depth, width and heads come from the size registry)."
    patch_size: int = 2
    "Patch size of the patch embedding (1, 2 or 4); digits use 2 (16 tokens of 2x2 pixels)."
    in_channels: int = 1
    "Channels of the model input (1 for digits, 4 for SD-VAE latents, 32 for INVAE latents)."
    input_size: int = 8
    "Spatial side of the model input (8 for digits, 32 for SD-VAE at 256 px, 16 for INVAE at 256 px)."
    num_classes: int = 10
    "Number of class labels; label `num_classes` is the null label for classifier-free guidance."
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    "Block MLP: GELU(tanh) as in SiT, SwiGLU, or ReLU^2 (SR-DiT side branches)."
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
    logit_std: float = 1.0
    "Standard deviation of the logit-normal time distribution."
    time_shift: bool = False
    "Resolution-dependent time shift t' = s t / (1 + (s - 1) t) on training times and on the sampler grid."
    shift: float | None = None
    "Explicit shift s; None means s = sqrt(C * H * W / shift_base)."
    shift_base: int = 4096
    "Reference dimension of the automatic shift (SD3 / SR-DiT: 4096)."


@dataclass(frozen=True)
class LossConfig:
    """Weights of the named loss terms, applied in one place (`srdit.transport.losses.total`)."""

    repa: float = 0.5
    "Weight of the REPA negative-cosine term (used when model.repa is enabled)."
    reg: float = 0.03
    "Weight of the REG class-token velocity term (used when model.reg is enabled)."
    cfm: float = 0.0
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
    teacher: str = "digits-cnn"
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

    steps: int = 1500
    "Optimisation steps."
    batch_size: int = 64
    "Global batch size."
    lr: float = 1e-3
    "AdamW learning rate (constant; SR-DiT: 1e-4)."
    betas: tuple[float, float] = (0.9, 0.999)
    "AdamW betas."
    weight_decay: float = 0.0
    "AdamW weight decay."
    grad_clip: float = 1.0
    "Global gradient-norm clip (0 = off)."
    ema_decay: float = 0.995
    "EMA decay per step (SR-DiT: 0.9999); the EMA weights are used for sampling and evaluation."
    label_dropout: float = 0.1
    "Probability of replacing a label by the null label (classifier-free guidance training)."
    seed: int = 0
    "Seed of parameters, data order and noise; a CPU run is deterministic given it."
    log_every: int = 50
    "Report training metrics every this many steps."
    eval_every: int = 0
    "Evaluate with the EMA weights every this many steps (0 = only at the end)."
    ckpt_every: int = 500
    "Write checkpoints/last.pt every this many steps (and at the end)."
    device: str = "auto"
    "auto (CUDA when available), cpu, cuda, cuda:N."
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    "auto: bf16 autocast + TF32 on CUDA, fp32 on CPU."
    compile: bool = False
    "Wrap the model in torch.compile."
    threads: int = 0
    "CPU threads for torch (0 = leave torch's default)."


@dataclass(frozen=True)
class SampleConfig:
    """Sampler used for previews and evaluation."""

    sampler: Literal["sde", "euler", "heun"] = "sde"
    "Euler-Maruyama SDE (as in the paper) or an ODE solver."
    steps: int = 50
    "Number of time steps (SDE: grid 1 -> 0.04 plus a final deterministic step; NFE equals steps without CFG)."
    cfg_scale: float = 1.0
    "Classifier-free guidance scale on the image velocity (1 = off)."
    cls_cfg_scale: float = 1.0
    "Guidance scale on the REG class-token velocity (1 = off)."
    guidance_low: float = 0.0
    "Guidance is applied only for guidance_low <= t <= guidance_high."
    guidance_high: float = 1.0
    "Upper end of the guidance interval (SR-DiT's best: 0.75)."
    path_drop_guidance: bool = False
    "The unconditional branch also drops the SPRINT sparse path (requires model.sprint)."
    balanced_labels: bool = False
    "Sample i gets class i mod num_classes (otherwise labels are drawn at random)."


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of generated samples against held-out real data."""

    n_samples: int = 1000
    "Generated samples per evaluation."
    batch_size: int = 500
    "Sampling batch size."
    seed: int = 1234
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

    def validate(self) -> "RunConfig":
        """Check cross-field rules; raise ConfigError saying what to change. Returns self."""
        m = self.model
        if m.size not in SIZES:
            raise ConfigError(f"model.size: unknown size {m.size!r}; allowed: {', '.join(SIZES)}")
        depth, hidden, heads = SIZES[m.size]
        if m.input_size % m.patch_size:
            raise ConfigError(
                f"model.patch_size: {m.patch_size} does not divide model.input_size {m.input_size}"
            )
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
            if not 0.0 <= s.drop_ratio < 1.0:
                raise ConfigError(f"model.sprint.drop_ratio: {s.drop_ratio} must be in [0, 1)")
            if not 0.0 <= s.path_drop_prob <= 1.0:
                raise ConfigError(f"model.sprint.path_drop_prob: {s.path_drop_prob} must be in [0, 1]")
        if m.repa.enabled:
            if not 1 <= m.repa.depth <= depth:
                raise ConfigError(f"model.repa.depth: {m.repa.depth} must be in 1..{depth} (the model depth)")
            if m.sprint.enabled and m.repa.depth > m.sprint.dense_in:
                raise ConfigError(
                    f"model.repa.depth ({m.repa.depth}) lies inside the SPRINT sparse path; set it <= "
                    f"model.sprint.dense_in ({m.sprint.dense_in}) as SR-DiT does (align the dense encoder output)"
                )
        if self.sample.path_drop_guidance and not m.sprint.enabled:
            raise ConfigError("sample.path_drop_guidance needs model.sprint.enabled: true (enable sprint or turn it off)")
        if not 0.0 <= self.sample.guidance_low <= self.sample.guidance_high <= 1.0:
            raise ConfigError("sample.guidance_low / guidance_high: need 0 <= low <= high <= 1")
        if self.transport.shift is not None and self.transport.shift <= 0:
            raise ConfigError(f"transport.shift: {self.transport.shift} must be > 0 (or null for automatic)")
        if self.data.dataset == "digits" and (m.in_channels, m.input_size, m.num_classes) != (1, 8, 10):
            raise ConfigError(
                "data.dataset digits is 1x8x8 with 10 classes: set model.in_channels 1, model.input_size 8, "
                "model.num_classes 10"
            )
        if self.data.dataset == "latents" and not self.data.path:
            raise ConfigError("data.path: required when data.dataset is latents (a folder of latent shards)")
        if self.data.tokenizer is not None:
            if self.data.tokenizer not in TOKENIZER_NAMES:
                raise ConfigError(f"data.tokenizer: unknown tokenizer {self.data.tokenizer!r}; allowed: "
                                  f"{', '.join(TOKENIZER_NAMES)} (or null)")
            if self.data.dataset != "latents":
                raise ConfigError("data.tokenizer: only latent runs are decoded; set data.dataset latents or "
                                  "data.tokenizer null")
            if not self.data.tokenizer_path:
                raise ConfigError(f"data.tokenizer_path: required with data.tokenizer {self.data.tokenizer} (the "
                                  f"local weights that decode the samples)")
        if self.data.dataset == "latents" and self.eval.reference and not self.data.tokenizer:
            raise ConfigError("data.tokenizer: required when eval.reference is set (samples are decoded to images "
                              "for the Inception metrics); set data.tokenizer and data.tokenizer_path")
        t = self.train
        if t.steps < 1 or t.batch_size < 1:
            raise ConfigError("train.steps and train.batch_size must be >= 1")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise ConfigError(f"train.lr: {t.lr} must be a positive finite number")
        if not 0.0 <= t.label_dropout < 1.0:
            raise ConfigError(f"train.label_dropout: {t.label_dropout} must be in [0, 1)")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: {t.ema_decay} must be in [0, 1)")
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
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
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
    names = _field_names(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown key; allowed keys{' in ' + path if path else ''}: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, where)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; every failure becomes a one-line ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: no such file")
    if p.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML file")
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
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


PATH_FIELDS = ("data.path", "data.teacher_path", "data.tokenizer_path", "data.teacher_cache", "eval.reference",
               "eval.inception_path", "eval.dinov2_path")
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
    """Apply dotted-key overrides strictly (unknown keys and wrong types raise ConfigError)."""
    tree = to_dict(config)
    for key, value in diff.items():
        nested_update(tree, key, value)
    return from_dict(RunConfig, tree)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `key=value` from the command line; the value is read as YAML (so 1e-3, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=200")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
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
