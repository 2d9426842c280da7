"""Strict config loading, round trips, cross-field rules, technique diffs."""

import pytest
import yaml

from srdit.config import ConfigError, RunConfig, from_dict, to_dict, to_yaml
from srdit.techniques import TECHNIQUES, load_run_config, preset, technique_diff, with_techniques


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("cfg", [RunConfig(), preset("SR-DiT-B/1"), with_techniques(RunConfig(), ["sprint", "cfm"])])
def test_yaml_round_trip(cfg):
    again = from_dict(RunConfig, yaml.safe_load(to_yaml(cfg)))
    assert again == cfg and to_dict(again) == to_dict(cfg)


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.sprint\.drop: unknown key; allowed keys in model\.sprint: enabled"):
        load_run_config(write(tmp_path, "model:\n  sprint:\n    drop: 0.5\n"))


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_run_config(write(tmp_path, "train:\n  steps: many\n"))
    with pytest.raises(
        ConfigError, match=r"model\.norm: 'batchnorm' is not allowed; allowed values: 'layernorm', 'rmsnorm'"
    ):
        load_run_config(write(tmp_path, "model:\n  norm: batchnorm\n"))


def test_cross_field_rules_say_what_to_change():
    with pytest.raises(ConfigError, match="set it <= model.sprint.dense_in"):
        with_techniques(RunConfig(), ["sprint", "repa"], {"repa": {"depth": 4}})
    with pytest.raises(ConfigError, match="needs model.sprint.enabled"):
        with_techniques(RunConfig(), ["path_drop_guidance"])
    with pytest.raises(ConfigError, match="must be in 1..6"):
        with_techniques(RunConfig(), ["repa"], {"repa": {"depth": 9}})


def test_overrides_and_techniques(tmp_path):
    cfg = load_run_config(write(tmp_path, "techniques: [rmsnorm, cfm]\ntrain:\n  steps: 10\n"), ["train.lr=3e-4"])
    assert cfg.model.norm == "rmsnorm" and cfg.loss.cfm == 0.05 and cfg.train.steps == 10 and cfg.train.lr == 3e-4
    assert cfg.techniques == ("rmsnorm", "cfm")


def test_conflicting_techniques_need_a_winner():
    with pytest.raises(ConfigError, match="both set model.mlp"):
        technique_diff(["swiglu", "relu2"])
    assert technique_diff(["swiglu", "relu2"], wins={"model.mlp": "relu2"})["model.mlp"] == "relu2"
    assert technique_diff(["swiglu", "relu2"], wins={"model.mlp": "swiglu"})["model.mlp"] == "swiglu"


def test_unknown_technique_and_knob():
    with pytest.raises(ConfigError, match="unknown technique 'flash'"):
        technique_diff(["flash"])
    with pytest.raises(ConfigError, match="unknown knob 'ratio'; allowed knobs: drop_ratio"):
        technique_diff(["sprint"], {"sprint": {"ratio": 0.5}})


def test_registry_entries_are_documented():
    for t in TECHNIQUES.values():
        assert t.description and t.paper and t.diff
        with_techniques(RunConfig(), [t.name] + (["sprint"] if t.name == "path_drop_guidance" else []))


def test_srdit_preset_is_the_paper_recipe():
    cfg = preset("SR-DiT-B/1")
    assert cfg.model.sprint.enabled and cfg.model.rope.enabled and cfg.model.qk_norm and cfg.model.value_residual
    assert cfg.model.norm == "rmsnorm" and cfg.loss.cfm == 0.05 and cfg.transport.time_shift
    assert abs(cfg.shift_value() - 2**0.5) < 1e-12
    assert cfg.train.lr == 1e-4 and cfg.train.ema_decay == 0.9999 and cfg.train.batch_size == 256


def test_relative_paths_resolve_against_the_study_directory(tmp_path):
    from srdit.config import DataConfig, EvalConfig, resolve_paths

    cfg = RunConfig(
        data=DataConfig(dataset="latents", path="data/lat", tokenizer="invae", tokenizer_path="/abs/invae.pt"),
        eval=EvalConfig(reference="ref.npz"),
    )
    out = resolve_paths(cfg, tmp_path)
    assert out.data.path == str(tmp_path / "data/lat") and out.eval.reference == str(tmp_path / "ref.npz")
    assert out.data.tokenizer_path == "/abs/invae.pt" and out.data.teacher_path is None
    assert resolve_paths(RunConfig(), tmp_path) == RunConfig()


def test_a_missing_or_folder_yaml_is_one_plain_line(tmp_path):
    from srdit.config import read_yaml

    for path, said in ((tmp_path / "x.yaml", "no such file"), (tmp_path, "is a folder, expected a YAML file")):
        with pytest.raises(ConfigError) as e:
            read_yaml(path)
        assert str(e.value) == f"{path}: {said}"
