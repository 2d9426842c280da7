"""MLflow child runs of a study -> `StudyResults` (the analysis/report input): one table row per trial, the metric
curves, one sample grid per cell, the excluded cells and the design's alias structure."""

from __future__ import annotations

import datetime as _dt
import math
import os
from pathlib import Path

import pandas as pd

from srdit import metric_registry
from srdit.analysis.results import CRASH_CAUSE, CURVE_COLUMNS, RUN_ID, TABLE_BASE_COLUMNS, StudyResults
from srdit.runtime.reuse import REUSED_FROM, REUSED_FROM_STUDY
from srdit.runtime.state import StudyState
from srdit.runtime.tracking import StudyTracking, has_ended, is_local_store, retry
from srdit.study.designs import Plan, plan_study
from srdit.study.spec import StudySpec

CURVE_KEYS = tuple(metric_registry.curves())
"Metrics read as learning curves from MLflow (and as table columns): the registry's curve metrics."


def load_results(
    spec: StudySpec,
    state_dir: str | Path | StudyState,
    plan: Plan | None = None,
    curves: bool = True,
    samples_dir: str | Path | None = None,
    samples: bool = True,
) -> tuple[StudyResults, StudyTracking]:
    """Read the study's child runs. Grid designs keep the runs of the current plan (by trial key; runs of an older
    version of the study file are ignored); a search keeps every child run. Raises ConfigError (one line) when
    the study has not run yet (`StudyState.tracking`)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    plan = plan or plan_study(spec)
    state = StudyState.of(spec, state_dir)
    tracking = state.tracking()
    client = tracking.client
    children = tracking.children_by_key()
    if spec.design.kind == "search":
        keys = list(children)
    else:
        keys = [t.key for t in plan.trials if t.key in children]
    factors = spec.factor_names
    metrics = spec.metrics.all()
    blocks = {t.key: t.block for t in plan.trials if t.block is not None}
    want_samples = samples
    rows, curve_rows, samples = [], [], {}
    reused_from: dict[str, int] = {}
    commit = ""
    if samples_dir is None:
        samples_dir = state.samples
    samples_dir = Path(samples_dir)
    for key in keys:
        run = children[key]
        tags, m = run.data.tags, run.data.metrics
        if not has_ended(run):
            continue  # interrupted: neither a result nor a failure (rerun the study to finish it)
        status = tags.get("status", "unknown")
        ok = status == "finished"
        row = {
            "trial": key,
            "cell": tags.get("cell", ""),
            "seed": int(tags.get("seed", -1)),
            "status": status,
            "status_reason": tags.get("status_reason", ""),
            # why a crash happened (a run crashed before this tag existed has none: counted as the code's)
            CRASH_CAUSE: tags.get(CRASH_CAUSE, "") if status == "crashed" else "",
        }
        row.update({f: int(tags.get(f"tech.{f}", 0)) for f in factors})
        if key in blocks:  # fold-over: the half (a run adopted from the folded study carries no block tag)
            row["block"] = int(tags.get("block", blocks[key]))
        for name in dict.fromkeys([*metrics, *CURVE_KEYS]):
            v = m.get(metric_registry.SUMMARY.get(name, name), m.get(name))  # throughput: the run's median
            row[name] = float(v) if (ok and v is not None and math.isfinite(v)) else math.nan
        row[RUN_ID] = run.info.run_id
        row.update(eval_protocol(run.data.params, tags.get("device", "")))
        if tags.get(REUSED_FROM):
            reused_from[tags.get(REUSED_FROM_STUDY, "")] = reused_from.get(tags.get(REUSED_FROM_STUDY, ""), 0) + 1
        row["trials_on_host"] = float(m.get("trials_on_host", math.nan))  # NaN: not recorded (older runs)
        rows.append(row)
        commit = commit or tags.get("git_commit", "")
        if curves:
            for name in CURVE_KEYS:
                if name not in m:
                    continue
                hist = retry(client.get_metric_history, run.info.run_id, name)
                last: dict[int, float] = {}
                for point in sorted(hist, key=lambda p: (p.step, p.timestamp)):
                    last[point.step] = point.value  # a resumed trial re-logs a few steps: keep the latest value
                curve_rows += [
                    {"trial": key, "cell": row["cell"], "seed": row["seed"], "key": name, "step": s, "value": v}
                    for s, v in sorted(last.items())
                ]
        if want_samples and ok and row["cell"] not in samples:
            try:
                samples_dir.mkdir(parents=True, exist_ok=True)
                dst = samples_dir / row["cell"]
                dst.mkdir(exist_ok=True)
                path = retry(client.download_artifacts, run.info.run_id, "samples.png", str(dst))
                samples[row["cell"]] = str(path)
            except Exception:
                pass  # a run without a sample grid (e.g. logged by an older version)
    table = pd.DataFrame(rows, columns=None if rows else [*TABLE_BASE_COLUMNS, *factors, *metrics])
    results = StudyResults(
        study=spec.name,
        design=plan.design,
        factors=factors,
        metric=spec.metrics.primary,
        direction=spec.metrics.direction,
        other_metrics={k: v for k, v in metrics.items() if k != spec.metrics.primary},
        table=table,
        curves=pd.DataFrame(curve_rows, columns=CURVE_COLUMNS),
        samples=samples,
        excluded=list(plan.excluded),
        aliases=dict(plan.aliases),
        ladder_order=plan.ladder_order,
        commit=commit,
        date=_dt.date.today().isoformat(),
        description=spec.description,
        steps=getattr(getattr(spec.base, "train", None), "steps", None),
        reused_from=reused_from,
        mlflow_ui=f"{ui_url(tracking.uri)}/#/experiments/{tracking.experiment_id}",
        mlflow_ui_local=is_local_store(tracking.uri),
    )
    from srdit.runtime.bench import bench_table, load_bench

    bench = load_bench(state.root, plan)
    if bench is not None:  # the controlled measurement of `srdit study bench`
        results.bench = bench_table(bench, list(factors))
    return results, tracking


SRDIT_UI = "http://127.0.0.1:5000"
"Where `srdit ui` serves a local store by default (its --host and --port)."


def ui_url(uri: str) -> str:
    """The MLflow UI of a tracking URI: the server itself (http[s]://...), or `srdit ui`'s default address for a
    local store."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else SRDIT_UI


def eval_protocol(params: dict[str, str], device: str) -> dict[str, str]:
    """The evaluation protocol of a run (`analysis.results.PROTOCOL_COLUMNS`) from its MLflow params (the flattened
    run config: `sample.*`, `eval.*`, `train.precision`, `data.dataset`) and its `device` tag; {} when the run
    recorded no config. `train.precision` auto resolves as the trainer and sampler resolve it: bf16 on CUDA, fp32 on
    CPU."""
    if "sample.sampler" not in params:
        return {}
    g = params.get
    ref = g("eval.reference")
    dataset = g("data.dataset", "digits")
    if ref in (None, "", "None"):
        reference = "held-out digits (in-project metric network)" if dataset == "digits" else "none"
    else:
        reference = Path(ref).name
    precision = g("train.precision", "auto")
    if precision == "auto":
        precision = (
            "auto (device not recorded)"
            if not device
            else ("fp32" if device.startswith("cpu") else "bf16 autocast") + " (auto)"
        )
    guidance = f"{g('sample.cfg_scale', '1.0')}"
    if g("sample.cls_cfg_scale", "1.0") not in ("1", "1.0"):
        guidance += f", class token {g('sample.cls_cfg_scale')}"
    if g("sample.path_drop_guidance") == "True":
        guidance += ", path-drop"
    return {
        "protocol.sampler": g("sample.sampler", ""),
        "protocol.sampling_steps": g("sample.steps", ""),
        "protocol.guidance": guidance,
        "protocol.guidance_interval": f"[{g('sample.guidance_low', '0.0')}, {g('sample.guidance_high', '1.0')}]",
        "protocol.labels": "balanced" if g("sample.balanced_labels") == "True" else "random",
        "protocol.n_samples": g("eval.n_samples", ""),
        "protocol.reference": reference,
        "protocol.precision": precision,
    }
