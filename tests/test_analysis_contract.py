"""Contracts of the analysis layer: the JSON field names of `srdit analyze --format json` (pinned), the typed
result's JSON, the layering (study imports only analysis.results; analysis imports no torch / ray / study), and
curves derived from the metric registry (an ImageNet-style study's report draws its FID learning curve)."""

from __future__ import annotations

import ast
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from srdit import metric_registry
from srdit.analysis.effects import Analysis, analyze
from srdit.analysis.page import render_report
from srdit.analysis.report_fit import fit_report
from srdit.analysis.results import CURVE_COLUMNS, StudyResults
from srdit.commands.analyze import main as analyze_main

ROOT = Path(__file__).resolve().parents[1]

# The JSON field names of `srdit analyze --format json`, as they were before the result became typed: scripts
# read them, so a change here is a breaking change of the command's output.
TOP_KEYS = [
    "metric",
    "direction",
    "scale",
    "factors",
    "n_runs",
    "n_finished",
    "n_failed",
    "n_cells",
    "replicated",
    "error_df",
    "alpha",
    "correction",
    "threshold",
    "main_effects",
    "interactions",
    "synergy",
    "ci",
    "synergy_ci",
    "p",
    "p_adj",
    "ci_boot",
    "dividends",
    "dividends_full",
    "loo",
    "shapley",
    "ladder",
    "ladder_kind",
    "cells",
    "best",
    "strongest_synergy",
    "incompatible",
    "failure_tests",
    "aliased",
    "inestimable",
    "notes",
    # appended with the calibrated analysis (issue "conclusions a researcher can trust"): the role of the
    # metric in the multiplicity family, what each interval is, the realised aliasing, pure error / lack of
    # fit, Lenth's screen for unreplicated designs, runs excluded for a non-failure status
    "role",
    "family",
    "intervals",
    "significant_pairs",
    "partially_aliased_pairs",
    "aliased_effects",
    "partial_aliases",
    "dropped_factors",
    "seed_block",
    "lack_of_fit",
    "lenth",
    "n_excluded",
    # appended with the fold-over design: the additive block term for its halves (null without a block)
    "block",
    # appended with the crash cause: failed runs left out as the infrastructure's (a lost node, a missing file)
    "n_infrastructure",
]
CELL_KEYS = [
    "combo",
    "cell",
    "on",
    "n",
    "n_finished",
    "n_failed",
    "failures",
    "reasons",
    "mean",
    "sd",
    "y_mean",
    "gain",
    "gain_sem",
]
LADDER_KEYS = ["step", "added", "cell", "on", "n", "n_finished", "mean", "sd", "gain", "delta", "gain_step", "ratio"]
BEST_KEYS = ["cell", "combo", "on", "mean", "sd", "gain", "n_finished", "n", "indistinguishable", "rule"]
STRONGEST_KEYS = ["pair", "estimate", "ci", "p_adj"]
ANTAGONISM_KEYS = ["pair", "factors", "kind", "estimate", "ci", "p", "p_adj", "threshold", "df", "counts"]
FAILURE_FLAG_KEYS = ["pair", "factors", "p", "estimate", "counts", "statuses", "p_adj", "kind", "ci"]
FAILURE_TEST_KEYS = ["pair", "factors", "p", "estimate", "counts", "statuses", "p_adj", "p_excess", "p_interaction"]
UNTESTED_KEYS = ["pair", "p", "p_adj", "counts"]
ALIAS_KEYS = ["effects", "signs", "label", "estimate", "ci"]
INESTIMABLE_KEYS = ["effect", "reason"]


def planted_study(seed: int = 1) -> pd.DataFrame:
    """2^4 x 3 seeds, fd (min): synergy A:B, antagonism C:D, every run with B and D diverges."""
    rng = np.random.default_rng(seed)
    rows = []
    for lv in itertools.product([0, 1], repeat=4):
        x = dict(zip("ABCD", lv))
        for s in range(3):
            y = (
                10
                - x["A"]
                - 0.8 * x["B"]
                - 0.6 * x["C"]
                - 0.4 * x["D"]
                + 0.3 * s
                + rng.normal(0, 0.5)
                - 2.5 * x["A"] * x["B"]
                + 2.0 * x["C"] * x["D"]
            )
            status = "diverged" if x["B"] and x["D"] else "finished"
            rows.append(
                {**x, "seed": s, "status": status, "status_reason": "", "fd": y if status == "finished" else np.nan}
            )
    return pd.DataFrame(rows)


def _cli_json(tmp_path: Path, df: pd.DataFrame, *args: str) -> dict:
    p = tmp_path / "runs.csv"
    df.to_csv(p, index=False)
    out = io.StringIO()
    assert analyze_main([str(p), *args, "--format", "json"], stdout=out, stderr=io.StringIO()) == 0
    return json.loads(out.getvalue())


def test_analyze_json_field_names_are_stable(tmp_path):
    res = _cli_json(
        tmp_path,
        planted_study(),
        "--factors",
        "A,B,C,D",
        "--metric",
        "fd",
        "--direction",
        "min",
        "--allow-inestimable",
        "--no-bootstrap",
        "--ladder",
        "A,B,C,D",
    )
    assert list(res) == TOP_KEYS
    assert all(list(c) == CELL_KEYS for c in res["cells"])
    assert list(res["best"]) == BEST_KEYS and list(res["strongest_synergy"]) == STRONGEST_KEYS
    kinds = {f["kind"]: list(f) for f in res["incompatible"]}
    assert kinds == {"antagonism": ANTAGONISM_KEYS, "failure": FAILURE_FLAG_KEYS}
    assert all(list(t) == FAILURE_TEST_KEYS for t in res["failure_tests"])
    assert res["inestimable"] and all(list(i) == INESTIMABLE_KEYS for i in res["inestimable"])
    assert all(list(r) == LADDER_KEYS for r in res["ladder"])
    # a half fraction without failures: alias chains, and failure tests that tested nothing
    rows = [
        {"A": a, "B": b, "C": c, "D": (a + b + c) % 2, "seed": s, "fd": 10 - a - b + 0.1 * s + 0.05 * c}
        for a, b, c in itertools.product([0, 1], repeat=3)
        for s in range(2)
    ]
    frac = _cli_json(tmp_path, pd.DataFrame(rows), "--factors", "A,B,C,D", "--metric", "fd", "--direction", "min")
    assert list(frac) == TOP_KEYS
    assert frac["aliased"] and all(list(a) == ALIAS_KEYS for a in frac["aliased"])
    assert all(list(t) == UNTESTED_KEYS for t in frac["failure_tests"])


def test_typed_result_is_what_the_json_says():
    r = analyze(planted_study(), list("ABCD"), "fd", "min", bootstrap=False)
    assert isinstance(r, Analysis)
    j = r.to_json()
    assert json.loads(json.dumps(j, allow_nan=False)) == j
    assert j["main_effects"] == r.fit.main_effects and j["synergy"] == r.pairs.synergy
    assert j["shapley"] is None and r.attribution.shapley is None  # B+D cells all failed
    assert [f["pair"] for f in j["incompatible"]] == [f.pair for f in r.incompatible]
    assert j["best"]["combo"] == r.attribution.best.combo
    assert j["notes"] == r.notes
    # options grouped: analyze(..., options=Options(...)) is analyze(..., **fields)
    from srdit.analysis.effects import Options

    r2 = analyze(planted_study(), list("ABCD"), "fd", "min", Options(bootstrap=False))
    assert r2.to_json() == j


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_layering_study_reads_only_the_results_contract_of_the_analysis():
    """The study layer reads the results contract, and the design-power maths for `study plan`; never the
    statistics of a finished study (effects), figures or pages."""
    for path in sorted((ROOT / "srdit" / "study").glob("*.py")):
        analysis = {m for m in _imports(path) if m.startswith("srdit.analysis")}
        assert analysis <= {"srdit.analysis.results", "srdit.analysis.power"}, (path.name, analysis)
    allowed = ("srdit.analysis", "srdit.config", "srdit.metric_registry", "srdit")
    for path in sorted((ROOT / "srdit" / "analysis").glob("*.py")):
        ours = {m for m in _imports(path) if m.split(".")[0] in ("srdit", "torch", "ray", "mlflow")}
        bad = {m for m in ours if not (m in allowed or m.startswith("srdit.analysis."))}
        assert not bad, (path.name, bad)


def test_curves_come_from_the_metric_registry_and_an_imagenet_report_draws_fid(tmp_path):
    curves = metric_registry.curves()
    assert {"fid", "sfid", "inception_score", "kd_dinov2", "loss", "images_per_s"} <= set(curves)
    # an ImageNet-style study: primary fid, latent evaluation curves, no digits metrics
    rng = np.random.default_rng(0)
    rows, curve_rows = [], []
    for t, (a, b) in enumerate(itertools.product([0, 1], repeat=2)):
        for s in range(2):
            fid = 40 - 8 * a - 5 * b + rng.normal(0, 0.5)
            trial = f"t{t}{s}"
            cell = "+".join(f for f, v in (("repa", a), ("rope", b)) if v) or "baseline"
            rows.append(
                {
                    "trial": trial,
                    "cell": cell,
                    "seed": s,
                    "status": "finished",
                    "status_reason": "",
                    "repa": a,
                    "rope": b,
                    "fid": fid,
                    "sfid": fid / 4,
                    "inception_score": 200 - 2 * fid,
                    "kd_dinov2": fid / 100,
                    "images_per_s": 300 * (0.9 if a else 1.0),
                }
            )
            for step in (1000, 2000, 3000):
                for key, v in (
                    ("fid", fid + 4e4 / step),
                    ("sfid", fid / 4 + 1e4 / step),
                    ("inception_score", 200 - 2 * fid - 1e5 / step),
                    ("kd_dinov2", fid / 100),
                    ("loss", 0.5 + 100 / step),
                ):
                    curve_rows.append({"trial": trial, "cell": cell, "seed": s, "key": key, "step": step, "value": v})
    res = StudyResults(
        study="imagenet_like",
        design="full",
        factors=["repa", "rope"],
        metric="fid",
        direction="min",
        other_metrics={"sfid": "min", "inception_score": "max", "kd_dinov2": "min", "images_per_s": "max"},
        table=pd.DataFrame(rows),
        curves=pd.DataFrame(curve_rows, columns=CURVE_COLUMNS),
    )
    from srdit.runtime.results import CURVE_KEYS  # the curves load_results reads from MLflow

    assert list(CURVE_KEYS) == curves and set(res.curves["key"]) <= set(CURVE_KEYS)
    page = render_report(fit_report(res), tmp_path / "dash" / res.study).read_text(encoding="utf-8")
    curves_section = page[page.index('id="sec-fig-curves"') : page.index('id="sec-cells"')]
    assert 'id="fig-curves"' in curves_section
    # the curve figure's first (visible) quantity is the primary metric fid, and fid is in its menu
    compact = curves_section.replace(" ", "")
    assert '"yaxis":{"title":{"text":"fid"}}' in compact
    for key in ("fid", "sfid", "inception_score", "kd_dinov2"):
        assert f'"label":"{key}"' in compact, key
