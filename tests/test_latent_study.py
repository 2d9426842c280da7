"""An ImageNet-style study end to end on the stand-ins of test_imagenet_eval (tiny INVAE, random FID Inception
weights, reference statistics): every trial is a latent run that evaluates FID at `eval_every`; the study's progress
line shows its primary metric (fid) and the report draws the fid learning curve, both derived from the metric
registry."""

import re

import pytest
import yaml
from test_imagenet_eval import _cfg, stand_ins  # noqa: F401  (stand_ins is a fixture)

from srdit.config import to_dict

pytestmark = pytest.mark.slow


def test_latent_study_prints_fid_while_it_runs_and_its_report_draws_the_fid_curve(stand_ins, tmp_path):
    import ray

    from srdit.commands.report import make_report
    from srdit.runtime.driver import run_study
    from srdit.runtime.ray_parts import shutdown_ray
    from srdit.runtime.results import load_results
    from srdit.study.spec import load_study

    cfg = to_dict(_cfg(stand_ins))
    cfg["train"].update(steps=4, eval_every=2)
    study = {
        "name": "latent_tiny",
        "base": {k: cfg[k] for k in ("model", "data", "train", "sample", "eval")},
        "techniques": ["rmsnorm"],
        "seeds": [0],
        "metrics": {"primary": "fid", "direction": "min", "others": {"images_per_s": "max"}},
    }
    path = tmp_path / "latent_tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    spec, state, lines = load_study(path), tmp_path / "state", []
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        res = run_study(spec, state, echo=lines.append)
    finally:
        shutdown_ray()
    assert res.statuses == {"finished": 2}, lines

    trial_lines = [line for line in lines if line.startswith("[")]
    assert len(trial_lines) == 2, lines
    for line in trial_lines:  # the primary metric comes first after the status
        assert re.search(r": finished\s+fid [0-9.e+-]+\s+loss ", line), line

    results, _ = load_results(spec, state)
    fid = results.curves[results.curves["key"] == "fid"]
    assert set(fid["step"]) == {2, 4} and len(fid) == 4  # two evaluations per trial
    assert results.table["fid"].notna().all()

    page = make_report(path, state, tmp_path / "dash", bootstrap=False).read_text(encoding="utf-8")
    curves = page[page.index('id="sec-fig-curves"') : page.index('id="sec-cells"')].replace(" ", "")
    assert 'id="fig-curves"' in curves and '"label":"fid"' in curves  # fid is one of the curves' quantities
