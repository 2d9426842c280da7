"""Study report (srdit.analysis.page, figures, records): self-contained HTML with every figure, the index page, RECORDS.md."""

from __future__ import annotations

import itertools
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from srdit.analysis.page import render_index, render_report
from srdit.analysis.records import write_records
from srdit.analysis.report_fit import fit_report
from srdit.analysis.results import StudyResults

FIGURE_IDS = ["fig-synergy", "fig-effects", "fig-over-steps", "fig-ladder", "fig-pareto", "fig-curves"]


def png_bytes(w: int, h: int, rgb) -> bytes:
    """A minimal RGB PNG (filter 0 rows, zlib-compressed IDAT) from a function (x, y) -> (r, g, b)."""
    raw = b"".join(b"\x00" + bytes(v for x in range(w) for v in rgb(x, y)) for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def make_results(tmp: Path, seed: int = 0, planted_failure: bool = False) -> StudyResults:
    """A synthetic 2^3 study (repa, rope, sprint) x 3 seeds with a synergy repa:rope, sporadic failures (oom,
    diverged), one cell excluded by a constraint, learning curves, and sample grids for three cells.
    planted_failure: every run with repa and sprint runs out of memory."""
    rng = np.random.default_rng(seed)
    F = ["repa", "rope", "sprint"]
    rows, curves, trial = [], [], 0
    for lv in itertools.product([0, 1], repeat=3):
        x = dict(zip(F, lv))
        cell = "+".join(f for f in F if x[f]) or "baseline"
        if x["rope"] and x["sprint"] and not x["repa"]:
            continue  # excluded by a constraint (listed in `excluded`)
        for s in range(3):
            fd = 30 - 6 * x["repa"] - 3 * x["rope"] - 1 * x["sprint"] - 4 * x["repa"] * x["rope"] + rng.normal(0, 0.8)
            ips = 100 * (1.8 if x["sprint"] else 1) * (0.9 if x["repa"] else 1) * np.exp(rng.normal(0, 0.02))
            status, reason = "finished", ""
            if x["repa"] and x["sprint"] and (s == 2 or planted_failure):
                status, reason = "oom", "CUDA out of memory at step 120"
            elif x["repa"] and x["rope"] and x["sprint"] and s == 1:
                status, reason = "diverged", "loss is NaN at step 310"
            ok = status == "finished"
            rows.append(
                {
                    "trial": f"t{trial:03d}",
                    "cell": cell,
                    "seed": s,
                    "status": status,
                    "status_reason": reason,
                    **x,
                    "fd": fd if ok else np.nan,
                    "kd": fd / 100 if ok else np.nan,
                    "precision": 0.5 + (30 - fd) / 60 if ok else np.nan,
                    "images_per_s": ips if ok else np.nan,
                    "loss": 0.3 + fd / 200 if ok else np.nan,
                }
            )
            for step in range(0, 401, 50):
                curves.append(
                    {
                        "trial": f"t{trial:03d}",
                        "cell": cell,
                        "seed": s,
                        "key": "loss",
                        "step": step,
                        "value": np.exp(-step / 150) + 0.3 + fd / 200 + rng.normal(0, 0.01),
                    }
                )
                curves.append(
                    {
                        "trial": f"t{trial:03d}",
                        "cell": cell,
                        "seed": s,
                        "key": "fd",
                        "step": step,
                        "value": fd + 40 * np.exp(-step / 120),
                    }
                )
            trial += 1
    samples = {}
    for i, cell in enumerate(["baseline", "repa", "repa+rope"]):
        p = tmp / f"samples_{cell}.png"
        p.write_bytes(png_bytes(24, 24, lambda x, y, i=i: ((x * 10 + i * 70) % 256, (y * 10) % 256, 40 * i)))
        samples[cell] = str(p)
    return StudyResults(
        study="digits_factorial_test",
        design="full",
        factors=F,
        metric="fd",
        direction="min",
        other_metrics={"images_per_s": "max", "kd": "min", "precision": "max"},
        table=pd.DataFrame(rows),
        curves=pd.DataFrame(curves),
        samples=samples,
        excluded=[
            {
                "cell": "rope+sprint",
                "techniques": ["rope", "sprint"],
                "reason": "constraint: sprint requires repa in this study",
            }
        ],
        aliases={},
        ladder_order=["repa", "rope", "sprint"],
        commit="0123456789abcdef",
        date="2026-11-02",
    )


def _scripts_with_remote_src(page: str) -> list[str]:
    tags = re.findall(r"<script\b[^>]*\bsrc\s*=[^>]*>", page, flags=re.I)
    links = re.findall(r"<link\b[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//[^>]*>", page, flags=re.I)
    imgs = re.findall(r"<img\b[^>]*\bsrc\s*=\s*[\"'](?!data:)[^>]*>", page, flags=re.I)
    return tags + links + imgs


def test_render_report_is_self_contained_with_every_figure(tmp_path):
    res = make_results(tmp_path)
    path = render_report(fit_report(res), tmp_path / "dashboards" / res.study)
    assert path == tmp_path / "dashboards" / res.study / "index.html"
    page = path.read_text(encoding="utf-8")
    assert _scripts_with_remote_src(page) == []  # nothing loaded from the network (or from disk)
    assert page.count("* plotly.js v") == 1  # the library is inlined exactly once
    for fid in FIGURE_IDS + ["fig-synergy-images_per_s", "fig-synergy-kd", "fig-synergy-precision"]:
        assert f'id="{fid}"' in page, fid
    assert page.count("Plotly.newPlot(") == len(FIGURE_IDS) + 3
    # samples embedded as data URIs, one per recorded cell
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 3
    # failed and excluded cells with their reasons
    for text in (
        "CUDA out of memory at step 120",
        "loss is NaN at step 310",
        "constraint: sprint requires repa",
        "excluded",
        "oom",
        "diverged",
    ):
        assert text in page, text
    # the summary: best reliable combination, strongest synergy, no flags in this study
    summary = page[page.index('id="sec-summary"') : page.index('id="sec-fig-synergy"')]
    assert "repa+rope" in summary and "strongest synergy" in summary and "none flagged" in summary
    assert "positive = better" in page
    # side files: the analysis as JSON, per-cell CSV, a summary for the index page
    effects = json.loads((path.parent / "effects.json").read_text())
    assert set(effects) == {"fd", "images_per_s", "kd", "precision"}
    assert effects["images_per_s"]["scale"] == "log"
    assert effects["fd"]["synergy"]["repa:rope"] > 0
    cells = pd.read_csv(path.parent / "cells.csv")
    assert len(cells) == 7
    assert json.loads((path.parent / "summary.json").read_text())["study"] == res.study


def test_report_shows_flagged_incompatibility(tmp_path):
    res = make_results(tmp_path, planted_failure=True)
    page = render_report(fit_report(res), tmp_path / "out").read_text(encoding="utf-8")
    summary = page[page.index('id="sec-summary"') : page.index('id="sec-fig-synergy"')]
    assert "repa:sprint" in summary and "runs fail together" in summary
    assert "fails \\u2715" in page or "fails ✕" in page  # the heatmap cell of the failed pair (JSON-escaped)
    effects = json.loads((tmp_path / "out" / "effects.json").read_text())
    assert [(f["pair"], f["kind"]) for f in effects["fd"]["incompatible"]] == [("repa:sprint", "failure")]


def test_report_for_fractional_and_ladder_designs(tmp_path):
    # a 2^(4-1) half fraction (I = ABCD): pairs are aliased in the heatmap and the alias table
    rows = []
    for a, b, c in itertools.product([0, 1], repeat=3):
        d = (a + b + c) % 2
        for s in range(2):
            rows.append(
                {
                    "trial": f"t{len(rows)}",
                    "cell": "+".join(f for f, v in zip("ABCD", (a, b, c, d)) if v) or "baseline",
                    "seed": s,
                    "status": "finished",
                    "status_reason": "",
                    "A": a,
                    "B": b,
                    "C": c,
                    "D": d,
                    "fd": 10 - a - b + 0.1 * s + 0.05 * c,
                }
            )
    frac = StudyResults(
        study="frac",
        design="frac(res=4)",
        factors=list("ABCD"),
        metric="fd",
        direction="min",
        table=pd.DataFrame(rows),
        aliases={"A:B": ["C:D"], "A:C": ["B:D"], "A:D": ["B:C"]},
    )
    page = render_report(fit_report(frac), tmp_path / "frac").read_text(encoding="utf-8")
    assert "aliased" in page and "A:B + C:D" in page
    assert json.loads((tmp_path / "frac" / "effects.json").read_text())["fd"]["synergy"]["A:B"] is None
    # a ladder design (nested cells only): the waterfall is drawn, no synergy is invented
    chain = [[], ["A"], ["A", "B"], ["A", "B", "C"]]
    rows = [
        {
            "trial": f"t{i}{s}",
            "cell": "+".join(on) or "baseline",
            "seed": s,
            "status": "finished",
            "status_reason": "",
            **{f: int(f in on) for f in "ABC"},
            "fd": 10 - 2 * len(on) + 0.1 * s,
        }
        for i, on in enumerate(chain)
        for s in range(2)
    ]
    lad = StudyResults(
        study="ladder",
        design="ladder",
        factors=list("ABC"),
        metric="fd",
        direction="min",
        table=pd.DataFrame(rows),
        ladder_order=["A", "B", "C"],
    )
    page = render_report(fit_report(lad), tmp_path / "ladder").read_text(encoding="utf-8")
    assert 'id="fig-ladder"' in page and "n/a" in page
    assert 'strongest synergy</div><div class="value">not estimable' in page  # not "none"
    # a study where nothing finished still renders, saying why
    dead = StudyResults(
        study="dead",
        design="full",
        factors=["A", "B"],
        metric="fd",
        direction="min",
        table=pd.DataFrame(
            [
                {
                    "trial": "t",
                    "cell": "A",
                    "seed": 0,
                    "status": "crashed",
                    "status_reason": "boom",
                    "A": a,
                    "B": b,
                    "fd": np.nan,
                }
                for a in (0, 1)
                for b in (0, 1)
            ]
        ),
    )
    page = render_report(fit_report(dead), tmp_path / "dead").read_text(encoding="utf-8")
    assert "not possible" in page and "no finished run" in page


def test_render_index_lists_every_study(tmp_path):
    dash = tmp_path / "dashboards"
    res = make_results(tmp_path)
    render_report(fit_report(res), dash / res.study)
    other = make_results(tmp_path, seed=1)
    other.study = "second_study"
    render_report(fit_report(other), dash / other.study)
    (dash / "not_a_study").mkdir()
    path = render_index(dash)
    assert path == dash / "index.html"
    page = path.read_text(encoding="utf-8")
    assert 'href="digits_factorial_test/index.html"' in page and 'href="second_study/index.html"' in page
    assert "not_a_study" not in page
    assert _scripts_with_remote_src(page) == []


def test_write_records_appends_and_refreshes(tmp_path):
    path = tmp_path / "dashboards" / "RECORDS.md"
    res = make_results(tmp_path)
    write_records(res, path)
    text = path.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.startswith("| digits_factorial_test")]
    assert len(lines) == 7  # one row per arm (cell)
    t = res.table
    ok = t["status"] == "finished"
    base = t[ok & (t.cell == "baseline")]["fd"]
    arm = t[ok & (t.cell == "repa+rope")]["fd"]
    p = stats.ttest_ind(arm, base, equal_var=False).pvalue
    row = next(ln for ln in lines if "| repa+rope |" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{arm.mean():.4g} ± {arm.std(ddof=1):.4g} (n=3)"
    assert cells[4] == f"{p:.3g}"
    assert cells[5] == "0123456789ab" and cells[6] == "2026-11-02"
    assert "(n=1, 2 failed)" in text  # repa+rope+sprint: 1 finished of 3
    # a second study is appended; re-writing the first refreshes its rows without duplicating them
    other = make_results(tmp_path, seed=3)
    other.study = "another"
    write_records(other, path)
    res.commit = "fedcba9876543210"
    write_records([res], path)
    text = path.read_text(encoding="utf-8")
    assert sum(ln.startswith("| digits_factorial_test") for ln in text.splitlines()) == 7
    assert sum(ln.startswith("| another") for ln in text.splitlines()) == 7
    assert "fedcba987654" in text and "| 0123456789ab |" not in text.split("| another")[0]
    assert text.count("| study | arm |") == 1


@pytest.mark.parametrize("bad", ["missing.png", "not_png"])
def test_missing_sample_grid_is_reported_not_fatal(tmp_path, bad):
    res = make_results(tmp_path)
    if bad == "not_png":
        (tmp_path / "x.png").write_text("not a png")
        res.samples = {"baseline": str(tmp_path / "x.png")}
    else:
        res.samples = {"baseline": str(tmp_path / bad)}
    page = render_report(fit_report(res, bootstrap=False), tmp_path / "out").read_text(encoding="utf-8")
    assert "sample grid missing" in page


def test_unreplicated_screen_gets_a_half_normal_plot_with_lenths_margins(tmp_path):
    # Montgomery's filtration rate (2^4, one run per cell): Lenth's margins and the active effects on the page
    labels = ["1", "a", "b", "ab", "c", "ac", "bc", "abc", "d", "ad", "bd", "abd", "cd", "acd", "bcd", "abcd"]
    vals = [45, 71, 48, 65, 68, 60, 80, 65, 43, 100, 45, 104, 75, 86, 70, 96]
    rows = [
        {
            "trial": lab,
            "cell": lab,
            "seed": 0,
            "status": "finished",
            "status_reason": "",
            **{f.upper(): int(f in lab) for f in "abcd"},
            "rate": v,
        }
        for lab, v in zip(labels, vals)
    ]
    res = StudyResults(
        study="screen", design="full", factors=list("ABCD"), metric="rate", direction="max", table=pd.DataFrame(rows)
    )
    page = render_report(fit_report(res), tmp_path / "screen").read_text(encoding="utf-8")
    sec = page[page.index('id="sec-fig-half-normal"') : page.index('id="sec-fig-effects"')]
    assert 'id="fig-half-normal"' in sec and "PSE = 2.62" in sec and "A, C, D, A:C, A:D" in sec
    assert "point estimate" in page  # no error estimate: the best cell is not called a winner
    cells = page[page.index('id="sec-cells"') :]
    assert 'tag good">best<' not in cells and "highest (point estimate)" in cells  # nor in the cells table


def test_cells_table_calls_a_cell_best_only_when_the_card_does(tmp_path):
    """Replicated cells that are all equal up to noise: the highest mean is not distinguishable from the others,
    so neither the summary card nor the cells table calls it the best."""
    rng = np.random.default_rng(3)
    rows = [
        {"trial": f"{lab}-s{s}", "cell": lab, "seed": s, "status": "finished", "status_reason": "",
         "A": int(lab[0]), "B": int(lab[1]), "fd": 10.0 + rng.normal(0, 1.0)}
        for lab in ("00", "01", "10", "11") for s in range(3)
    ]  # fmt: skip
    res = StudyResults(study="flat", design="full", factors=["A", "B"], metric="fd", direction="min",
                       table=pd.DataFrame(rows))  # fmt: skip
    page = render_report(fit_report(res), tmp_path / "flat").read_text(encoding="utf-8")
    cells = page[page.index('id="sec-cells"') :]
    assert "not distinguishable" in page and 'tag good">best<' not in cells
    assert "highest mean · not distinguishable from 3 others" in cells


def test_records_tell_a_trial_lost_to_infrastructure_from_a_failed_one(tmp_path):
    """A crash of what the trial ran on (a lost node, a full disk) is not the arm's failure: the records row says
    which is which."""
    path = tmp_path / "RECORDS.md"
    res = make_results(tmp_path)
    t = res.table
    rows = t.index[(t.cell == "repa+rope+sprint") & (t["status"] != "finished")]
    assert len(rows) == 2
    t.loc[rows[0], "status"] = "crashed"
    t.loc[rows[0], "crash_cause"] = "infrastructure"
    t.loc[rows[1], "status"] = "crashed"
    t.loc[rows[1], "crash_cause"] = "code"
    write_records(res, path)
    text = path.read_text(encoding="utf-8")
    assert "(n=1, 1 failed, 1 lost to infrastructure)" in text


def test_every_panel_names_cells_by_their_techniques_not_their_ids(tmp_path):
    """A real study's cell ids are bit strings ("110"): the Pareto points, the learning-curve legend and the
    sample-grid captions show "repa+rope" (the id only beside it or in the hover); cells.csv carries both."""
    import dataclasses

    from srdit.analysis.figures import fig_curves, fig_pareto

    res = make_results(tmp_path)
    bits = {c: "".join(str(int(f in c.split("+"))) for f in res.factors) for c in res.table["cell"].unique()}
    res = dataclasses.replace(
        res,
        table=res.table.assign(cell=res.table["cell"].map(bits)),
        curves=res.curves.assign(cell=res.curves["cell"].map(bits)),
        samples={bits[c]: p for c, p in res.samples.items()},
    )
    assert res.cell_names()["110"] == "repa+rope" and res.cell_names()["000"] == "baseline"
    fit = fit_report(res, bootstrap=False)
    pareto = fig_pareto(res, fit.primary)
    texts = [t for trace in pareto.data if trace.text is not None for t in trace.text]
    assert "repa+rope" in texts and not any(re.fullmatch(r"[01]{3}", t) for t in texts)
    curves = fig_curves(res, list(bits.values()), "000")
    legend = {trace.name for trace in curves.data}
    assert {"baseline", "repa+rope", "repa+rope+sprint"} <= legend
    assert not any(re.fullmatch(r"[01]{3}.*", n) for n in legend)
    page = render_report(fit, tmp_path / "dashboards" / res.study).read_text(encoding="utf-8")
    assert "<figcaption>repa+rope <code>110</code></figcaption>" in page
    cells = pd.read_csv(tmp_path / "dashboards" / res.study / "cells.csv", dtype=str)
    assert ("repa+rope", "110") in set(zip(cells["combo"], cells["cell"]))


def test_the_cells_table_shows_every_run_by_seed_and_links_the_side_files(tmp_path):
    res = make_results(tmp_path)
    page = render_report(fit_report(res, bootstrap=False), tmp_path / "d").read_text(encoding="utf-8")
    cells = page[page.index('id="sec-cells"') : page.index("</section>", page.index('id="sec-cells"'))]
    assert '<a href="cells.csv">cells.csv</a>' in cells and '<a href="effects.json">effects.json</a>' in cells
    t = res.table
    row = t[(t["cell"] == "repa") & (t["seed"] == 1)].iloc[0]
    assert f"1: {row['fd']:.4g}" in cells or f"1: {row['fd']:.4f}" in cells  # a finished run's value
    assert '2: <span class="tag bad">oom</span>' in cells  # repa+sprint, seed 2 ran out of memory
