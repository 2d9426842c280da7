"""Preflight of a study: nothing launches that cannot finish.

Before any trial starts, `srdit study plan` prints and `srdit study run` refuses (exit 2, nothing recorded in
MLflow) when
- an input a trial will read is missing or unusable (every path field of every trial's config, checked by
  `srdit.inputs.input_problems`, each with the `srdit` command that makes it);
- `metrics.primary` / `metrics.others` name a metric these runs do not report (from the metric registry's
  producers of the trials' `data.dataset` and evaluation settings);
- a trial cannot fit the cluster: its CPUs / GPUs, and for a data-parallel trial every worker's bundle, against
  what the nodes have (a bundle must fit on one node).

All problems come in one message.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from srdit.config import ConfigError, RunConfig, from_dict
from srdit.metric_registry import produced_by, run_producers
from srdit.study.spec import StudySpec

HOST_TRIAL_CPU = 0.0
"""CPUs the Tune trial hosting a data-parallel run reserves itself: none. It only waits on its workers, whose
bundles hold the CPUs and GPUs, so that workers x cpus equal to a machine's cores fits on that machine."""


class PreflightError(ConfigError):
    """The study cannot run as configured; `problems` lists why (one line each)."""

    def __init__(self, study: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"study {study} cannot run: {len(problems)} problem(s); nothing was started\n{lines}")


def reported_metrics(cfg: RunConfig) -> set[str]:
    """Metrics a trial with this config reports: training, its evaluation's (latent runs evaluate only with
    eval.reference; KD_DINOv2 only with eval.dinov2_path) and the trial's own."""
    producers = list(run_producers(cfg.data.dataset))
    if cfg.data.dataset != "digits" and not cfg.eval.reference:
        producers = [p for p in producers if p != "latents"]
    names = set(produced_by(*producers))
    if cfg.data.dataset != "digits" and not cfg.eval.dinov2_path:
        names -= {"kd_dinov2", "kd_dinov2_std"}
    return names


def _configs(spec: StudySpec, plan, trials: Iterable[Mapping] | None) -> list[tuple[str, RunConfig]]:
    """(trial key or cell, config) of the trials to check. A search checks the baseline cell and each
    technique alone (its samples combine those diffs)."""
    if trials is None:
        trials = [t.to_dict() for t in plan.trials]
    out = [(t["key"], from_dict(RunConfig, t["config"])) for t in trials]
    if spec.design.kind == "search" and not out:
        from srdit.study.designs import make_cell, make_trial

        for on in [[]] + [[n] for n in spec.factor_names]:
            try:
                t = make_trial(spec, make_cell(spec, on), spec.seeds[0])
            except ConfigError:
                continue  # an invalid sample is excluded while the search runs
            out.append((t.key, from_dict(RunConfig, t.config)))
    return out


def input_and_metric_problems(
    spec: StudySpec, plan, trials: Iterable[Mapping] | None = None, cwd: str | None = None
) -> list[str]:
    """Missing inputs and unreported metrics of the trials (default: all trials of the plan), one line each; a
    problem shared by several trials is listed once with how many it concerns."""
    from srdit.inputs import input_problems

    cwd = cwd or os.getcwd()
    configs = _configs(spec, plan, trials)
    seen: dict[str, int] = {}
    reported: set[str] | None = None
    datasets = set()
    for _, cfg in configs:
        for p in input_problems(cfg, base=cwd):
            seen[str(p)] = seen.get(str(p), 0) + 1
        names = reported_metrics(cfg)
        reported = names if reported is None else reported & names
        datasets.add(cfg.data.dataset)
    n = len(configs)
    out = [p if k == n or n == 1 else f"{p} ({k} of {n} trials)" for p, k in seen.items()]
    if spec.checkpoint:  # a fixed-checkpoint study: the file every trial evaluates
        out += [str(p) for p in checkpoint_problems(spec.checkpoint, spec.base, cwd)]
    if reported is not None:
        for role, names in (("metrics.primary", [spec.metrics.primary]), ("metrics.others", list(spec.metrics.others))):
            for m in names:
                if m not in reported:
                    have = ", ".join(sorted(x for x in reported if x in set(produced_by("train", "digits", "latents"))))
                    out.append(
                        f"{role} {m}: not reported by these runs (data.dataset {'/'.join(sorted(datasets))}"
                        f"{', no eval.reference' if 'latents' in datasets and m in produced_by('latents') else ''}"
                        f"); they report: {have}"
                    )
    return out


def checkpoint_problems(path: str, cfg: RunConfig, base: str | None = None, key: str = "checkpoint") -> list:
    """A fixed checkpoint that a study evaluates (`checkpoint:`): it must exist, be an srdit checkpoint
    (`srdit.train.load_checkpoint`: `srdit train` or `srdit convert` output) and hold the model `cfg` describes.
    Loads the file (weights_only)."""
    from srdit.inputs import Problem
    from srdit.train import CheckpointError, check_same_model, load_checkpoint, model_from_checkpoint

    fix = "train one with `srdit train` (RUN/checkpoints/last.pt) or convert one with `srdit convert`"
    full = os.path.join(base or os.getcwd(), os.path.expanduser(path))
    if not os.path.exists(full):
        return [Problem(key, path, "no such checkpoint file", fix)]
    try:
        trained = model_from_checkpoint(load_checkpoint(full))[1]
    except CheckpointError as e:
        text = str(e)
        return [Problem(key, path, text[len(full) + 2 :] if text.startswith(full + ": ") else text, fix)]
    try:
        check_same_model(cfg, trained, "the study's base")
    except CheckpointError as e:
        return [Problem(key, path, str(e), "set base.model to the checkpoint's model")]
    return []


def _fmt(res: Mapping[str, float]) -> str:
    parts = [f"{res.get('CPU', 0):g} CPU"]
    if res.get("GPU"):
        parts.append(f"{res['GPU']:g} GPU")
    return " + ".join(parts)


def trial_bundles(spec: StudySpec) -> list[dict[str, float]]:
    """The resource bundles one trial reserves: its own process, or one per data-parallel worker (the hosting
    Tune trial reserves `HOST_TRIAL_CPU`)."""
    r = spec.resources
    if r.workers == 1:
        return [{"CPU": float(r.cpus), "GPU": float(r.gpus)}]
    return [{"CPU": float(r.cpus), "GPU": float(r.gpus_per_worker)} for _ in range(r.workers)]


def resource_problems(spec: StudySpec, nodes: list[Mapping[str, float]], where: str) -> list[str]:
    """Whether one trial fits `nodes` (each node's total CPU / GPU): every bundle on some node, all bundles
    together (placement groups pack bundles onto nodes); [] when it fits, else one line saying what it needs
    and what exists."""
    bundles = trial_bundles(spec)
    b = bundles[0]

    def fits(node: Mapping[str, float]) -> int:  # how many bundles of this shape one node holds
        k = [
            node.get("CPU", 0) // b["CPU"] if b["CPU"] else float("inf"),
            node.get("GPU", 0) // b["GPU"] if b["GPU"] else float("inf"),
        ]
        return int(min(min(k), len(bundles)))

    if sum(fits(n) for n in nodes) >= len(bundles):
        return []
    r = spec.resources
    need = (
        f"{_fmt(b)}"
        if len(bundles) == 1
        else f"{len(bundles)} workers x {_fmt(b)} = {_fmt({'CPU': r.cpus * r.workers, 'GPU': r.gpus})}, each "
        f"worker's share on one node"
    )
    have = "; ".join(f"node {i}: {_fmt(n)}" for i, n in enumerate(nodes)) if len(nodes) > 1 else _fmt(nodes[0])
    return [
        f"resources: a trial needs {need}; {where} has {have} (lower resources.cpus / gpus / workers, or run "
        f"on a larger cluster with RAY_ADDRESS / --address)"
    ]


def check(
    spec: StudySpec,
    plan,
    trials: Iterable[Mapping] | None = None,
    nodes: list | None = None,
    where: str = "this machine",
) -> None:
    """Raise PreflightError listing every problem (inputs, metrics, and resources when `nodes` are given)."""
    problems = input_and_metric_problems(spec, plan, trials)
    if nodes is not None:
        problems += resource_problems(spec, nodes, where)
    if problems:
        raise PreflightError(spec.name, problems)
