"""Where a study lives: `StudyState`, built once per command from the study and its `--state` folder.

Everything the runtime derives from (study, state folder) comes from here: the folders under the state (trial
folders, Ray results, the Optuna store, sample grids), the MLflow tracking URI, the experiment's name, and the
one way to open the study's run tree (create it, find it read-only, or fail with the command that makes it).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srdit.config import ConfigError
from srdit.runtime.lock import state_init_lock
from srdit.runtime.store import check_store, holds_runs, set_aside, sqlite_path, store_problem
from srdit.runtime.tracking import StudyTracking, is_local_store, open_study, resolve_uri

STOP_FILE = "STOP"
"The stop file in a study's trials folder (`StudyState.stop_file`); its text names the signal."


@dataclass(frozen=True)
class StudyState:
    """A study's place under a state folder. Frozen: build it once (`StudyState.of`) and pass it."""

    study: str
    "The study's name (the experiment's default name, the parent run's `study` tag, the folders below)."
    root: Path
    "The state folder, absolute (workers chdir into trial folders)."
    uri: str
    """MLflow tracking URI: the study's `tracking.uri` (a relative sqlite path made absolute), else the embedded
    store `<root>/mlflow.db`."""
    experiment: str
    "MLflow experiment name: the study's `tracking.experiment`, else its name."
    artifact_location: str | None = None
    "The study's `tracking.artifact_location` (None: srdit's default for the store)."
    study_file: str = ""
    "The study YAML (named in the messages that say which command to run)."

    @classmethod
    def of(cls, spec, state_dir: str | Path | StudyState) -> StudyState:
        """The state of `spec` (a StudySpec) under `state_dir`; a StudyState is returned as it is."""
        if isinstance(state_dir, StudyState):
            return state_dir
        root = Path(state_dir).resolve()
        return cls(
            spec.name,
            root,
            resolve_uri(spec.tracking.uri, root),
            spec.tracking.experiment or spec.name,
            spec.tracking.artifact_location,
            str(spec.path or ""),
        )

    # ------------------------------------------------------------------------------------------------------------
    # folders
    # ------------------------------------------------------------------------------------------------------------

    @property
    def trials(self) -> Path:
        "One subfolder per trial key: checkpoints, samples, locks, a data-parallel trial's outcome file."
        return self.root / "trials" / self.study

    @property
    def stop_file(self) -> Path:
        "Written by a driver told to stop (`srdit.stop`): the study's running trials checkpoint and end."
        return self.trials / STOP_FILE

    @property
    def logs(self) -> Path:
        "Log files of `study run`: what the libraries and the trial workers print (`srdit.runtime.console`)."
        return self.root / "logs" / self.study

    @property
    def ray(self) -> Path:
        "Ray Tune's (and Ray Train's) storage folder."
        return self.root / "ray_results"

    @property
    def samples(self) -> Path:
        "Sample grids downloaded for the report, one folder per cell."
        return self.root / "samples" / self.study

    @property
    def optuna_db(self) -> Path:
        "The search design's persisted Optuna study (SQLite)."
        return self.root / "optuna" / f"{self.study}.db"

    def make_folders(self) -> None:
        for p in (self.root, self.trials, self.ray):
            p.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------------------------
    # the MLflow run tree
    # ------------------------------------------------------------------------------------------------------------

    def store_exists(self) -> bool:
        """Whether the tracking store can hold runs already: a tracking server always; an SQLite store when its
        file exists (reading never creates it)."""
        return not is_local_store(self.uri) or Path(self.uri[len("sqlite:///") :]).exists()

    def check_store(self) -> None:
        """Raise `StoreDamaged` (one line, with the `srdit study repair` command) when the study's SQLite store
        exists and cannot be used (`srdit.runtime.store`)."""
        check_store(self.uri, self.study_file or self.study, self.root)

    def open(self, tags: Mapping[str, Any] | None = None, echo=None) -> StudyTracking:
        """Find or create the study's experiment and parent run (the driver; `tags` on a new parent run). A new
        SQLite store is built aside and moved in complete (`ensure_store`); a damaged one that holds no run yet
        (a creation killed by an older srdit) is set aside and built again, said in one line to `echo`; a damaged
        one with runs raises `StoreDamaged`."""
        db = sqlite_path(self.uri)
        with state_init_lock(self.root) if db is not None else contextlib.nullcontext():
            if db is not None and db.exists() and store_problem(db) and not holds_runs(db):
                kept = set_aside(db)
                (echo or (lambda s: print(s, file=sys.stderr, flush=True)))(
                    f"the MLflow store {db} was left half-built with no runs in it; kept as {kept.name}, "
                    "building a new one"
                )
            self.check_store()
        return open_study(
            self.uri, self.experiment, self.study, self.root, artifact_location=self.artifact_location, tags=tags
        )

    def find(self) -> StudyTracking | None:
        """The study's experiment and parent run if they exist; creates nothing (None without a store or run)."""
        if not self.store_exists():
            return None
        self.check_store()
        return open_study(self.uri, self.experiment, self.study, self.root, create=False)

    def tracking(self) -> StudyTracking:
        """As `find`, for the commands that read a study: ConfigError (one line) when the study has not run."""
        run = f"run `srdit study run {self.study_file or self.study}` first"
        if not self.store_exists():
            raise ConfigError(f"no MLflow store at {self.uri[len('sqlite:///') :]}; {run}")
        tracking = self.find()
        if tracking is None:
            raise ConfigError(f"study {self.study} has no runs in {self.uri}; {run}")
        return tracking

    def existing_runs(self) -> dict:
        """Trial key -> child run of the study as recorded so far (`StudyTracking.children_by_key`); {} when the
        study has no store or run yet. Creates nothing."""
        tracking = self.find()
        return tracking.children_by_key() if tracking else {}


__all__ = ["StudyState"]
