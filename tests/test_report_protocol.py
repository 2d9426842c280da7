"""The report states the evaluation protocol its metrics were computed under and refuses to compare metrics of
different protocols (planted mixed-protocol studies); each run's value links to its MLflow run."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from srdit.analysis.effects import AnalysisFailure
from srdit.analysis.page import render_report
from srdit.analysis.report_fit import fit_report, protocols
from srdit.runtime.results import eval_protocol

sys.path.insert(0, str(Path(__file__).parent))
from test_report import make_results  # noqa: E402

PARAMS = {
    "sample.sampler": "sde",
    "sample.steps": "50",
    "sample.cfg_scale": "1.0",
    "sample.cls_cfg_scale": "1.0",
    "sample.guidance_low": "0.0",
    "sample.guidance_high": "1.0",
    "sample.path_drop_guidance": "False",
    "sample.balanced_labels": "False",
    "eval.n_samples": "1000",
    "eval.reference": "None",
    "train.precision": "auto",
    "data.dataset": "digits",
}


def test_a_runs_protocol_is_read_from_its_config_params():
    cpu = eval_protocol(PARAMS, "cpu (x86_64, 2 threads)")
    assert cpu == {
        "protocol.sampler": "sde",
        "protocol.sampling_steps": "50",
        "protocol.guidance": "1.0",
        "protocol.guidance_interval": "[0.0, 1.0]",
        "protocol.labels": "random",
        "protocol.n_samples": "1000",
        "protocol.reference": "held-out digits (in-project metric network)",
        "protocol.precision": "fp32 (auto)",
    }
    latent = {
        **PARAMS,
        "sample.cfg_scale": "1.5",
        "sample.cls_cfg_scale": "1.5",
        "sample.guidance_high": "0.75",
        "sample.balanced_labels": "True",
        "eval.reference": "/refs/VIRTUAL_imagenet256_labeled.npz",
        "data.dataset": "latents",
    }
    gpu = eval_protocol(latent, "NVIDIA H100 80GB HBM3")
    assert gpu["protocol.guidance"] == "1.5, class token 1.5" and gpu["protocol.guidance_interval"] == "[0.0, 0.75]"
    assert gpu["protocol.labels"] == "balanced" and gpu["protocol.reference"] == "VIRTUAL_imagenet256_labeled.npz"
    assert gpu["protocol.precision"] == "bf16 autocast (auto)"
    assert eval_protocol({**PARAMS, "train.precision": "fp32"}, "NVIDIA H100")["protocol.precision"] == "fp32"
    assert eval_protocol({"train.steps": "6"}, "cpu") == {}  # a run that recorded no config


def _with_protocol(res, steps_of=lambda row: "50"):
    t = res.table.copy()
    proto = eval_protocol(PARAMS, "cpu (x86_64, 2 threads)")
    for k, v in proto.items():
        t[k] = v
    t["protocol.sampling_steps"] = [steps_of(r) for _, r in t.iterrows()]
    return dataclasses.replace(res, table=t)


def test_the_header_states_the_one_protocol(tmp_path):
    res = _with_protocol(make_results(tmp_path))
    fit = fit_report(res, bootstrap=False)
    assert len(fit.protocols) == 1 and fit.protocol_error is None
    html = render_report(fit, tmp_path / "d").read_text(encoding="utf-8")
    header = html[html.index("<header>") : html.index("</header>")]
    for s in (
        "every metric evaluated under one protocol",
        "sampler <b>sde</b>",
        "sampling steps <b>50</b>",
        "guidance scale <b>1.0</b>",
        "guidance interval <b>[0.0, 1.0]</b>",
        "label sampling <b>random</b>",
        "samples <b>1000</b>",
        "reference statistics <b>held-out digits (in-project metric network)</b>",
        "precision <b>fp32 (auto)</b>",
    ):
        assert s in header, s
    # a table without the columns (a CSV): the header says the protocol is not recorded
    bare = render_report(fit_report(make_results(tmp_path), bootstrap=False), tmp_path / "b").read_text()
    assert "evaluation protocol <span" in bare and "not recorded" in bare


def test_metrics_of_different_protocols_are_never_compared(tmp_path):
    """Planted: the runs with sprint were evaluated with 25 sampling steps, the others with 50."""
    res = _with_protocol(make_results(tmp_path), lambda r: "25" if r["sprint"] else "50")
    fit = fit_report(res, bootstrap=False)
    assert [p.values["protocol.sampling_steps"] for p in fit.protocols] == ["50", "25"]
    assert fit.protocols[1].cells == ["sprint", "repa+sprint", "repa+rope+sprint"]
    msg = fit.protocol_error
    assert msg.startswith("the runs' metrics were computed under 2 different evaluation protocols (sampling steps:")
    assert "50 (baseline, repa, rope, repa+rope)" in msg and "25 (sprint, repa+sprint, repa+rope+sprint)" in msg
    assert "sampler" not in msg  # only what differs is named
    assert all(isinstance(a, AnalysisFailure) and a.error == msg for a in fit.analyses.values())
    html = render_report(fit, tmp_path / "d").read_text(encoding="utf-8")
    assert html.count("no comparison is made") + html.count("No comparison is made") >= 2  # header and section
    assert 'id="sec-protocols"' in html and "not comparable" in html
    # nothing compares the metrics: no matrix, no effects, no Pareto, no fd curve (the loss curves stay)
    for fid in ("fig-synergy", "fig-effects", "fig-ladder", "fig-pareto"):
        assert f'<div id="{fid}"' not in html, fid
    assert 'id="sec-effects-table"' not in html and 'id="sec-cells"' not in html
    curves = html[html.index('<div id="fig-curves"') :]
    assert '"name":"baseline' in curves.replace(" ", "")
    assert '"fd"' not in curves[: curves.index("</script>")]
    import re

    legend = re.findall(r'"name":"([^"]+)"', curves[: curves.index("</script>")].replace(" ", ""))
    assert legend[:3] == ["baseline", "repa", "rope"] and legend[-1] == "repa+rope+sprint"  # stacking order
    # runs without a protocol (a failed run) do not count
    t = res.table.copy()
    t.loc[t["sprint"] == 1, "status"] = "crashed"
    t.loc[t["sprint"] == 1, "fd"] = np.nan
    assert len(protocols(dataclasses.replace(res, table=t))) == 1


def test_each_run_links_to_its_mlflow_run(tmp_path):
    base = make_results(tmp_path)
    ids = [f"{i:032x}" for i in range(len(base.table))]
    res = dataclasses.replace(base, table=base.table.assign(run_id=ids))
    t = res.table
    rid = t[(t["cell"] == "repa") & (t["seed"] == 1)]["run_id"].iloc[0]

    def cells_section(r, name):
        html = render_report(fit_report(r, bootstrap=False), tmp_path / name).read_text(encoding="utf-8")
        start = html.index('id="sec-cells"')
        return html[start : html.index("</section>", start)]

    server = dataclasses.replace(res, mlflow_ui="http://mlflow.lab:5000/#/experiments/7")
    sec = cells_section(server, "server")
    assert f'href="http://mlflow.lab:5000/#/experiments/7/runs/{rid}"' in sec
    assert sec.count('class="run" href=') == len(t)  # every run, failed ones included
    assert "tracking server <code>http://mlflow.lab:5000</code>" in sec
    local = dataclasses.replace(res, mlflow_ui="http://127.0.0.1:5000/#/experiments/3", mlflow_ui_local=True)
    sec = cells_section(local, "local")
    assert f'href="http://127.0.0.1:5000/#/experiments/3/runs/{rid}"' in sec and "<code>srdit ui</code>" in sec
    sec = cells_section(res, "none")  # a CSV with run ids and no UI address: the id is stated
    assert f"run {rid}</code>" in sec and "href=" not in sec.split("</p>", 1)[1]


def test_analyze_refuses_a_table_of_runs_from_different_protocols(tmp_path):
    """An exported table carries each run's protocol: `srdit analyze` refuses to compare across two in one line."""
    import io

    from srdit.commands.analyze import main as analyze_main

    res = _with_protocol(make_results(tmp_path), lambda r: "25" if r["sprint"] else "50")
    path = tmp_path / "runs.csv"
    res.table.to_csv(path, index=False)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(path), "--factors", "repa,rope,sprint", "--metric", "fd", "--direction", "min", "--no-bootstrap"]
    rc = analyze_main(argv, stdout=out, stderr=err)
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and out.getvalue() == ""
    assert lines[0].startswith(f"srdit analyze: error: {path}: the runs' metrics were computed under 2 different")
    assert (
        "sampling steps: 50 (baseline, repa, rope, repa+rope), 25 (sprint, repa+sprint, repa+rope+sprint)" in lines[0]
    )
    # one protocol: analysed as before, and the report states it and carries the intervals
    _with_protocol(make_results(tmp_path)).table.to_csv(path, index=False)
    argv += ["--ladder", "repa,rope,sprint", "--report", str(tmp_path / "rep")]
    rc = analyze_main(argv, stdout=io.StringIO(), stderr=io.StringIO())
    html = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    assert rc == 0 and "sampling steps <b>50</b>" in html and "Error bars: Welch" in html
