"""The study report renders in a real browser (headless Chromium): no JavaScript error, every plotly figure drawn,
and a screenshot that is not blank. Needs the Debian `chromium` package (CI installs it)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_report import make_results  # noqa: E402

from srdit.analysis.page import render_report  # noqa: E402
from srdit.analysis.report_fit import fit_report  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and Path(p).exists()
    ),
    None,
)


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def decode_png(data: bytes) -> np.ndarray:
    """Minimal PNG decoder (8-bit gray / RGB / RGBA, not interlaced); reverses the five row filters of the PNG
    specification (W3C PNG, section 9 "Filtering")."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        typ, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if typ == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", chunk)
        elif typ == b"IDAT":
            idat.append(chunk)
        elif typ == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and interlace == 0 and ctype in (0, 2, 6), hdr
    bpp = {0: 1, 2: 3, 6: 4}[ctype]
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(h):
        ft = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        if ft == 0:  # None
            cur = line
        elif ft == 2:  # Up
            cur = (line + prev) & 0xFF
        elif ft == 1:  # Sub: a running sum per channel
            cur = (np.cumsum(line.reshape(w, bpp), axis=0) & 0xFF).reshape(-1)
        else:  # Average (3), Paeth (4): depend on the reconstructed left byte, so sequential
            lst, pr, rec = line.tolist(), prev.tolist(), [0] * stride
            for i in range(stride):
                a = rec[i - bpp] if i >= bpp else 0
                b = pr[i]
                if ft == 3:
                    rec[i] = (lst[i] + ((a + b) >> 1)) & 0xFF
                else:
                    c = pr[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    rec[i] = (lst[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            cur = np.array(rec, dtype=np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)


def test_png_decoder_roundtrip():
    from test_report import png_bytes

    img = decode_png(png_bytes(5, 4, lambda x, y: (x * 50, y * 60, 7)))
    assert img.shape == (4, 5, 3)
    assert img[3, 4].tolist() == [200, 180, 7]


# CI (.ci/run) installs chromium and sets SRDIT_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping.
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("SRDIT_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_report_renders_in_headless_chromium(tmp_path):
    res = make_results(tmp_path)
    page = render_report(fit_report(res), tmp_path / "dash" / res.study)
    html = page.read_text(encoding="utf-8")
    fig_ids = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', html)
    assert len(fig_ids) == 9 and "fig-over-steps" in fig_ids  # with the effects over training
    url = page.resolve().as_uri()

    dom_run = chromium(["--dump-dom", url], tmp_path / "profile1")
    assert dom_run.returncode == 0, dom_run.stderr[-2000:]
    dom = dom_run.stdout
    # errors caught by the page's window.onerror hook, and console errors logged by Chromium
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, flags=re.S)
    assert errors is not None and errors.group(1).strip() == "", errors and errors.group(1)
    console = [ln for ln in dom_run.stderr.splitlines() if "CONSOLE" in ln and ("Error" in ln or "Uncaught" in ln)]
    assert console == [], console
    # every figure div became a plotly plot with its SVG drawn
    for fid in fig_ids:
        tag = re.search(rf'<div id="{re.escape(fid)}"[^>]*>', dom)
        assert tag and "js-plotly-plot" in tag.group(0), fid
    assert dom.count('class="main-svg"') >= 2 * len(fig_ids)
    assert dom.count('class="heatmaplayer') == 4  # the main synergy matrix and one per other metric
    assert len(re.findall(r'<img [^>]*src="data:image/png', dom)) == 3

    shot = tmp_path / "shot.png"
    shot_run = chromium(
        [f"--screenshot={shot}", "--window-size=1400,3000", "--hide-scrollbars", url], tmp_path / "profile2"
    )
    assert shot.exists(), shot_run.stderr[-2000:]
    img = decode_png(shot.read_bytes()).astype(float)
    assert img.shape[:2] == (3000, 1400)
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 20  # not blank
    background = np.median(gray)
    assert (np.abs(gray - background) > 30).mean() > 0.05  # a substantial part of the page is drawn
    colours = {tuple(p) for p in img[::7, ::7, :3].reshape(-1, 3).astype(int).tolist()}
    assert len(colours) > 200  # figures, not a flat page


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("SRDIT_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_leave_one_out_report_renders_without_errors(tmp_path):
    """A leave-one-out study has no estimable pair: the synergy matrix is replaced by a sentence (an all-empty
    heatmap made plotly throw), and every figure that is drawn renders without JavaScript errors."""
    import dataclasses

    import pandas as pd

    base = make_results(tmp_path)
    factors = ["repa", "rope", "sprint"]
    cells = [dict.fromkeys(factors, 1)] + [{**dict.fromkeys(factors, 1), f: 0} for f in factors]
    rows = []
    for i, x in enumerate(cells):
        cell = "+".join(f for f in factors if x[f])
        rows.append(
            {
                "trial": f"t{i}",
                "cell": cell,
                "seed": 0,
                "status": "finished",
                "status_reason": "",
                **x,
                "fd": 20.0 + 3 * i,
                "kd": 0.2 + 0.01 * i,
                "precision": 0.6,
                "images_per_s": 100.0 + i,
                "loss": 0.4,
            }
        )
    curves = pd.DataFrame(
        [
            {"trial": r["trial"], "cell": r["cell"], "seed": 0, "key": "loss", "step": s, "value": 1.0 / (1 + s)}
            for r in rows
            for s in (0, 10, 20)
        ]
    )
    res = dataclasses.replace(
        base, study="loo", design="loo", table=pd.DataFrame(rows), curves=curves, samples={}, excluded=[], aliases={}
    )
    page = render_report(fit_report(res), tmp_path / "dash" / "loo")
    html = page.read_text(encoding="utf-8")
    assert "No pairwise synergy is estimable here" in html
    fig_ids = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', html)
    assert fig_ids and not any(f.startswith("fig-synergy") for f in fig_ids)
    run = chromium(["--dump-dom", page.resolve().as_uri()], tmp_path / "profile")
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', run.stdout, flags=re.S)
    assert errors is not None and errors.group(1).strip() == "", errors and errors.group(1)
    for fid in fig_ids:
        tag = re.search(rf'<div id="{re.escape(fid)}"[^>]*>', run.stdout)
        assert tag and "js-plotly-plot" in tag.group(0), fid


def trust_study():
    """2^3 x 3 seeds where the full stack always runs out of memory (every effect partially aliased), no pair
    effect (every pair not significant), a loss curve of 11 points and an fd evaluated once per run."""
    import itertools

    import pandas as pd

    from srdit.analysis.results import StudyResults

    rng = np.random.default_rng(0)
    F = ["repa", "rope", "sprint"]
    rows, curves = [], []
    for i, lv in enumerate(itertools.product([0, 1], repeat=3)):
        x = dict(zip(F, lv))
        cell = f"c{i}"
        for s in range(3):
            oom = all(lv)
            fd = 20 - 3 * x["repa"] - 1.5 * x["rope"] + rng.normal(0, 0.4)
            key = f"{cell}-{s}"
            rows.append(
                {
                    "trial": key,
                    "cell": cell,
                    "seed": s,
                    "status": "oom" if oom else "finished",
                    "status_reason": "CUDA out of memory" if oom else "",
                    **x,
                    "fd": np.nan if oom else fd,
                }
            )
            if not oom:
                curves += [
                    {
                        "trial": key,
                        "cell": cell,
                        "seed": s,
                        "key": "loss",
                        "step": st,
                        "value": 1.0 / (1 + st / 50) + 0.05 * x["repa"] * 0 + rng.normal(0, 0.01),
                    }
                    for st in range(0, 201, 20)
                ]
                curves.append({"trial": key, "cell": cell, "seed": s, "key": "fd", "step": 200, "value": fd})
    return StudyResults(
        study="trust",
        design="full",
        factors=F,
        metric="fd",
        direction="min",
        table=pd.DataFrame(rows),
        curves=pd.DataFrame(curves),
        commit="abc123",
        date="2026-11-30",
        description="Does REPA stack with RoPE and SPRINT on digits?",
        steps=200,
    )


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("SRDIT_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_report_says_how_sure_it_is_in_chromium(tmp_path):
    res = trust_study()
    page = render_report(fit_report(res, bootstrap=False), tmp_path / "dash" / res.study)
    url = page.resolve().as_uri()
    dom_run = chromium(["--dump-dom", url], tmp_path / "profile1")
    assert dom_run.returncode == 0, dom_run.stderr[-2000:]
    dom = dom_run.stdout
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, flags=re.S)
    assert errors is not None and errors.group(1).strip() == ""
    # header context: training length (short runs), seeds per cell, runs finished, the description
    header = dom[dom.index("<header>") : dom.index("</header>")]
    for s in (
        "training length <b>200 steps</b>",
        "short runs",
        "3 seed(s) per cell",
        "21 of 24 runs finished",
        "Does REPA stack with RoPE and SPRINT on digits?",
    ):
        assert s in header, s
    # the synergy matrix as drawn: partially aliased cells marked, nothing significant, so nothing in full colour
    syn = dom[dom.index('id="fig-synergy"') : dom.index('id="sec-fig-effects"')]
    labels = re.findall(r'class="heatmap-label"><text [^>]*data-unformatted="([^"]*)"', syn)
    assert sum("partly aliased" in t for t in labels) == 3  # the three pairs, in the drawn SVG
    assert not any("n.s." in t or "*" in t for t in labels)  # partially aliased pairs are not tested
    # the best combination is not a bare point estimate
    summary = dom[dom.index('id="sec-summary"') : dom.index('id="sec-fig-synergy"')]
    assert "not distinguishable" in summary or "distinguishable" in summary
    # learning curves open on the loss (a real curve) and draw lines
    cur = dom[dom.index('id="fig-curves"') :]
    cur = cur[: cur.index("</section>")]
    assert re.search(r'class="g-ytitle".*?>loss<', cur, flags=re.S)
    lines = re.findall(r'class="js-line" d="M([^"]+)"', cur)
    assert sum(len(d) > 40 for d in lines) >= 7  # the 7 finished cells, each a line of 11 points

    # a complete replicated study: muted (n.s.) cells and a starred one
    import dataclasses

    t = res.table.copy()
    t.loc[t.status == "oom", ["status", "fd"]] = ["finished", 14.0]
    t.loc[(t.repa == 1) & (t.rope == 1), "fd"] -= 3.0  # a real repa:rope synergy
    page2 = render_report(
        fit_report(dataclasses.replace(res, table=t, study="trust2"), bootstrap=False), tmp_path / "dash" / "trust2"
    )
    dom2 = chromium(["--dump-dom", page2.resolve().as_uri()], tmp_path / "profile2").stdout
    syn2 = dom2[dom2.index('id="fig-synergy"') : dom2.index('id="sec-fig-effects"')]
    labels2 = re.findall(r'class="heatmap-label"><text [^>]*data-unformatted="([^"]*)"', syn2)
    assert sum("n.s." in t for t in labels2) == 2 and sum("*" in t for t in labels2) == 1
    # the muted layer (opacity < 1) holds the two non-significant cells, the full-colour layer the starred one
    assert re.search(r'class="hm"[^>]*style="opacity: 0\.28', syn2) or "opacity: 0.28" in syn2

    shot = Path(os.environ.get("SRDIT_SHOT_DIR", tmp_path)) / "trust_report.png"
    chromium([f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars", url], tmp_path / "profile3")
    img = decode_png(shot.read_bytes()).astype(float)
    assert img[..., :3].mean(axis=2).std() > 20


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("SRDIT_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_tracking_ui_opens_an_experiment_on_its_runs(tmp_path):
    """The server srdit starts (`srdit ui`, tracking servers) opens a plain experiment URL on Runs in a fresh
    browser profile; MLflow's own app opens it on its GenAI overview."""
    from mlflow import MlflowClient

    from srdit.runtime.tracking import start_server, stop_server

    proc = start_server(f"sqlite:///{tmp_path / 'ui.db'}", tmp_path / "art", port=0, log_path=tmp_path / "ui.log")
    try:
        url = proc.url
        client = MlflowClient(url)
        eid = client.create_experiment("ui")
        parent = client.create_run(eid, run_name="study")
        child = client.create_run(eid, run_name="rope · s0", tags={"mlflow.parentRunId": parent.info.run_id})
        client.log_metric(child.info.run_id, "fd", 1.5)
        dom = chromium(["--dump-dom", f"{url}/#/experiments/{eid}"], tmp_path / "profile").stdout
        assert "matching runs" in dom, "the experiment did not open on its runs table"
        assert "Detect Issues" not in dom  # the GenAI overview's button
    finally:
        stop_server(proc)


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("SRDIT_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_report_reads_at_a_glance_in_chromium(tmp_path):
    """Drawn in Chromium: the protocol in the header, technique names on the Pareto points with the panel's own
    note on where throughput comes from, the effects tables in one convention each with labelled intervals, the
    ladder's and leave-one-out's error bars, and links to cells.csv, effects.json and each MLflow run. Screenshots
    go to $SRDIT_SHOT_DIR when set."""
    import dataclasses

    from test_report_protocol import PARAMS

    from srdit.runtime.results import eval_protocol

    base = make_results(tmp_path)
    t = base.table.assign(run_id=[f"{i:032x}" for i in range(len(base.table))])
    for k, v in eval_protocol(PARAMS, "cpu (x86_64, 2 threads)").items():
        t[k] = v
    res = dataclasses.replace(base, table=t, mlflow_ui="http://mlflow.lab:5000/#/experiments/7")
    page = render_report(fit_report(res, bootstrap=False), tmp_path / "dash" / res.study)
    url = page.resolve().as_uri()
    dom_run = chromium(["--dump-dom", url], tmp_path / "profile1")
    dom = dom_run.stdout
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, flags=re.S)
    assert errors is not None and errors.group(1).strip() == "", errors and errors.group(1)
    header = dom[dom.index("<header>") : dom.index("</header>")]
    assert "every metric evaluated under one protocol" in header and "sampling steps <b>50</b>" in header
    # the Pareto panel as drawn: technique names on the points, the throughput caveat on the panel itself
    par = dom[dom.index('id="fig-pareto"') : dom.index('id="sec-fig-curves"')]
    texts = re.findall(r'class="textpoint"[^>]*>\s*<text[^>]*>([^<]+)</text>', par)
    assert "repa+rope" in texts and not any(re.fullmatch(r"[01]+", x) for x in texts), texts
    assert "shared the machine" in par and "shared machine" in par
    # the ladder and leave-one-out bars carry error bars (plotly draws them as "errorbar" paths)
    lad = dom[dom.index('id="fig-ladder"') : dom.index('id="sec-fig-pareto"')]
    assert lad.count('class="errorbar"') >= 2
    tables = dom[dom.index('id="sec-effects-table"') : dom.index('id="sec-cells"')]
    assert "individual 95% CI" in tables and "simultaneous 95% CI" in tables and "p<sub>Bonf</sub> (decision)" in tables
    cells = dom[dom.index('id="sec-cells"') :]
    assert '<a href="cells.csv">cells.csv</a>' in cells and '<a href="effects.json">effects.json</a>' in cells
    assert cells.count('href="http://mlflow.lab:5000/#/experiments/7/runs/') == len(t)

    shots = Path(os.environ.get("SRDIT_SHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    full = shots / "report_glance.png"
    chromium([f"--screenshot={full}", "--window-size=1400,9000", "--hide-scrollbars", url], tmp_path / "profile2")
    img = decode_png(full.read_bytes()).astype(float)
    assert img[..., :3].mean(axis=2).std() > 20

    # a complete replicated factorial: tested pairs in the pair table, error bars on every ladder step and
    # leave-one-out bar
    from test_report_intervals import factorial

    fac = factorial(seeds=3, synergy=2.0)
    page2 = render_report(fit_report(fac, bootstrap=False), tmp_path / "dash" / "fac")
    dom2 = chromium(["--dump-dom", page2.resolve().as_uri()], tmp_path / "profile3").stdout
    lad = dom2[dom2.index('id="fig-ladder"') : dom2.index('id="sec-fig-pareto"')]
    assert lad.count('class="errorbar"') == 3
    eff = dom2[dom2.index('id="fig-effects"') : dom2.index('id="sec-fig-over-steps"')]
    assert eff.count('class="errorbar"') == 6  # main effects and leave-one-out, three techniques each
    pairs = dom2[dom2.index("<h3>Per pair") : dom2.index('id="sec-cells"')]
    assert "over the 3 tested pair(s)" in pairs and re.search(r"<td>repa:rope</td>.*?significant", pairs, re.S)
    chromium(
        [
            f"--screenshot={shots / 'report_factorial.png'}",
            "--window-size=1400,7000",
            "--hide-scrollbars",
            page2.resolve().as_uri(),
        ],
        tmp_path / "profile4",
    )

    # a mixed-protocol study: the refusal at the top, no comparison drawn
    t3 = t.assign(**{"protocol.sampling_steps": ["25" if x else "50" for x in t["sprint"]]})
    page3 = render_report(fit_report(dataclasses.replace(res, table=t3), bootstrap=False), tmp_path / "dash" / "mixed")
    dom3 = chromium(["--dump-dom", page3.resolve().as_uri()], tmp_path / "profile5").stdout
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom3, flags=re.S)
    assert errors is not None and errors.group(1).strip() == ""
    assert "2 different protocols" in dom3[: dom3.index("</header>")]
    assert 'id="sec-protocols"' in dom3 and 'id="fig-synergy"' not in dom3 and 'id="fig-pareto"' not in dom3
    chromium(
        [
            f"--screenshot={shots / 'report_mixed.png'}",
            "--window-size=1400,1800",
            "--hide-scrollbars",
            page3.resolve().as_uri(),
        ],
        tmp_path / "profile6",
    )


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("SRDIT_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_the_study_link_opens_its_trials_with_metric_and_technique_columns(tmp_path):
    """The link `srdit ui` and `study run` print (`view_url`) opens the study's saved view in a fresh browser
    profile: the trials as rows (not folded under the parent run), the primary metric and the techniques as
    columns."""
    from mlflow import MlflowClient

    from srdit.runtime.tracking import open_study, start_server, stop_server, view_url
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    spec = load_study(Path(__file__).resolve().parent.parent / "studies" / "digits_quick.yaml")
    proc = start_server(f"sqlite:///{tmp_path / 'ui.db'}", tmp_path / "art", port=0, log_path=tmp_path / "ui.log")
    try:
        t = open_study(proc.url, spec.name, spec.name, tmp_path)
        t.describe(spec, plan_study(spec))
        client = MlflowClient(proc.url)
        for name, fd in (("rope · s0", 2.5), ("baseline · s0", 3.5)):
            tags = {"mlflow.parentRunId": t.parent_run_id, "srdit.role": "trial", "techniques": name.split(" ")[0]}
            run = client.create_run(
                t.experiment_id, run_name=name, tags={**tags, "tech.rope": str(int("rope" in name))}
            )
            client.log_metric(run.info.run_id, spec.metrics.primary, fd)
            client.set_terminated(run.info.run_id)
        dom = chromium(["--dump-dom", view_url(proc.url, t.experiment_id)], tmp_path / "profile").stdout
    finally:
        stop_server(proc)
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    assert "shared view" in text and f"{spec.name}: trials by {spec.metrics.primary}" in text, text[-3000:]
    assert "2 matching runs" in text  # the two trials, the parent run left out by the view's filter
    header = text[text.index("Run Name") :]
    assert header.startswith(f"Run Name Created Metrics Tags {spec.metrics.primary} techniques tech.rope "), header[
        :200
    ]
    assert header.index("rope · s0") < header.index("baseline · s0")  # best first by the primary metric (min)
