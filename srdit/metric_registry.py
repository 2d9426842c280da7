"""The one list of metrics a run can report: name, direction, scale, unit, producer, curve or final value.

Every other list of metric names in srdit derives from `METRICS` (the study spec's `metrics.primary` / `others`,
the curves the report draws, the progress lines, the log-scale rule of the analysis, the records table). A metric
a run reports but that is missing here fails `tests/test_metric_registry.py`. No torch here: the config layer,
`srdit study plan` and the analysis read this module.

Producers:
- `train`: the trainer's window means, every `train.log_every` steps (loss terms, gradient norm, throughput), and
  once per run its throughput summary, or the step at which it diverged or ran out of memory;
- `digits`: `srdit.evaluate.evaluate` on the embedded digits default (in-project metric network);
- `latents`: the same on latent runs (ImageNet: FID Inception, DINOv2), see `srdit/metrics/inception.py`;
- `trial`: what the study runner adds once per trial (wall time, the trials sharing its machine).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Direction = Literal["min", "max"]
Producer = Literal["train", "digits", "latents", "trial"]


@dataclass(frozen=True)
class Metric:
    """One reported metric."""

    name: str
    "Name as reported by the run and logged to MLflow (e.g. `fid`, `loss/repa`)."
    direction: Direction
    "`min` or `max`: which way is better (the analysis orients gains so that positive = better)."
    description: str
    unit: str = ""
    "Unit shown next to values ('' for dimensionless)."
    scale: Literal["linear", "log"] = "linear"
    "`log` for throughput-like metrics: speed-ups multiply, so effects are estimated on log values."
    producers: tuple[Producer, ...] = ("train",)
    "Which kind of run reports it (see the module docstring)."
    curve: bool = True
    "Reported at several steps (drawn as a learning curve); False: a value per evaluation that is not a study metric."
    analysable: bool = True
    "Can be a study's `metrics.primary` / `others` (False for bookkeeping such as sample counts)."

    @property
    def log(self) -> bool:
        return self.scale == "log"


_EVAL = ("digits", "latents")

METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        # training, every log_every steps
        Metric("loss", "min", "total training loss (weighted sum of the terms)"),
        Metric("loss/fm", "min", "flow-matching velocity MSE"),
        Metric("loss/repa", "min", "REPA negative cosine similarity to the teacher's patch tokens"),
        Metric("loss/reg", "min", "REG class-token velocity MSE"),
        Metric(
            "loss/cfm", "min", "contrastive flow matching term (negative: pushes away from another sample's target)"
        ),
        Metric("grad_norm", "min", "global gradient norm before clipping"),
        Metric("steps_per_s", "max", "optimisation steps per second (window mean)", "steps/s", "log"),
        Metric("images_per_s", "max", "training images per second (window mean)", "images/s", "log"),
        # the run's throughput summary (once, at the end): what a study's `steps_per_s` / `images_per_s` reads
        Metric(
            "steps_per_s_median",
            "max",
            "median steps/s over the post-warm-up log windows",
            "steps/s",
            "log",
            curve=False,
        ),
        Metric(
            "images_per_s_median",
            "max",
            "median images/s over the post-warm-up log windows",
            "images/s",
            "log",
            curve=False,
        ),
        Metric(
            "throughput_windows",
            "max",
            "log windows in the throughput median",
            "windows",
            curve=False,
            analysable=False,
        ),
        # evaluation of the EMA weights: digits
        Metric(
            "fd", "min", "Frechet distance in the in-project digits metric network's features", producers=("digits",)
        ),
        Metric(
            "kd",
            "min",
            "kernel distance (KID-style, polynomial kernel) in the digits metric features",
            producers=("digits",),
        ),
        Metric("kd_std", "min", "standard deviation of kd over subsets", producers=("digits",)),
        Metric("precision", "max", "improved precision (k-NN manifold, k = 3)", producers=_EVAL),
        Metric("recall", "max", "improved recall (k-NN manifold, k = 3)", producers=_EVAL),
        # evaluation: latent runs (ImageNet)
        Metric("fid", "min", "FID against eval.reference (pytorch-fid Inception, pool3)", producers=("latents",)),
        Metric("sfid", "min", "sFID (spatial Inception features, mixed_6/conv)", producers=("latents",)),
        Metric("inception_score", "max", "Inception Score (5000-sample splits, as ADM)", producers=("latents",)),
        Metric(
            "inception_score_std",
            "min",
            "standard deviation of the Inception Score over splits",
            producers=("latents",),
        ),
        Metric("kd_dinov2", "min", "kernel distance in DINOv2 ViT-L/14 features", producers=("latents",)),
        Metric("kd_dinov2_std", "min", "standard deviation of kd_dinov2 over subsets", producers=("latents",)),
        Metric(
            "n",
            "max",
            "number of generated samples evaluated",
            "samples",
            producers=_EVAL,
            curve=False,
            analysable=False,
        ),
        Metric(
            "nfe",
            "min",
            "network evaluations per sample of the sampler (guidance counts twice)",
            producers=_EVAL,
            curve=False,
            analysable=False,
        ),
        # once per trial
        Metric("trial_wall_s", "min", "wall time of the trial", "s", "log", ("trial",), curve=False),
        Metric(
            "trials_on_host",
            "min",
            "most trials of the study running on the trial's machine at once while it ran "
            "(1 = alone: its wall-clock metrics are free of contention)",
            "trials",
            producers=("trial",),
            curve=False,
            analysable=False,
        ),
        # once per failed run (the trainer)
        Metric(
            "diverged_step",
            "max",
            "step at which the loss or gradient became non-finite",
            curve=False,
            analysable=False,
        ),
        Metric("oom_step", "max", "step at which the run ran out of memory", curve=False, analysable=False),
    ]
}

QUALITY_ORDER = ("fid", "fd", "kd_dinov2", "kd", "sfid", "inception_score", "precision", "recall")
"Headline sample-quality metrics, most standard first: a progress line shows the first one a run reports."


def metric(name: str) -> Metric:
    """The registry entry of `name`; KeyError naming the allowed metrics when unknown."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; allowed: {', '.join(analysable())}") from None


def analysable() -> list[str]:
    """Names a study may use as `metrics.primary` / `others`."""
    return [n for n, m in METRICS.items() if m.analysable]


def curves() -> list[str]:
    """Names drawn as learning curves (reported at several steps)."""
    return [n for n, m in METRICS.items() if m.curve]


def produced_by(*producers: Producer) -> list[str]:
    """Names reported by any of `producers` (e.g. `produced_by("train", "latents")` for an ImageNet trial)."""
    return [n for n, m in METRICS.items() if set(m.producers) & set(producers)]


def run_producers(dataset: str) -> tuple[Producer, ...]:
    """What a run on `data.dataset` reports: training metrics, its evaluation's metrics, the trial's own."""
    return ("train", "digits" if dataset == "digits" else "latents", "trial")


def is_log(name: str) -> bool:
    """Throughput-like metrics (speed-ups multiply) are analysed on the log scale. Names outside the registry
    (any CSV column of `srdit analyze`) follow the registry's naming rule: `*per_s*` or `throughput*`."""
    m = METRICS.get(name)
    return m.log if m is not None else ("per_s" in name or name.startswith("throughput"))


SUMMARY = {"steps_per_s": "steps_per_s_median", "images_per_s": "images_per_s_median"}
"Curve metric -> the run's summary of it, which a study table reads when the run has it."

WALL_CLOCK = ("steps_per_s", "images_per_s", "steps_per_s_median", "images_per_s_median", "trial_wall_s")
"Metrics measured with a clock: they carry the machine's load (other trials running), not only the configuration."


def direction(name: str) -> Direction:
    return metric(name).direction


def headline(names: Iterable[str], primary: str | None = None) -> list[str]:
    """The metrics a progress line shows from `names` (what one report carries): the study's primary metric
    first, then the first headline quality metric, the loss and the throughput."""
    names = list(names)
    out = [primary] if primary in names else []
    quality = next((q for q in QUALITY_ORDER if q in names), None)
    for k in (quality, "loss", "images_per_s"):
        if k is not None and k in names and k not in out:
            out.append(k)
    return out
