"""The typed jobs the driver hands to the workers: what one Ray trial runs, resolved once in the driver.

- `TrialJob`: one trial of the plan (a cell x seed) as a worker runs it: its `TrialSpec`, its resolved `RunConfig`
  (paths made absolute against the driver's working directory), its content keys, and where it stands (the child
  run to continue; a done member of a shared training).
- `TrainingJob`: one Ray trial that trains: a trial alone, or a training of the plan shared by its members.
- `EvaluationJob`: one Ray trial that trains nothing: its members are evaluated from a fixed checkpoint, or from a
  finished training of another study (`srdit.runtime.reuse`).
- `SearchSample`: a search design's sample as Ray Tune draws it (technique switches and knob values); the worker
  makes its `TrialJob` (the driver never sees a sample's config).

A grid's jobs reach the workers once, through Ray's object store (`tune.with_parameters`); a Tune trial's config
names its job by key (Tune would swap an object in its param space for a placeholder in the driver's view). The
keys travel with the job: a worker records them and never recomputes them. It checks instead that it runs
the code the driver keyed (`check_job`: a node with another srdit version raises `JobMismatch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srdit.config import RunConfig, from_dict, resolve_paths
from srdit.study.designs import TrialSpec, trial_key


class JobMismatch(RuntimeError):
    """A worker received a job it cannot run as the driver meant it (another code version, a corrupt job). Not a
    result of the trial's configuration: it surfaces as an infrastructure failure of the Ray trial."""


@dataclass(frozen=True)
class ContentKeys:
    """A trial's content keys (`srdit.runtime.reuse.content_keys`), computed once by the driver, and the code
    versions that entered them."""

    training: str
    "The training's content key: the `training_key` tag (equal keys train the same model)."
    run: str
    "The run's content key: the `run_key` tag (equal keys give the same metrics)."
    training_code: str
    "`srdit.provenance.training_code_version()` in the driver."
    evaluation_code: str
    "`srdit.provenance.evaluation_code_version()` in the driver."

    @classmethod
    def of(cls, config: Mapping[str, Any], cwd: str | Path) -> ContentKeys:
        """The keys of a resolved config dict (relative paths meant from `cwd`)."""
        from srdit.provenance import evaluation_code_version, training_code_version
        from srdit.runtime.reuse import RUN_KEY, TRAINING_KEY, content_keys

        keys = content_keys(config, cwd)
        return cls(keys[TRAINING_KEY], keys[RUN_KEY], training_code_version(), evaluation_code_version())

    def tags(self) -> dict[str, str]:
        """The MLflow tags of the keys: {`training_key`, `run_key`}."""
        from srdit.runtime.reuse import RUN_KEY, TRAINING_KEY

        return {TRAINING_KEY: self.training, RUN_KEY: self.run}


@dataclass(frozen=True)
class TrialJob:
    """One trial of the plan as a worker runs it."""

    trial: TrialSpec
    "The plan's trial: key, cell, techniques, seed, the config as planned (the run's params), knobs, block."
    config: RunConfig
    "The resolved config the worker trains / evaluates: the plan's, with paths absolute (`resolve_paths`)."
    keys: ContentKeys
    "Content keys, computed once by the driver."
    run_id: str | None = None
    "The child run to continue (an unfinished one: the trainer resumes from its checkpoint), else None."
    done: bool = False
    "A done member of a shared training: kept for its folder and run id, not run again."
    trial_dir: str = ""
    'A done member: the folder that holds its trained model (an adopted run: its source\'s); "": its own.'

    @property
    def key(self) -> str:
        return self.trial.key

    @property
    def cell(self) -> str:
        return self.trial.cell

    @property
    def seed(self) -> int:
        return self.trial.seed

    def with_run(self, run_id: str | None, done: bool = False, trial_dir: str = "") -> TrialJob:
        return dataclasses.replace(self, run_id=run_id, done=done, trial_dir=trial_dir)


def trial_job(trial: TrialSpec, cwd: str | Path, run_id: str | None = None) -> TrialJob:
    """The job of a planned trial: its config resolved against `cwd` (the driver's working directory: relative
    paths in the study are meant from there) and its content keys."""
    return TrialJob(
        trial, resolve_paths(from_dict(RunConfig, trial.config), cwd), ContentKeys.of(trial.config, cwd), run_id
    )


@dataclass(frozen=True)
class TrainingJob:
    """One Ray trial that trains: one trial (`members` of one), or one training of the plan (`Plan.trainings`)
    shared by its members: it trains once in the training run's folder and evaluates every member under its own
    settings (`srdit.runtime.worker.execute_group`)."""

    members: tuple[TrialJob, ...]
    "The members in plan order, the training run first; done ones are not run again."
    group: str = ""
    "The plan's training group key (the `training_group` tag of a shared training's runs); \"\" for a trial alone."

    @property
    def key(self) -> str:
        "The Ray trial's name: the training run's trial key."
        return self.members[0].key

    def todo(self) -> list[TrialJob]:
        return [m for m in self.members if not m.done]


@dataclass(frozen=True)
class EvaluationJob:
    """One Ray trial that trains nothing: every member is evaluated from `source` (`srdit.runtime.worker.
    evaluate_from`), a fixed checkpoint file of the study, or the folder of a finished training of another study
    whose training key the members share (`from_study` set)."""

    members: tuple[TrialJob, ...]
    "The trials to evaluate (none done)."
    source: str
    "A checkpoint file (a fixed-checkpoint study) or a finished training's folder."
    group: str = ""
    "The plan's training group key of the members (the `training_group` tag of a reused training's runs)."
    source_run_id: str | None = None
    "A reused training: the MLflow run that trained it (the `train_run_id` tag)."
    from_study: str | None = None
    "A reused training: the study that trained it; None for a fixed checkpoint."

    @property
    def key(self) -> str:
        return self.members[0].key

    def todo(self) -> list[TrialJob]:
        return list(self.members)


Job = TrainingJob | EvaluationJob
"What one Ray trial of a grid design runs."


@dataclass(frozen=True)
class SearchSample:
    """A search design's sample: the technique switches and knob values Ray Tune drew (from its `tech.<name>` and
    knob entries of the trial's config)."""

    on: tuple[str, ...]
    "Techniques switched on, in the study's order."
    knobs: dict = field(default_factory=dict)
    "Knob key -> value (the study's `design.space`)."

    @classmethod
    def from_tune(cls, config: Mapping[str, Any], spec) -> SearchSample:
        return cls(
            tuple(n for n in spec.factor_names if config.get(f"tech.{n}")),
            {p.key: config[p.key] for p in spec.design.space if p.key in config},
        )


def check_job(job: TrialJob) -> None:
    """What a worker checks before it runs a trial: its trial key names its planned config, and this process runs
    the code whose versions entered the keys the driver computed. Raises `JobMismatch` (one line)."""
    from srdit.provenance import evaluation_code_version, training_code_version

    t = job.trial
    if t.key.rsplit("-", 1)[-1] != trial_key("", t.seed, t.config).rsplit("-", 1)[-1]:  # the config's hash
        raise JobMismatch(f"trial {t.key}: its key does not name its config (a corrupt job)")
    here = (training_code_version(), evaluation_code_version())
    there = (job.keys.training_code, job.keys.evaluation_code)
    if here != there:
        raise JobMismatch(
            f"trial {t.key}: this worker runs other srdit code than the driver that planned it "
            f"(training / evaluation code {here[0]} / {here[1]} here, {there[0]} / {there[1]} in the "
            f"driver); install the same srdit on every node"
        )


__all__ = [
    "ContentKeys",
    "TrialJob",
    "TrainingJob",
    "EvaluationJob",
    "Job",
    "SearchSample",
    "JobMismatch",
    "trial_job",
    "check_job",
]
