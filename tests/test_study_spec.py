"""Study YAML schema: the frozen key lists, the shipped studies, and malformed files through the CLI (one line on
stderr, no traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest

from srdit.config import ConfigError
from srdit.study import spec as S
from srdit.study.spec import load_study, study_from_dict

ROOT = Path(__file__).resolve().parent.parent


def test_schema_is_frozen():
    # Change these only on purpose (and update the docs and studies/*.yaml).
    assert S.STUDY_KEYS == (
        "name",
        "description",
        "base",
        "techniques",
        "design",
        "seeds",
        "constraints",
        "metrics",
        "resources",
        "tracking",
        "checkpoint",
        "plugins",
    )
    assert S.DESIGN_KINDS == ("full_factorial", "fractional_factorial", "ladder", "leave_one_out", "search", "foldover")
    assert S.DESIGN_KEYS == {
        "full_factorial": ("kind",),
        "fractional_factorial": ("kind", "resolution"),
        "ladder": ("kind", "order"),
        "leave_one_out": ("kind",),
        "search": ("kind", "trials", "objectives", "space", "seed", "max_concurrent"),
        "foldover": ("kind", "of", "factor"),
    }
    assert S.CUSTOM_TECHNIQUE_KEYS == ("name", "diff", "description")
    assert S.CONSTRAINT_KINDS == ("requires", "excludes", "wins")
    assert S.METRICS_KEYS == ("primary", "direction", "others")
    assert S.RESOURCES_KEYS == ("cpus", "gpus", "workers", "max_concurrent")
    assert S.TRACKING_KEYS == ("uri", "experiment", "artifact_location")
    assert S.SPACE_KEYS == ("low", "high", "log", "type", "choices")


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_studies_load_and_name_metrics_their_runs_report(path):
    from srdit.evaluate import EVAL_METRICS

    spec = load_study(path)
    assert spec.name == path.stem and spec.factors and spec.base.train.steps > 0
    training = {"loss", "grad_norm", "steps_per_s", "images_per_s"} | {n for n in S.METRIC_DIRECTIONS if "/" in n}
    reported = training | set(EVAL_METRICS[spec.base.data.dataset])
    named = set(spec.metrics.all()) | set(spec.design.objectives)
    assert named <= reported, f"{path.name} names metrics its runs never report: {sorted(named - reported)}"


def test_defaults_and_sections():
    s = study_from_dict(
        {
            "name": "d",
            "techniques": ["rope", {"sprint": {"drop_ratio": 0.5}}, {"name": "lr", "diff": {"train": {"lr": 3e-3}}}],
            "seeds": 3,
            "resources": {"cpus": 2, "gpus": 0.5},
            "tracking": {"uri": "http://127.0.0.1:5000"},
        }
    )
    assert s.design.kind == "full_factorial" and s.seeds == (0, 1, 2)
    assert s.metrics.primary == "fd" and s.metrics.direction == "min"
    assert s.factor("sprint").diff["model.sprint.drop_ratio"] == 0.5
    assert s.factor("lr").diff == {"train.lr": 3e-3} and not s.factor("lr").builtin
    assert s.resources.cpus == 2 and s.resources.gpus == 0.5 and s.tracking.uri.startswith("http")
    assert s.resources.workers == 1


def test_multi_gpu_resources_mean_one_worker_per_gpu():
    r = study_from_dict({"name": "d", "techniques": ["rope"], "resources": {"gpus": 8}}).resources
    assert (r.gpus, r.workers, r.gpus_per_worker) == (8, 8, 1.0)
    r = study_from_dict({"name": "d", "techniques": ["rope"], "resources": {"workers": 2, "cpus": 0.5}}).resources
    assert (r.gpus, r.workers, r.cpus) == (0, 2, 0.5)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"name": "x", "techniques": ["rope"], "resources": {"gpus": 2.5}}, "resources.gpus: 2.5 must be a fraction"),
        ({"name": "x", "techniques": ["rope"], "resources": {"gpus": 4, "workers": 2}}, "must equal resources.gpus"),
        ({"name": "x", "techniques": ["rope"], "resources": {"gpus": 0.5, "workers": 2}}, "one whole GPU per worker"),
        ({"name": "x", "techniques": ["rope"], "resources": {"workers": 0}}, "resources.workers: 0 must be >= 1"),
        ({"name": "x", "techniques": [{"sprint": {"width": 3}}]}, "unknown knob 'width'"),
        ({"name": "x", "techniques": [{"name": "bad", "diff": {"train.nope": 1}}]}, "train.nope: unknown key"),
        (
            {"name": "x", "techniques": ["rope"], "design": {"kind": "fractional_factorial", "resolution": 9}},
            "design.resolution",
        ),
        (
            {
                "name": "x",
                "techniques": ["rope", "rmsnorm"],
                "design": {"kind": "ladder", "order": ["rope", "qk_norm"]},
            },
            "qk_norm not among the techniques",
        ),
        ({"name": "x", "techniques": ["rope"], "seeds": [0, 0]}, "distinct"),
        ({"name": "x", "techniques": ["rope"], "metrics": {"primary": "fidd"}}, "unknown metric 'fidd'; allowed: fd"),
        ({"name": "x", "techniques": ["rope"], "base": {"train": {"stepz": 3}}}, "base.train.stepz: unknown key"),
        ({"name": "x", "techniques": ["rope"], "tracking": {"uri": "./mlruns"}}, "tracking.uri"),
        ({"name": "x", "techniques": ["rope", "rope"]}, "more than once"),
        (
            {
                "name": "x",
                "techniques": ["rope"],
                "design": {"kind": "search", "trials": 2, "space": {"rope.width": {"low": 1, "high": 2}}},
            },
            "not a knob of rope",
        ),
    ],
)
def test_validation_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        study_from_dict(data)


BAD = {
    "unknown_key.yaml": (
        "name: a\ntechniques: [rope]\ndesing: full_factorial\n",
        "desing: unknown key; allowed keys: name, description, base",
    ),
    "unknown_technique.yaml": (
        "name: a\ntechniques: [rope, warp_drive]\n",
        "unknown technique 'warp_drive'; allowed: sprint",
    ),
    "wrong_type.yaml": (
        "name: a\ntechniques: [rope]\nbase: {train: {steps: many}}\n",
        "base.train.steps: expected an integer, got 'many'",
    ),
    "bad_design.yaml": (
        "name: a\ntechniques: [rope]\ndesign: latin_square\n",
        "design.kind: 'latin_square' is not a design; allowed: full_factorial",
    ),
    "conflicting.yaml": (
        "name: a\ntechniques: [sprint, path_drop_guidance]\nconstraints:\n"
        "  - requires: [path_drop_guidance, sprint]\n  - excludes: [sprint, path_drop_guidance]\n",
        "conflicting constraints",
    ),
    "shared_key.yaml": ("name: a\ntechniques: [swiglu, relu2]\n", "swiglu and relu2 both set model.mlp"),
    "empty.yaml": ("", "the file is empty"),
    "syntax.yaml": ("name: a\ntechniques: [rope\n", "YAML syntax error"),
    "not_mapping.yaml": ("- rope\n", "expected a mapping"),
    "gpus.yaml": ("name: a\ntechniques: [rope]\nresources: {gpus: 4, workers: 3}\n", "workers: 3 must equal"),
    "long_name.yaml": (f"name: {'n' * 250}\ntechniques: [rope]\n", "name: study name nnnnnnnnnnnnnnnnnnnn... is 250"),
    "base_preset_name.yaml": (
        "name: a\nbase: digits\ntechniques: [rope]\n",
        "/digits: no such file; for the preset, write `base: {preset: digits}`",
    ),
    "base_missing.yaml": ("name: a\nbase: nowhere.yaml\ntechniques: [rope]\n", "/nowhere.yaml: no such file"),
}


@pytest.mark.parametrize(
    "data,match",
    [
        ({"name": "n" * 81, "techniques": ["rope"]}, r"^name: study name n{20}\.\.\. is 81 characters; at most 80 "),
        ({"name": "a/b", "techniques": ["rope"]}, r"^name: study name 'a/b' must be .*letters, digits, _ \. -"),
        ({"name": "ab\n", "techniques": ["rope"]}, r"^name: study name 'ab\\n' must be"),
        ({"name": ".hidden", "techniques": ["rope"]}, r"^name: study name '\.hidden' must be"),
        (
            {"name": "x", "techniques": [{"name": "t" * 81, "diff": {"train.lr": 0.01}}]},
            r"^techniques\[0\]: technique name t{20}\.\.\. is 81 characters; at most 80",
        ),
        (
            {"name": "x", "techniques": [{"name": "a b", "diff": {"train.lr": 0.01}}]},
            r"^techniques\[0\]: technique name 'a b' must be",
        ),
        (
            {"name": "x", "techniques": [{"name": f"t{i}", "diff": {"train.lr": 0.01}} for i in range(65)]},
            r"^techniques: 65 techniques; at most 64 \(the cell id",
        ),
    ],
)
def test_names_that_become_file_names_are_checked_at_load(data, match):
    """A study name, technique name or cell id (one character per technique) ends up in file and folder names
    under --state: refused at load time with the key, not as `File name too long` when the study runs."""
    with pytest.raises(ConfigError, match=match):
        study_from_dict(data)


def test_the_longest_allowed_names_make_file_names_the_system_accepts(tmp_path):
    """The longest study name with every suffix srdit adds, and the longest trial key (64 techniques, the largest
    seed) inside a running-marker file name after a 64-character host name, are created for real."""
    from srdit.config import SEED_MAX
    from srdit.runtime.occupancy import Occupancy
    from srdit.study.designs import trial_key

    name = "n" * S.NAME_MAX
    assert study_from_dict({"name": name, "techniques": ["rope"]}).name == name
    for component in (f"{name}-20261207-084700", f"{name}_runs.csv", f"{name}.lock", f"{name}.db"):
        (tmp_path / component).mkdir()
    key = trial_key("1" * S.MAX_TECHNIQUES, SEED_MAX, {})
    marker = Occupancy(tmp_path, key).marker
    (tmp_path / marker.parent.name).mkdir(exist_ok=True)
    (tmp_path / marker.parent.name / ("h" * 64 + marker.name[len(marker.name.split("__")[0]) :])).touch()
    (tmp_path / key).mkdir()


def test_malformed_study_files_give_one_line_errors(tmp_path):
    for fname, (text, _) in BAD.items():
        (tmp_path / fname).write_text(text)
    cases = {f: (tmp_path / f, m) for f, (_, m) in BAD.items()}
    cases["missing.yaml"] = (tmp_path / "missing.yaml", "no such file")
    cases["folder"] = (tmp_path, "is a folder")
    assert len(cases) >= 8
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "srdit", "study", "plan", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (path, _) in cases.items()
    }
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        match = cases[name][1]
        assert p.returncode == 2, (name, out, err)
        assert "Traceback" not in err, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("srdit study plan: error: "), (name, err)
        assert match in lines[0], (name, lines[0])


def test_plan_command_prints_cells_cost_and_json():
    import json

    r = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "plan", "studies/digits_quick.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "cells (8)" in r.stdout and "trials: 16" in r.stdout and "estimated wall time" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "plan", "studies/digits_factorial.yaml", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    j = json.loads(r.stdout)
    assert j["resolution"] == 5 and len(j["cells"]) == 16 and j["aliases"] and j["cost"]["trials"] == 48
    r = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "plan"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
