"""`srdit analyze` (srdit.commands.analyze): JSON output, table output, and one-line errors for bad input."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from srdit.commands.analyze import add_arguments, main

MONTGOMERY_6_2 = (  # Montgomery, Design and Analysis of Experiments (8th ed.), Example 6.2 (filtration rate)
    ["1", "a", "b", "ab", "c", "ac", "bc", "abc", "d", "ad", "bd", "abd", "cd", "acd", "bcd", "abcd"],
    [45, 71, 48, 65, 68, 60, 80, 65, 43, 100, 45, 104, 75, 86, 70, 96],
)


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    rc = main([str(a) for a in argv], stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def replicated_csv(tmp_path) -> Path:
    """2^3 x 3 seeds, fd (min); synergy A:B planted, B and C fail together (oom) in every seed."""
    rng = np.random.default_rng(5)
    rows = []
    for a, b, c in itertools.product([0, 1], repeat=3):
        for s in range(3):
            fd = 10 - a - 0.5 * b - 0.3 * c - 2.0 * a * b + rng.normal(0, 0.2)
            status = "oom" if b and c else "finished"
            rows.append(
                {"A": a, "B": b, "C": c, "seed": s, "status": status, "fd": fd if status == "finished" else np.nan}
            )
    p = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def test_json_output_on_textbook_example(tmp_path):
    df = pd.DataFrame([{f.upper(): int(f in lab) for f in "abcd"} | {"rate": v} for lab, v in zip(*MONTGOMERY_6_2)])
    p = tmp_path / "filtration.csv"
    df.to_csv(p, index=False)
    rc, out, err = run_main([p, "--factors", "A,B,C,D", "--metric", "rate", "--direction", "max", "--format", "json"])
    assert rc == 0, err
    res = json.loads(out)
    for key in ("main_effects", "interactions", "synergy", "shapley", "ci", "incompatible", "aliased"):
        assert key in res
    assert res["main_effects"] == pytest.approx({"A": 21.625, "B": 3.125, "C": 9.875, "D": 14.625})
    assert res["interactions"]["A:C"] == pytest.approx(-18.125)
    assert res["interactions"]["A:D"] == pytest.approx(16.625)
    assert list(res["interactions"]) == ["A:B", "A:C", "A:D", "B:C", "B:D", "C:D"]
    assert sum(res["shapley"].values()) == pytest.approx(96 - 45)
    assert res["ci"] == {}  # unreplicated: no error estimate
    assert res["incompatible"] == [] and res["aliased"] == []
    # pair names follow the order of --factors
    rc, out, _ = run_main([p, "--factors", "D,C,B,A", "--metric", "rate", "--direction", "min", "--format", "json"])
    res2 = json.loads(out)
    assert list(res2["interactions"])[0] == "D:C"
    assert res2["interactions"]["C:A"] == pytest.approx(-18.125)  # metric scale, before orientation
    assert res2["synergy"]["C:A"] == pytest.approx(2 * 18.125)  # oriented: min flips the sign


def test_json_output_replicated_with_failures(replicated_csv):
    rc, out, err = run_main(
        [
            replicated_csv,
            "--factors",
            "A,B,C",
            "--metric",
            "fd",
            "--direction",
            "min",
            "--format",
            "json",
            "--allow-inestimable",
        ]
    )
    assert rc == 0, err
    res = json.loads(out)
    # planted: fd -2.0 when A and B are both on -> INT = -1.0 (metric scale), S = +2.0 (oriented gain)
    assert res["synergy"]["A:B"] == pytest.approx(2.0, abs=0.6) and res["ci"]["A:B"][1] < 0
    assert "A:B" in res["synergy_ci"] and "A" in res["ci"]
    kinds = {(f["pair"], f["kind"]) for f in res["incompatible"]}
    assert kinds == {("B:C", "failure")}
    flag = res["incompatible"][0]
    assert flag["counts"]["both"] == {"failed": 6, "n": 6}
    assert flag["p"] < 0.05 and flag["p_adj"] < 0.05
    assert res["synergy"]["B:C"] is None  # no finished run with both: no metric synergy
    # failures are data, not holes: the default (strict) run succeeds as well
    rc, out, err = run_main(
        [replicated_csv, "--factors", "A,B,C", "--metric", "fd", "--direction", "min", "--format", "json"]
    )
    assert rc == 0, err


def test_table_output(replicated_csv):
    rc, out, err = run_main([replicated_csv, "--factors", "A,B,C", "--metric", "fd", "--direction", "min"])
    assert rc == 0, err
    assert "Effects on fd" in out and "A:B" in out and "Incompatible pairs" in out and "failure" in out


def test_table_output_tags_aliased_estimates_and_names_the_failure_test(tmp_path, replicated_csv):
    # 2^(3-1) with C = AB, 3 seeds: C's estimate (CI and p printed) is of the chain C + A:B, and says so
    rng = np.random.default_rng(0)
    rows = [dict(A=a, B=b, C=int(a == b), seed=s) for a in (0, 1) for b in (0, 1) for s in range(3)]
    df = pd.DataFrame(rows)
    df["y"] = 5 - 2.0 * (2 * df.A - 1) * (2 * df.B - 1) + rng.normal(0, 0.1, len(df))
    p = tmp_path / "res3.csv"
    df.to_csv(p, index=False)
    rc, out, err = run_main([p, "--factors", "A,B,C", "--metric", "y", "--direction", "max"])
    assert rc == 0, err
    rows = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.startswith("│")}
    for f, chain in (("A", "A + B:C"), ("B", "B + A:C"), ("C", "C + A:B")):
        line = rows[f"{f} (aliased: {chain})"]
        assert "[" in line and f not in rows  # printed with its interval, never without the tag
    # a cell absent from the table: every estimate is tagged partly aliased with A:B:C
    full = pd.read_csv(replicated_csv)
    absent = full[~((full.A == 1) & (full.B == 1) & (full.C == 1))].assign(status="finished")
    absent.loc[absent.fd.isna(), "fd"] = 9.0
    p2 = tmp_path / "absent.csv"
    absent.to_csv(p2, index=False)
    rc, out, err = run_main([p2, "--factors", "A,B,C", "--metric", "fd", "--direction", "min", "--allow-inestimable"])
    assert rc == 0, err
    rows = {ln.split("│")[1].strip() for ln in out.splitlines() if ln.startswith("│")}
    assert {"A:B (partly aliased: A:B:C)", "A (partly aliased: A:B:C)"} <= rows
    # the failure flags' footer names the test that made them
    rc, out, err = run_main([replicated_csv, "--factors", "A,B,C", "--metric", "fd", "--direction", "min"])
    assert rc == 0, err
    assert "Incompatible pairs" in out and "Boschloo" in out and "Fisher" not in out


def test_log_and_threshold_options(tmp_path):
    rows = [
        {"A": a, "B": b, "seed": s, "images_per_s": 100 * 2**a * 1.5**b * 0.5 ** (a * b) * (1 + 0.01 * s)}
        for a in (0, 1)
        for b in (0, 1)
        for s in range(3)
    ]
    p = tmp_path / "speed.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    rc, out, err = run_main(
        [
            p,
            "--factors",
            "A,B",
            "--metric",
            "images_per_s",
            "--direction",
            "max",
            "--log",
            "--format",
            "json",
            "--threshold",
            "0.1",
        ]
    )
    assert rc == 0, err
    res = json.loads(out)
    assert res["scale"] == "log"
    assert res["synergy"]["A:B"] == pytest.approx(np.log(0.5), abs=1e-6)
    assert [f["kind"] for f in res["incompatible"]] == ["antagonism"]
    rc, out, err = run_main(
        [
            p,
            "--factors",
            "A,B",
            "--metric",
            "images_per_s",
            "--direction",
            "max",
            "--log",
            "--format",
            "json",
            "--threshold",
            "1.0",
        ]
    )
    assert json.loads(out)["incompatible"] == []  # |log 0.5| = 0.69 is below the practical threshold


def _assert_one_line_error(rc, out, err, *fragments):
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("srdit analyze: error:")
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_inputs_give_one_clear_line(tmp_path, replicated_csv):
    base = ["--factors", "A,B,C", "--metric", "fd", "--direction", "min"]
    # missing column
    _assert_one_line_error(
        *run_main([replicated_csv, "--factors", "A,B,Z", "--metric", "fd", "--direction", "min"]), "missing column", "Z"
    )
    _assert_one_line_error(
        *run_main([replicated_csv, "--factors", "A,B,C", "--metric", "fid", "--direction", "min"]), "fid"
    )
    _assert_one_line_error(*run_main([replicated_csv, *base, "--seed-col", "replicate"]), "replicate")
    # non-binary levels
    df = pd.read_csv(replicated_csv)
    p = tmp_path / "levels.csv"
    df.assign(C=df["C"] * 2 + df["seed"] % 2).to_csv(p, index=False)
    _assert_one_line_error(*run_main([p, *base]), "non-binary levels", "'C'")
    # a design with holes: leave-one-out cells only -> the interactions are inestimable, named
    loo = [{"A": 1, "B": 1, "C": 1}, {"A": 0, "B": 1, "C": 1}, {"A": 1, "B": 0, "C": 1}, {"A": 1, "B": 1, "C": 0}]
    p = tmp_path / "loo.csv"
    loo_rows = [{**c, "seed": s, "fd": 1.0 + s + sum(c.values())} for c in loo for s in range(2)]
    pd.DataFrame(loo_rows).to_csv(p, index=False)
    rc, out, err = run_main([p, *base])
    _assert_one_line_error(rc, out, err, "design has holes", "A:B")
    # ... and --allow-inestimable reports them as null instead
    rc, out, err = run_main([p, *base, "--allow-inestimable", "--format", "json"])
    assert rc == 0, err
    res = json.loads(out)
    assert res["synergy"]["A:B"] is None and res["loo"]["A"] == pytest.approx(-1.0)
    # empty file, header only, unreadable (binary), missing file, a directory
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _assert_one_line_error(*run_main([empty, *base]), "empty")
    header = tmp_path / "header.csv"
    header.write_text("A,B,C,seed,fd\n")
    _assert_one_line_error(*run_main([header, *base]), "no rows")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    _assert_one_line_error(*run_main([binary, *base]), "cannot read")
    _assert_one_line_error(*run_main([tmp_path / "nope.csv", *base]), "no such file")
    _assert_one_line_error(*run_main([tmp_path, *base]), "directory")
    # bad options
    _assert_one_line_error(
        *run_main([replicated_csv, "--factors", "A,B", "--metric", "fd", "--direction", "up"]), "--direction"
    )
    _assert_one_line_error(*run_main([replicated_csv, "--metric", "fd", "--direction", "min"]), "--factors")


def test_a_column_in_two_roles_is_refused(replicated_csv):
    """A factor named as the metric (or as the seed / status column) would be read as response and as treatment at
    once; one line, exit 2, whichever role the second mention takes."""
    rc, out, err = run_main([replicated_csv, "--factors", "A,B,C", "--metric", "A", "--direction", "min"])
    assert rc == 2
    _assert_one_line_error(rc, out, err, "column 'A' is both a factor and the metric")
    rc, out, err = run_main([replicated_csv, "--factors", "A,B,seed", "--metric", "fd", "--direction", "min"])
    _assert_one_line_error(rc, out, err, "column 'seed' is both a factor and the seed column")
    rc, out, err = run_main(
        [replicated_csv, "--factors", "A,B,C", "--metric", "seed", "--direction", "min", "--seed-col", "seed"]
    )
    _assert_one_line_error(rc, out, err, "column 'seed' is both the metric and the seed column")


def test_module_entry_point_subprocess(replicated_csv, tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "srdit",
            "analyze",
            str(replicated_csv),
            "--factors",
            "A,B,C",
            "--metric",
            "fd",
            "--direction",
            "min",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["main_effects"]["A"] < 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "srdit",
            "analyze",
            str(tmp_path / "missing.csv"),
            "--factors",
            "A",
            "--metric",
            "fd",
            "--direction",
            "min",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_add_arguments_reusable_by_another_parser(replicated_csv):
    import argparse

    from srdit.commands.analyze import run

    parser = argparse.ArgumentParser(prog="srdit")
    sub = parser.add_subparsers(dest="cmd")
    add_arguments(sub.add_parser("analyze"))
    args = parser.parse_args(
        [
            "analyze",
            str(replicated_csv),
            "--factors",
            "A,B,C",
            "--metric",
            "fd",
            "--direction",
            "min",
            "--format",
            "json",
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    assert run(args, stdout=out, stderr=err) == 0
    assert "A:B" in json.loads(out.getvalue())["synergy"]
