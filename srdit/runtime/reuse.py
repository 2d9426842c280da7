"""Content keys of trainings and runs, and reuse of finished runs across studies.

A trained model is identified by its **training key**: sha256 of the resolved config's training part
(`srdit.techniques.training_config`: no sample / eval sections, only training-time techniques), the data it reads
and the code that trains it. A run (a training plus its evaluation) is identified by its **run key**: the training
key, the sample and eval sections, and the code that evaluates. Path fields enter both keys by content, never by
name: the latent index checksum for `data.path`, the teacher's weights checksum, the teacher cache's manifests, a
file's (or folder's) sha256 for checkpoints, weights and reference statistics; the embedded digits by the checksum
of the arrays srdit reads. Code enters by `srdit.provenance.training_code_version` / `evaluation_code_version`
(syntax trees without comments and docstrings): a code change that could alter a result changes the key, a comment
edit does not.

Every child run is tagged with both keys (`srdit.runtime.worker.trial_tags`). Before a study runs, each trial of its
plan that has no run in the study yet and whose run key matches a finished (`status` finished) trial run anywhere
in the same MLflow store is **adopted** (`adopt`): a child run under this study's parent with this study's tags
and params, the source's metric histories (every step), its artifacts (sample grid, config) and its runtime tags
(commit, device, versions), status finished, and tags `reused_from` / `reused_from_study` naming the run it comes
from (the origin, also when the source was itself adopted). Its `trial_dir` tag points at the folder that holds the
trained model (the origin's, or its training run's for an evaluation run of a shared training); checkpoints are not
copied. A trial whose training key (not run key) matches a finished training is evaluated from that folder instead
of trained (`srdit.runtime.driver.from_finished_trainings`). `srdit study run --no-reuse` opts out of both.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srdit.techniques import EVAL_SECTIONS, evaluation_plugins, training_config

TRAINING_KEY = "training_key"
"Tag: the training's content key (equal keys train the same model)."
RUN_KEY = "run_key"
"Tag: the run's content key (equal keys give the same metrics)."
REUSED_FROM = "reused_from"
"Tag of an adopted run: the MLflow run id of the run that trained and evaluated it."
REUSED_FROM_STUDY = "reused_from_study"
"Tag of an adopted run: the study of that run."

STUDY_TAGS = (
    "study",
    "cell",
    "seed",
    "design",
    "techniques",
    "trial_key",
    "trial_dir",
    "search.params",
    "mlflow.runName",
    "mlflow.parentRunId",
    "srdit.role",
)
"Tags that say where a run belongs: an adopted run takes these from its new study, never from its source."


# ----------------------------------------------------------------------------------------------------------------
# content keys
# ----------------------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return _sha256_file(Path(path))  # cached per (path, size, mtime): a changed file is hashed again


@functools.lru_cache(maxsize=64)
def _folder_digest(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(
            f.relative_to(root).as_posix().encode()
            + b"\0"
            + _file_digest(str(f), st.st_size, st.st_mtime_ns).encode()
            + b"\0"
        )
    return h.hexdigest()


def _folder_stamp(root: Path) -> tuple:
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()))


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and contents); "missing" when neither
    exists (the preflight refuses such a run before it trains)."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    if p.is_dir():
        return _folder_digest(str(p.resolve()), _folder_stamp(p))
    return "missing"


def _absolute(value: str, cwd: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else Path(cwd) / p


def _latent_identity(path: Path) -> str:
    from srdit.data.latents import index_fingerprint

    try:
        return "index:" + index_fingerprint(path)  # the index lists every shard file with its sha256
    except OSError:
        return "missing"


def _teacher_cache_identity(path: Path) -> str:
    """meta.json (teacher identity, latent index, grid, dim, parts) and every part's done.json (sha256 of its
    files): what decides the cache's content, without reading the tokens themselves."""
    files = [path / "meta.json", *sorted(path.glob("part-*/done.json"))]
    if not files[0].is_file():
        return "missing"
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return "cache:" + h.hexdigest()


def _teacher_identity(name: str, path: Path | None) -> str:
    from srdit.train import teacher_identity

    try:
        return json.dumps(teacher_identity(name, None if path is None else str(path)), sort_keys=True)
    except (OSError, ValueError):
        return "missing"


def _identities(config: Mapping[str, Any], cwd: str | os.PathLike) -> dict[str, Any]:
    """Dotted path field -> the content identity that stands for it in a key (fields that are set only)."""
    from srdit.config import PATH_FIELDS

    out: dict[str, Any] = {}
    data = config.get("data", {})
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = config.get(section, {}).get(name)
        if not value:
            continue
        path = _absolute(value, cwd)
        if key == "data.path" and data.get("dataset") == "latents":
            out[key] = _latent_identity(path)
        elif key == "data.teacher_cache":
            out[key] = _teacher_cache_identity(path)
        elif key == "data.teacher_path":
            out[key] = _teacher_identity(data.get("teacher", ""), path)
        else:
            out[key] = content_digest(path)
    return out


def data_fingerprint(config: Mapping[str, Any], cwd: str | os.PathLike = ".") -> dict[str, Any]:
    """What identifies the training data of a resolved config: the digits' array checksum for the embedded
    default; for latents the index checksum (`srdit.data.latents.index_fingerprint`) via the path identities."""
    data = config.get("data", {})
    if data.get("dataset", "digits") == "digits":
        return {"dataset": "digits", "content": digits_fingerprint()}
    return {"dataset": data.get("dataset")}


@functools.lru_cache(maxsize=1)
def digits_fingerprint() -> str:
    """sha256 of scikit-learn's bundled digits file (`sklearn/datasets/data/digits.csv.gz`, what `load_digits`
    and so `srdit.data.digits` read), found without importing scikit-learn (or torch: the driver stays light);
    if the file is not where it was, of the arrays `srdit.data.digits` reads."""
    from srdit.config import digits_file

    path = digits_file()
    if path is not None:
        return "csv:" + _sha256_file(path)[:16]
    import numpy as np

    from srdit.data.digits import load_digits_split

    split = load_digits_split()
    h = hashlib.sha256()
    for t in (split.train_x, split.train_y, split.test_x, split.test_y):
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return "arrays:" + h.hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _by_content(part: Mapping[str, Any], identities: Mapping[str, Any]) -> dict:
    """`part` (a nested config dict) with every path field replaced by its content identity."""
    out = json.loads(json.dumps(part, default=str))
    for key, ident in identities.items():
        section, name = key.split(".")
        if section in out and name in out[section]:
            out[section][name] = ident
    return out


def content_keys(config: Mapping[str, Any], cwd: str | os.PathLike = ".") -> dict[str, str]:
    """{TRAINING_KEY, RUN_KEY} of a resolved config (`srdit.config.to_dict` form; relative paths are meant from
    `cwd`). 20-hex-digit sha256 prefixes; see the module docstring for what each covers."""
    from srdit.provenance import evaluation_code_version, plugin_versions, training_code_version

    identities = _identities(config, cwd)
    train = _by_content(training_config(config), identities)
    training_part = {"config": train, "data": data_fingerprint(config, cwd), "code": training_code_version()}
    evaluation = _by_content({s: config.get(s, {}) for s in EVAL_SECTIONS}, identities)
    run_part = {"evaluation": evaluation, "code": evaluation_code_version()}
    # Plugin techniques (`srdit.ext`) enter only the keys of the cells where they are on, by their code version;
    # a config without plugins is keyed exactly as before plugins existed.
    ext = config.get("ext", {})
    if plugin_versions(ext, "train"):
        training_part["plugins"] = plugin_versions(ext, "train")
    if evaluation_plugins(config):
        run_part |= {"ext": evaluation_plugins(config), "plugins": plugin_versions(ext, "eval")}
    training = _digest(training_part)
    run = _digest({"training": training, **run_part})
    return {TRAINING_KEY: training, RUN_KEY: run}


# ----------------------------------------------------------------------------------------------------------------
# finding and adopting finished runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A finished run whose results a trial can adopt."""

    run: Any
    "The MLflow run found (its metrics, params, tags and artifacts are copied)."
    origin_run_id: str
    "The run that trained it (the source itself, or the run it was adopted from)."
    study: str
    "The study of the origin run."
    trial_dir: str
    """The trial folder that holds the trained model: the origin's own, or for an evaluation run of a shared
    training (tag `train_run_id`) its training run's."""
    train_run_id: str
    "The run whose folder `trial_dir` is (the training run)."


def source_of(run, client=None) -> Source:
    """The `Source` of a finished run; `client` looks up the training run of an evaluation run."""
    from srdit.runtime.tracking import retry

    tags = run.data.tags
    folder, train_run = tags.get("trial_dir", ""), run.info.run_id
    if tags.get("train_run_id") and client is not None:  # an evaluation run: the model is in its training's folder
        with contextlib.suppress(Exception):
            folder = retry(client.get_run, tags["train_run_id"]).data.tags.get("trial_dir", folder)
            train_run = tags["train_run_id"]
    return Source(
        run,
        tags.get(REUSED_FROM) or run.info.run_id,
        tags.get(REUSED_FROM_STUDY) or tags.get("study", ""),
        folder,
        train_run,
    )


def _store_exists(uri: str) -> bool:
    if uri.startswith("sqlite:"):
        return Path(uri[len("sqlite:///") :]).exists()
    return True


def find_sources(
    uri: str, keys: Mapping[str, str], tag: str = RUN_KEY, exclude_study: str | None = None
) -> dict[str, Source]:
    """trial key -> a finished trial run in the store at `uri` (any experiment, any study but `exclude_study`)
    whose `tag` equals the trial's content key (`keys`: trial key -> content key). An original run is preferred to
    an adopted one, a training run to an evaluation run, then the earliest. Reads only: a store that does not
    exist yet gives {} (and is not created)."""
    if not keys or not _store_exists(uri):
        return {}
    from mlflow import MlflowClient

    from srdit.runtime.tracking import ROLE_TAG

    client = MlflowClient(uri)
    experiments = _experiment_ids(client)
    if not experiments:
        return {}
    found: dict[str, Any] = {}
    for key in sorted(set(keys.values())):
        runs = []
        for chunk in range(0, len(experiments), 100):
            runs += _search(
                client,
                experiments[chunk : chunk + 100],
                f"tags.{tag} = '{key}' and tags.status = 'finished' and tags.`{ROLE_TAG}` = 'trial'",
            )
        runs = [
            r
            for r in runs
            if r.info.status == "FINISHED" and (exclude_study is None or r.data.tags.get("study") != exclude_study)
        ]
        if runs:
            # an original run before an adopted one, a training run before an evaluation run, then the earliest
            found[key] = min(
                runs, key=lambda r: (REUSED_FROM in r.data.tags, "train_run_id" in r.data.tags, r.info.start_time or 0)
            )
    return {trial: source_of(found[k], client) for trial, k in keys.items() if k in found}


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    from srdit.runtime.tracking import retry

    runs, token = [], None
    while True:
        page = retry(client.search_runs, experiment_ids, filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client) -> list[str]:
    from srdit.runtime.tracking import retry

    ids, token = [], None
    while True:
        page = retry(client.search_experiments, max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def adopt(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    trial_key: str,
    run_name: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any],
    source: Source,
) -> str:
    """Create the child run of `trial_key` under `parent_run_id` from a finished `source`: the source's metric
    histories (every step, the source's timestamps), artifacts and non-study tags; this study's `tags` and
    `params`; `trial_dir` = the origin's folder; `reused_from` / `reused_from_study`; status finished. Returns the
    new run id. A failure part-way leaves a run that is not done (a rerun adopts again or trains)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from srdit.runtime.tracking import KEY_TAG, PARENT_TAG, ROLE_TAG, ChildRun, retry

    client = MlflowClient(uri)
    src = source.run
    run = retry(
        client.create_run,
        experiment_id,
        run_name=run_name,
        tags={PARENT_TAG: parent_run_id, KEY_TAG: trial_key, ROLE_TAG: "trial", "status": "adopting"},
    )
    child = ChildRun(uri, run.info.run_id, reused=False)
    kept = {
        k: v
        for k, v in src.data.tags.items()
        if k not in STUDY_TAGS
        and not k.startswith("tech.")
        and k not in ("status", "status_reason")
        and not (k.startswith("mlflow.") and k != "mlflow.source.git.commit")
    }
    child.log_params(params)
    child.log_tags(
        {
            **kept,
            **tags,
            "mlflow.runName": run_name,
            "trial_dir": source.trial_dir,
            REUSED_FROM: source.origin_run_id,
            REUSED_FROM_STUDY: source.study,
        }
    )
    history = []
    for key in src.data.metrics:
        history += [
            Metric(key, m.value, m.timestamp, m.step) for m in retry(client.get_metric_history, src.info.run_id, key)
        ]
    for i in range(0, len(history), 1000):
        retry(client.log_batch, run.info.run_id, metrics=history[i : i + 1000])
    _copy_artifacts(client, src.info.run_id, run.info.run_id)
    retry(
        client.log_batch,
        run.info.run_id,
        tags=[RunTag("status", "finished"), RunTag("status_reason", src.data.tags.get("status_reason", ""))],
    )
    retry(client.set_terminated, run.info.run_id, "FINISHED")
    return run.info.run_id


def _copy_artifacts(client, src_id: str, dst_id: str) -> None:
    from srdit.runtime.tracking import retry

    if not retry(client.list_artifacts, src_id):
        return
    with tempfile.TemporaryDirectory(prefix="srdit-adopt-") as tmp:
        local = retry(client.download_artifacts, src_id, "", tmp)
        retry(client.log_artifacts, dst_id, local)


def reused_counts(runs: Iterable) -> dict[str, int]:
    """Study -> number of the given runs adopted from it (`reused_from_study`)."""
    out: dict[str, int] = {}
    for r in runs:
        study = r.data.tags.get(REUSED_FROM_STUDY) if r.data.tags.get(REUSED_FROM) else None
        if study is not None:
            out[study] = out.get(study, 0) + 1
    return out


def format_reused(counts: Mapping[str, int], total: int, verb: str = "reused") -> str:
    """ "12 of 16 trials reused from study digits_quick" (several studies: "... from study a (8), study b (4)")."""
    n = sum(counts.values())
    if len(counts) == 1:
        where = f"study {next(iter(counts))}"
    else:
        where = ", ".join(f"study {s} ({k})" for s, k in sorted(counts.items(), key=lambda x: -x[1]))
    return f"{n} of {total} trials {verb} from {where}"
