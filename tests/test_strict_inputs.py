"""Strict at the door: every kind of bad input is refused when it is loaded, before any training, with one line on
stderr naming the file and key, no traceback, exit status 2 (or, for overrides and equal values, applied).

One test per kind, each through the command a user runs (`srdit.commands.main` with captured output; a subprocess where
the point is what reaches the terminal)."""

from __future__ import annotations

import dataclasses
import pickle
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from srdit.commands import main
from srdit.config import RANGE, TEACHER_NAMES, ConfigError, Range, RunConfig, to_dict
from srdit.study.designs import plan_study
from srdit.study.spec import study_from_dict
from srdit.techniques import custom_technique, load_run_config, merge_diffs

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *argv) -> str:
    """Run the command; assert exit 2 and exactly one line on stderr; return that line."""
    rc, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


STUDY = "name: s\ntechniques: [rope]\ndesign: full_factorial\nbase:\n  train: {steps: 5}\n"


def float_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every float field (float, float | None, tuple of floats) of the run config."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += float_keys(tp, key + ".")
        elif float in {tp, *typing.get_args(tp)}:
            out.append(key)
    return out


# ------------------------------------------------------------------------------------------------------------------
# duplicate mapping keys
# ------------------------------------------------------------------------------------------------------------------


def test_duplicate_key_in_a_run_yaml_names_the_key_and_both_lines(tmp_path, capsys):
    p = write(tmp_path, "run.yaml", "train:\n  steps: 80\nmodel:\n  qk_norm: true\ntrain:\n  steps: 6000\n")
    line = refused(capsys, "train", p, "--print-config")
    assert line.startswith(f"srdit train: error: {p}: line 5:") and "'train' is given twice" in line
    assert "lines 1 and 5" in line


def test_duplicate_key_in_a_study_yaml_at_any_depth(tmp_path, capsys):
    p = write(tmp_path, "study.yaml", STUDY + "  sample: {steps: 10, steps: 20}\n")
    line = refused(capsys, "study", "plan", p)
    assert str(p) in line and "'steps' is given twice" in line and "line 6" in line


def test_merge_keys_may_be_overridden(tmp_path):
    """`<<: *anchor` then a key of the anchor is an override, not a duplicate."""
    p = write(tmp_path, "run.yaml", "x: &common {steps: 7, batch_size: 16}\n")
    p.write_text("train:\n  <<: {steps: 7, batch_size: 16}\n  steps: 9\n")
    assert load_run_config(p).train.steps == 9


def test_duplicate_key_in_an_override_value():
    with pytest.raises(ConfigError, match="override .* 'a' is given twice"):
        load_run_config(None, ["train.betas={a: 1, a: 2}"])


# ------------------------------------------------------------------------------------------------------------------
# non-finite numbers: every float field, one rule per field
# ------------------------------------------------------------------------------------------------------------------


def test_every_float_field_is_found():
    keys = float_keys()
    for key in (
        "train.grad_clip",
        "train.weight_decay",
        "loss.cfm",
        "loss.repa",
        "transport.shift",
        "sample.cfg_scale",
        "train.betas",
        "model.sprint.drop_ratio",
    ):
        assert key in keys


@pytest.mark.parametrize("spelling", ["nan", ".nan", "inf", "-.inf", ".Inf", "1e999"])
@pytest.mark.parametrize("key", float_keys())
def test_non_finite_is_refused_for_every_float_field(key, spelling):
    value = f"[0.9, {spelling}]" if key == "train.betas" else spelling
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: .* is not allowed; allowed: a finite number"):
        load_run_config(None, [f"{key}={value}"])


def test_non_finite_in_a_run_yaml_and_in_code(tmp_path, capsys):
    line = refused(capsys, "train", write(tmp_path, "run.yaml", "train:\n  grad_clip: .nan\n"), "--print-config")
    assert "train.grad_clip: nan is not allowed; allowed: a finite number >= 0" in line
    cfg = RunConfig(train=dataclasses.replace(RunConfig().train, weight_decay=float("inf")))
    with pytest.raises(ConfigError, match="train.weight_decay: inf is not allowed"):
        cfg.validate()


def test_non_finite_in_a_study(tmp_path, capsys):
    line = refused(capsys, "study", "plan", write(tmp_path, "s.yaml", STUDY + "  loss: {cfm: .inf}\n"))
    assert "base.loss.cfm: inf is not allowed" in line
    line = refused(capsys, "study", "plan", write(tmp_path, "r.yaml", STUDY + "resources: {cpus: .nan}\n"))
    assert "resources.cpus: nan is not allowed; expected a finite number" in line
    space = "design: {kind: search, trials: 2, space: {train.lr: {low: 1e-4, high: .inf}}}\n"
    line = refused(capsys, "study", "plan", write(tmp_path, "q.yaml", STUDY.replace("design: full_factorial\n", space)))
    assert "design.space.train.lr.high: inf is not allowed" in line


def test_ranges_are_stated_once_and_hold_for_the_defaults():
    """Every rule is a Range on the field; the defaults (and the presets) satisfy their own rules."""

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from walk(v, f"{prefix}{f.name}.")
            elif RANGE in f.metadata:
                yield f"{prefix}{f.name}", f.metadata[RANGE], v

    rules = list(walk(RunConfig()))
    assert len(rules) >= 30 and all(isinstance(r, Range) for _, r, _ in rules)
    for key, rule, value in rules:
        for v in value if isinstance(value, tuple) else (value,):
            assert v is None or rule.contains(v), key
    with pytest.raises(
        ConfigError,
        match=r"model.sprint.drop_ratio: 1.0 is not allowed; allowed: a finite number "
        r"in \[0, 1\)",
    ):
        load_run_config(None, ["model.sprint.drop_ratio=1"])


def test_a_huge_integer_for_a_float_field():
    with pytest.raises(ConfigError, match="train.lr: 1000.* is too large for a number"):
        load_run_config(None, ["train.lr=1" + "0" * 400])


# ------------------------------------------------------------------------------------------------------------------
# errors the config alone determines: refused at load, not at run time
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("sample.steps=1", "sample.steps: 1 with sample.sampler sde; the SDE sampler needs steps >= 2"),
        ("train.log_every=0", "train.log_every: 0 is not allowed; allowed: an integer >= 1"),
        ("train.ckpt_every=0", "train.ckpt_every: 0 is not allowed; allowed: an integer >= 1"),
        ("train.device=tpu", "train.device: 'tpu' is not allowed; allowed values: auto, cpu, cuda, cuda:N"),
        ("data.teacher=dinov3", "data.teacher: 'dinov3' is not allowed; allowed values: digits-cnn, dinov2_vits14"),
        ("eval.n_samples=2", "eval.n_samples: 2 is not allowed; allowed: an integer >= 4"),
        ("train.seed=-1", "train.seed: -1 is not allowed"),
    ],
)
def test_run_time_failures_are_load_time_errors(capsys, override, message):
    assert message in refused(capsys, "train", override, "--print-config")


def test_heun_with_one_step_is_fine():
    assert load_run_config(None, ["sample.sampler=euler", "sample.steps=1"]).sample.steps == 1


def test_teacher_names_match_the_loadable_teachers():
    from srdit.encoders import TEACHERS

    assert TEACHER_NAMES == TEACHERS


def test_sample_and_evaluate_check_the_device_before_loading(tmp_path, capsys):
    for command in ("sample", "evaluate"):
        extra = ["--out", tmp_path / "x"] if command == "sample" else []
        line = refused(capsys, command, tmp_path / "missing.pt", "--device", "tpu", *extra)
        assert "--device: 'tpu' is not allowed" in line


def test_data_parallel_batch_must_divide_by_the_workers(tmp_path, capsys):
    text = STUDY.replace("{steps: 5}", "{steps: 5, batch_size: 30}") + "resources: {workers: 4}\n"
    line = refused(capsys, "study", "plan", write(tmp_path, "dp.yaml", text))
    assert "base.train.batch_size: 30 is not divisible by resources.workers (4 data-parallel workers" in line
    # a cell whose technique changes the batch is excluded with the reason: every cell's config is checked
    spec = study_from_dict(
        {
            "name": "dp",
            "base": {"train": {"steps": 5, "batch_size": 32}},
            "techniques": ["rope", {"name": "half", "diff": {"train.batch_size": 30}}],
            "resources": {"workers": 4},
        }
    )
    plan = plan_study(spec)
    assert [c.id for c in plan.cells] == ["00", "10"]
    assert all("not divisible by resources.workers" in e["reason"] for e in plan.excluded)
    assert all(t.config["train"]["batch_size"] % 4 == 0 for t in plan.trials)


def test_a_study_plan_validates_every_cell(tmp_path, capsys):
    line = refused(capsys, "study", "plan", write(tmp_path, "s.yaml", STUDY + "  sample: {steps: 1}\n"))
    assert "base.sample.steps: 1 with sample.sampler sde" in line
    spec = study_from_dict(
        {
            "name": "s",
            "base": {"sample": {"sampler": "euler", "steps": 1}},
            "techniques": ["rope", {"name": "sde", "diff": {"sample.sampler": "sde"}}],
        }
    )
    plan = plan_study(spec)
    assert {e["cell"] for e in plan.excluded} == {"01", "11"}
    assert all("SDE sampler needs steps >= 2" in e["reason"] for e in plan.excluded)
    # a search validates every choice and both ends of every range
    with pytest.raises(ConfigError, match=r"design.space.sprint.drop_ratio: 1.0: model.sprint.drop_ratio"):
        study_from_dict(
            {
                "name": "s",
                "techniques": ["sprint"],
                "design": {"kind": "search", "trials": 2, "space": {"sprint.drop_ratio": {"low": 0.5, "high": 1.0}}},
            }
        )
    with pytest.raises(ConfigError, match=r"design.space.sample.sampler: 'sde': sample.steps: 1"):
        study_from_dict(
            {
                "name": "s",
                "techniques": ["rope"],
                "base": {"sample": {"sampler": "euler", "steps": 1}},
                "design": {"kind": "search", "trials": 2, "space": {"sample.sampler": {"choices": ["euler", "sde"]}}},
            }
        )


# ------------------------------------------------------------------------------------------------------------------
# overrides and equal values
# ------------------------------------------------------------------------------------------------------------------


def test_techniques_override_applies_the_diffs_as_the_yaml_list_does(tmp_path, capsys):
    from_yaml = load_run_config(write(tmp_path, "run.yaml", "techniques: [qk_norm, repa]\n"))
    from_override = load_run_config(None, ["techniques=[qk_norm, repa]"])
    assert to_dict(from_override) == to_dict(from_yaml)
    assert from_override.model.qk_norm and from_override.model.repa.enabled
    assert from_override.techniques == ("qk_norm", "repa")
    rc, out, _ = cli(capsys, "train", "techniques=[qk_norm, repa]", "--print-config")
    assert rc == 0 and "qk_norm: true" in out
    # the override replaces the YAML's list, as any key=value does
    both = load_run_config(write(tmp_path, "r2.yaml", "techniques: [rope]\n"), ["techniques=[qk_norm]"])
    assert both.techniques == ("qk_norm",) and not both.model.rope.enabled and both.model.qk_norm


def test_the_techniques_record_is_not_a_settable_key():
    with pytest.raises(ConfigError, match="techniques: a list of techniques is applied by"):
        study_from_dict({"name": "s", "techniques": [{"name": "sneak", "diff": {"techniques": ["repa"]}}]})
    with pytest.raises(ConfigError, match="techniques: qk_norm is listed twice"):
        load_run_config(None, ["techniques=[qk_norm, qk_norm]"])


def test_equal_values_spelled_differently_are_not_a_conflict(tmp_path, capsys):
    a, b = custom_technique("a", {"train.lr": "3e-3"}), custom_technique("b", {"train.lr": 0.003})
    assert merge_diffs([a, b])["train.lr"] in ("3e-3", 0.003)
    c = custom_technique("c", {"train.lr": 0.002})
    with pytest.raises(ConfigError, match=r"techniques a and c both set train\.lr \('3e-3' vs 0\.002\)"):
        merge_diffs([a, c])
    text = (
        "name: s\ntechniques:\n  - {name: a, diff: {train.lr: 3e-3, train.steps: 5}}\n"
        "  - {name: b, diff: {train.lr: 0.003}}\n"
    )
    rc, out, err = cli(capsys, "study", "plan", write(tmp_path, "eq.yaml", text))
    assert rc == 0, err
    assert "cells (4)" in out


# ------------------------------------------------------------------------------------------------------------------
# YAML 1.1 surprises
# ------------------------------------------------------------------------------------------------------------------


def test_leading_zero_and_sexagesimal_numbers_are_refused(tmp_path, capsys):
    line = refused(capsys, "train", write(tmp_path, "run.yaml", "train:\n  steps: 010\n"), "--print-config")
    assert f"{tmp_path / 'run.yaml'}: line 2: 010 has a leading zero, which YAML 1.1 reads as octal (8)" in line
    line = refused(capsys, "train", "train.seed=1:30", "--print-config")
    assert "1:30 is a YAML 1.1 sexagesimal number" in line
    line = refused(capsys, "study", "plan", write(tmp_path, "s.yaml", STUDY + "seeds: [007]\n"))
    assert "007 has a leading zero" in line


@pytest.mark.parametrize("spelling, says", [("0x10", "hexadecimal number (16)"), ("0b11", "binary number (3)")])
@pytest.mark.parametrize("key", ["train.lr", "train.steps", "model.sprint.drop_ratio", "eval.n_samples"])
def test_numbers_not_in_decimal_are_refused_for_every_numeric_field(key, spelling, says):
    """YAML 1.1 reads 0x10 as 16 and 0b11 as 3: a float field took `train.lr=0x10` as 16.0. Numbers are decimal, in
    an override and in a YAML file alike (the rule is the loader's, so it holds for every field)."""
    with pytest.raises(ConfigError, match=re.escape(f"{spelling} is a YAML 1.1 {says}; write the number in decimal")):
        load_run_config(None, [f"{key}={spelling}"])


def test_a_float_field_reads_only_decimal_text(tmp_path, capsys):
    line = refused(capsys, "train", "train.lr=0x10", "--print-config")
    assert line == (
        "srdit train: error: override 'train.lr=0x10': 0x10 is a YAML 1.1 hexadecimal number (16); write the number "
        "in decimal, or quote it for text"
    )
    run = write(tmp_path, "run.yaml", "train:\n  lr: 0x1\n")
    assert f"{run}: line 2: 0x1 is a YAML 1.1 hexadecimal number (1)" in refused(capsys, "train", run, "--print-config")
    for text in ("'0x10'", "'1_0'", "' 1e-3'", "'\u0661'"):  # quoted: text, which a float field reads only as decimal
        with pytest.raises(ConfigError, match="train.lr: expected a number"):
            load_run_config(None, [f"train.lr={text}"])
    assert load_run_config(None, ["train.lr='1e-3'"]).train.lr == 1e-3


def int_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every integer field (int, int | None) of the run config."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += int_keys(tp, f"{prefix}{f.name}.")
        elif int in {tp, *typing.get_args(tp)}:
            out.append(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize(
    "section, says",
    [
        ("resources: {cpus: '1_0'}\n", "resources.cpus: expected a number, got '1_0'"),
        ("resources: {cpus: 0x2}\n", "0x2 is a YAML 1.1 hexadecimal number (2)"),
        ("resources: {max_concurrent: 100000000000000000000}\n", "resources.max_concurrent: 100000000000000000000 is"),
        (
            "design: {kind: search, trials: 100000000000000000000}\n",
            "design.trials: 100000000000000000000 is not allowed; allowed: an integer within int32",
        ),
    ],
)
def test_the_study_schema_reads_numbers_by_the_same_rules(tmp_path, capsys, section, says):
    text = STUDY.replace("design: full_factorial\n", "") + section
    assert says in refused(capsys, "study", "plan", write(tmp_path, "s.yaml", text))


@pytest.mark.parametrize("key", int_keys())
def test_an_integer_beyond_int32_is_refused_for_every_integer_field(key):
    """An integer field states its range; where it states no upper bound the loader keeps it within int32
    (`srdit.config.INT_MAX`), so `batch_size: 100000000000000000000` is refused when the config loads."""
    with pytest.raises(
        ConfigError, match=rf"^{key.replace('.', '[.]')}: 100000000000000000000 is not allowed; allowed"
    ):
        load_run_config(None, [f"{key}=100000000000000000000"])


def test_a_huge_batch_size_is_one_line_naming_the_bound(tmp_path, capsys):
    assert "train.batch_size" in int_keys() and "eval.n_samples" in int_keys()
    run = write(tmp_path, "run.yaml", "train:\n  batch_size: 100000000000000000000\n")
    assert refused(capsys, "train", run, "--print-config").endswith(
        "train.batch_size: 100000000000000000000 is not allowed; allowed: an integer >= 1, at most 2147483647 (int32)"
    )


def test_the_int32_bound_admits_its_edge_and_yields_to_a_stated_bound():
    assert load_run_config(None, ["train.batch_size=2147483647"]).train.batch_size == 2**31 - 1
    assert load_run_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1  # SEED_MAX is stated


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--steps-per-s", "0", "argument --steps-per-s: expected a finite number > 0, got '0'"),
        ("--steps-per-s", "-2", "argument --steps-per-s: expected a finite number > 0, got '-2'"),
        ("--steps-per-s", "nan", "argument --steps-per-s: expected a finite number > 0, got 'nan'"),
        ("--steps-per-s", "inf", "argument --steps-per-s: expected a finite number > 0, got 'inf'"),
        ("--concurrency", "0", "argument --concurrency: expected an integer >= 1, got '0'"),
        ("--concurrency", "-1", "argument --concurrency: expected an integer >= 1, got '-1'"),
    ],
)
def test_plan_refuses_a_rate_or_concurrency_that_is_not_positive(tmp_path, capsys, option, value, says):
    """`--steps-per-s 0` and `--concurrency 0` were silently replaced by the defaults (`or`)."""
    study = write(tmp_path, "s.yaml", STUDY)
    assert refused(capsys, "study", "plan", study, f"{option}={value}") == f"srdit study plan: error: {says}"


def test_the_yaml_11_spellings_that_are_kept(tmp_path):
    cfg = load_run_config(
        write(
            tmp_path,
            "run.yaml",
            "train:\n  lr: 1e-3\n  steps: 1_6\n  seed: 0\n"
            "model:\n  qk_norm: on\n  value_residual: no\n"
            "data:\n  path: '010'\n",
        ),
        ["train.weight_decay=1e-4"],
    )
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 1e-4 and cfg.train.steps == 16
    assert cfg.model.qk_norm is True and cfg.model.value_residual is False and cfg.data.path == "010"


# ------------------------------------------------------------------------------------------------------------------
# files that are not what they claim
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, says",
    [
        (b"train:\n  steps: \xe9t\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 16)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file, not YAML text"),
    ],
)
def test_yaml_that_is_not_text(tmp_path, capsys, content, says):
    p = write(tmp_path, "bad.yaml", content)
    assert refused(capsys, "train", p, "--print-config").startswith(f"srdit train: error: {p}: {says}")
    assert refused(capsys, "study", "plan", p).startswith(f"srdit study plan: error: {p}: {says}")
    assert refused(capsys, "study", "run", p, "--state", tmp_path / "state").startswith(
        f"srdit study run: error: {p}: {says}"
    )
    line = refused(capsys, "report", p, "--state", tmp_path / "state")
    assert f"{p}: {says}" in line
    # a study whose base names a run YAML that is binary
    study = write(tmp_path, "s.yaml", "name: s\ntechniques: [rope]\nbase: bad.yaml\n")
    assert f"{p}: {says}" in refused(capsys, "study", "plan", study)


def checkpoint_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "folder.pt").mkdir()
    pickled = tmp_path / "raw.pkl"
    pickled.write_bytes(pickle.dumps({"model": {}, "ema": {}}, protocol=4))
    return {
        "empty": (write(tmp_path, "empty.pt", b""), "not a readable srdit checkpoint: the file is empty (0 bytes"),
        "folder": (tmp_path / "folder.pt", "is a folder, not a checkpoint file"),
        "text": (write(tmp_path, "notes.pt", "hello\n"), "not a readable srdit checkpoint: a text file"),
        "pickle": (pickled, "not a readable srdit checkpoint: a plain pickle"),
        "zip": (
            write(tmp_path, "cut.pt", b"PK\x03\x04" + bytes(range(200))),
            "not a readable srdit checkpoint: a zip archive that torch cannot",
        ),
        "missing": (tmp_path / "nope.pt", "no such checkpoint file"),
    }


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_files_that_are_not_checkpoints(tmp_path, capsys, command):
    for kind, (path, says) in checkpoint_cases(tmp_path).items():
        extra = ["--out", tmp_path / "out"] if command == "sample" else []
        line = refused(capsys, command, path, *extra)
        assert line.startswith(f"srdit {command}: error: {path}: ") and says in line, (kind, line)


def test_a_checkpoint_holding_a_foreign_config(tmp_path, capsys):
    p = tmp_path / "odd.pt"
    torch.save({"model": {}, "ema": {}, "step": 1, "config": "not a mapping"}, p)
    assert "not an srdit checkpoint" in refused(capsys, "sample", p, "--out", tmp_path / "o")


def test_a_raw_pickle_reaches_the_terminal_as_one_line(tmp_path):
    """What a user sees: one line, no traceback, no warning from torch, exit 2."""
    path, _ = checkpoint_cases(tmp_path)["pickle"]
    r = subprocess.run(
        [sys.executable, "-m", "srdit", "sample", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"srdit sample: error: {path}: not a readable srdit checkpoint: a plain pickle, "
        f"not a file written by torch.save (`srdit train` writes RUN/checkpoints/last.pt)"
    ]


def test_convert_refuses_a_raw_pickle_in_one_line(tmp_path):
    """torch warns about a plain pickle's protocol (two lines on stderr) before it refuses it; every loader of a file
    a user names goes through `srdit.cache.load_torch`, which keeps the warning off the terminal."""
    path, _ = checkpoint_cases(tmp_path)["pickle"]
    r = subprocess.run(
        [sys.executable, "-m", "srdit", "convert", str(path), "--from", "sit", "--preset", "SiT-B/2", "--out", "o.pt"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"srdit convert: error: {path}: not a readable PyTorch checkpoint (")


def test_every_loader_of_a_named_weights_file_refuses_a_raw_pickle_without_a_warning(tmp_path):
    import warnings

    from srdit.convert import ConvertError, read_reference
    from srdit.encoders.base import TokenizerLoadError
    from srdit.encoders.invae import _read_state_dict
    from srdit.metrics.inception import load_inception
    from srdit.train import CheckpointError, load_checkpoint

    path, _ = checkpoint_cases(tmp_path)["pickle"]
    for load, error in (
        (load_checkpoint, CheckpointError),
        (read_reference, ConvertError),
        (_read_state_dict, TokenizerLoadError),
        (load_inception, ValueError),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(error) as info:
                load(path)
        assert caught == [], (load.__name__, [str(w.message) for w in caught])
        assert len(str(info.value).splitlines()) == 1, load.__name__


def test_a_corrupt_checkpoint_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"")
    line = refused(capsys, "train", "train.steps=2", "--out", out, "--quiet")
    assert "last.pt: not a readable srdit checkpoint: the file is empty (0 bytes" in line


# ------------------------------------------------------------------------------------------------------------------
# CSV input to `srdit analyze`
# ------------------------------------------------------------------------------------------------------------------


ANALYZE = ["--factors", "A,B", "--metric", "fd", "--direction", "min", "--format", "json"]


def test_csv_with_a_column_named_twice(tmp_path, capsys):
    p = write(tmp_path, "runs.csv", "A,B,fd,seed,fd\n0,0,1,0,9\n1,0,2,0,9\n0,1,3,0,9\n1,1,4,0,9\n")
    line = refused(capsys, "analyze", p, *ANALYZE)
    assert (
        line == f"srdit analyze: error: {p}: column 'fd' appears twice in the header (columns 3 and 5); rename "
        f"or drop one"
    )


def test_csv_with_text_in_a_finished_metric(tmp_path, capsys):
    rows = "A,B,fd,status\n0,0,1,finished\n1,0,oops,finished\n0,1,3,finished\n1,1,4,finished\n0,1,bad,crashed\n"
    line = refused(capsys, "analyze", write(tmp_path, "runs.csv", rows), *ANALYZE)
    assert "runs.csv line 3: fd = 'oops' in a finished row is not a number (1 such row(s))" in line


def test_csv_with_an_empty_finished_metric_prints_the_rule(tmp_path, capsys):
    rows = "A,B,fd,status\n0,0,1,finished\n1,0,,finished\n0,1,3,finished\n1,1,4,finished\n1,0,2,finished\n"
    rc, out, err = cli(capsys, "analyze", write(tmp_path, "runs.csv", rows), *ANALYZE, "--allow-inestimable")
    assert rc == 0
    assert "note: 1 finished row(s) of" in err and "they count as diverged" in err
