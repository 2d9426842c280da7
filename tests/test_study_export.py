"""`srdit study export STUDY --csv`: one row per trial from a real SQLite MLflow store (the trials are logged through
the study's own tracking code, without training), and `srdit analyze` re-runs the analysis on the exported file and
on the report's own cells.csv."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from srdit.commands.analyze import main as analyze_main
from srdit.commands.study import main as study_main

sys.path.insert(0, str(Path(__file__).parent))


def _log_study(tmp_path: Path) -> Path:
    from srdit.runtime.tracking import ChildRun, open_study, resolve_uri
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "description": "export check",
                "base": {"train": {"steps": 6}},
                "techniques": ["rmsnorm", "qk_norm"],
                "seeds": [0, 1, 2],
                "metrics": {"primary": "fd", "direction": "min", "others": {"images_per_s": "max"}},
            },
            sort_keys=False,
        )
    )
    spec = load_study(path)
    state = (tmp_path / "state").resolve()
    uri = resolve_uri(spec.tracking.uri, state)
    tr = open_study(uri, spec.name, spec.name, state)
    for t in plan_study(spec).trials:
        on = set(t.on)
        tags = {
            "study": spec.name,
            "cell": t.cell,
            "seed": t.seed,
            "design": "full",
            **{f"tech.{n}": int(n in on) for n in spec.factor_names},
        }
        child = ChildRun.open(uri, tr.experiment_id, tr.parent_run_id, t.key, f"{t.cell}-s{t.seed}", tags, {})
        failed = on == {"rmsnorm", "qk_norm"} and t.seed == 2
        if not failed:
            child.log_metrics(
                6,
                {
                    "fd": 10.0 - 2 * ("rmsnorm" in on) - ("qk_norm" in on) + 0.1 * t.seed,
                    "images_per_s": 100.0 + t.seed,
                    "loss": 0.5,
                },
            )
        child.finish("oom" if failed else "finished", "CUDA out of memory" if failed else "")
    return path


def test_export_writes_one_row_per_trial_and_analyze_reads_it(tmp_path, monkeypatch):
    study = _log_study(tmp_path)
    out = tmp_path / "out" / "runs.csv"
    monkeypatch.chdir(tmp_path)
    assert study_main(["export", str(study), "--state", str(tmp_path / "state"), "--csv", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == 12
    assert {
        "trial",
        "cell",
        "seed",
        "status",
        "status_reason",
        "rmsnorm",
        "qk_norm",
        "fd",
        "images_per_s",
        "run_id",
    } <= set(df.columns)
    assert sorted(df["seed"].unique()) == [0, 1, 2] and (df["status"] == "oom").sum() == 1
    assert df.loc[df.status == "oom", "fd"].isna().all()
    # the default path
    assert study_main(["export", str(study), "--state", str(tmp_path / "state"), "--csv"]) == 0
    assert len(pd.read_csv(tmp_path / "tiny_runs.csv")) == 12
    # the exported table is analysable anywhere
    buf = io.StringIO()
    assert (
        analyze_main(
            [str(out), "--factors", "rmsnorm,qk_norm", "--metric", "fd", "--direction", "min", "--format", "json"],
            stdout=buf,
            stderr=io.StringIO(),
        )
        == 0
    )
    res = json.loads(buf.getvalue())
    assert res["n_runs"] == 12 and res["n_failed"] == 1
    assert abs(res["main_effects"]["rmsnorm"] + 2.0) < 0.2


def test_export_without_a_store_is_one_line(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "nostore",
                "techniques": ["rmsnorm"],
                "seeds": [0],
                "metrics": {"primary": "fd", "direction": "min"},
            }
        )
    )
    assert study_main(["export", str(path), "--state", str(tmp_path / "none"), "--csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "srdit study run" in err


def test_analyze_reads_the_reports_own_cells_csv(tmp_path):
    from test_report import make_results

    from srdit.analysis.effects import analyze
    from srdit.analysis.page import render_report
    from srdit.analysis.report_fit import fit_report

    res = make_results(tmp_path)
    render_report(fit_report(res, bootstrap=False), tmp_path / "dash")
    buf = io.StringIO()
    args = [
        "--factors",
        ",".join(res.factors),
        "--metric",
        res.metric,
        "--direction",
        res.direction,
        "--format",
        "json",
        "--no-bootstrap",
        "--allow-inestimable",
    ]
    assert analyze_main([str(tmp_path / "dash" / "cells.csv"), *args], stdout=buf, stderr=io.StringIO()) == 0
    got = json.loads(buf.getvalue())
    # the same analysis as the runs without a seed block (cells.csv has no seeds)
    ref = analyze(res.table, res.factors, res.metric, res.direction, seed_col=None, bootstrap=False).to_json()
    assert got["n_runs"] == ref["n_runs"] and got["n_failed"] == ref["n_failed"]
    for key in ("main_effects", "interactions", "p"):
        for n, v in ref[key].items():
            assert (v is None and got[key][n] is None) or abs(got[key][n] - v) < 1e-8 * max(1, abs(v)), (key, n)
    assert got["error_df"] == ref["error_df"]
