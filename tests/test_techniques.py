"""The technique registry and its one merge rule (conflicts, wins, knobs, custom diffs, searched knobs), where each
technique's code lives, `srdit techniques`, the run-config loader's error paths, and a torch-free config layer."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from srdit import config as C
from srdit.commands import main
from srdit.config import ConfigError, RunConfig
from srdit.techniques import (
    SRDIT_STACK,
    TECHNIQUES,
    Technique,
    custom_technique,
    load_run_config,
    merge_diffs,
    preset,
    run_config_from_dict,
    technique,
    with_techniques,
)

ROOT = Path(__file__).resolve().parent.parent

# Modules named in the registry that another change creates; drop an entry once its module is in the tree.


# ------------------------------------------------------------------------------------------------------------------
# the merge
# ------------------------------------------------------------------------------------------------------------------


def test_conflict_names_both_techniques_the_key_and_both_values():
    with pytest.raises(
        ConfigError,
        match=r"techniques swiglu and relu2 both set model\.mlp \('swiglu' vs 'relu2'\); "
        r".*wins: swiglu, over: relu2.*excludes: \[swiglu, relu2\]",
    ):
        merge_diffs(["swiglu", "relu2"])
    with pytest.raises(ConfigError, match=r"relu2 and swiglu both set model\.mlp \('relu2' vs 'swiglu'\)"):
        merge_diffs(["relu2", "swiglu"])


@pytest.mark.parametrize("order", [("swiglu", "relu2"), ("relu2", "swiglu")])
@pytest.mark.parametrize("winner,loser", [("swiglu", "relu2"), ("relu2", "swiglu")])
def test_wins_either_way_in_either_order(order, winner, loser):
    assert merge_diffs(list(order), wins=[(winner, loser)]) == {"model.mlp": winner}


def test_equal_values_do_not_conflict_and_a_winner_must_beat_every_writer():
    a = custom_technique("a", {"train.lr": 1e-3})
    b = custom_technique("b", {"train": {"lr": 1e-3}, "train.steps": 5})
    c = custom_technique("c", {"train.lr": 2e-3})
    assert merge_diffs([a, b]) == {"train.lr": 1e-3, "train.steps": 5}
    assert merge_diffs([a, b, c], wins=[("c", "a"), ("c", "b")])["train.lr"] == 2e-3
    assert merge_diffs([a, b, c], wins=[("a", "c")])["train.lr"] == 1e-3  # b agrees with a, a beats c
    with pytest.raises(ConfigError, match=r"techniques b and c both set train\.lr \(0\.001 vs 0\.002\)"):
        merge_diffs([a, b, c], wins=[("c", "a")])  # c beats a but not b


def test_knob_overrides_and_unknown_knobs():
    assert merge_diffs(["sprint", "repa"], {"sprint": {"drop_ratio": 0.5}, "repa": {"weight": 0.1}}) == {
        "model.sprint.enabled": True,
        "model.sprint.drop_ratio": 0.5,
        "model.repa.enabled": True,
        "loss.repa": 0.1,
    }
    with pytest.raises(
        ConfigError,
        match="technique sprint: unknown knob 'ratio'; allowed knobs: drop_ratio, path_drop_prob, dense_in, dense_out",
    ):
        merge_diffs(["sprint"], {"sprint": {"ratio": 0.5}})
    with pytest.raises(ConfigError, match="technique rmsnorm: unknown knob 'eps'; allowed knobs: none"):
        merge_diffs(["rmsnorm"], {"rmsnorm": {"eps": 1e-5}})
    with pytest.raises(ConfigError, match="unknown technique 'flash'; allowed: sprint, rmsnorm"):
        merge_diffs(["flash"])
    # a knob that makes two techniques disagree is a conflict like any other
    with pytest.raises(ConfigError, match=r"cfm and lossy both set loss\.cfm \(0\.2 vs 0\.05\)"):
        merge_diffs(["cfm", custom_technique("lossy", {"loss.cfm": 0.05})], {"cfm": {"weight": 0.2}})


def test_custom_diff_techniques_merge_like_registry_ones_but_are_not_recorded():
    wide = custom_technique("wide_lr", {"train": {"lr": 3e-3}}, "a larger learning rate")
    assert isinstance(wide, Technique) and wide.diff == {"train.lr": 3e-3} and not wide.builtin
    assert technique("rope").builtin
    cfg = with_techniques(RunConfig(), [wide, "rope"])
    assert cfg.train.lr == 3e-3 and cfg.model.rope.enabled and cfg.techniques == ("rope",)
    with pytest.raises(ConfigError, match="techniques norms and rmsnorm both set model.norm"):
        with_techniques(RunConfig(), [custom_technique("norms", {"model.norm": "layernorm"}), "rmsnorm"])


def test_searched_knobs_apply_only_when_their_technique_is_on():
    searched = {"sprint.drop_ratio": 0.3, "rope.theta": 100.0, "train.lr": 2e-3}
    on = merge_diffs(["sprint"], searched=searched, off=["rope"])
    assert on == {"model.sprint.enabled": True, "model.sprint.drop_ratio": 0.3, "train.lr": 2e-3}
    off = merge_diffs(["rope"], searched=searched, off=["sprint"])
    assert off == {"model.rope.enabled": True, "model.rope.theta": 100.0, "train.lr": 2e-3}
    # a searched value overrides the technique's own knob override
    assert (
        merge_diffs(["sprint"], {"sprint": {"drop_ratio": 0.5}}, searched={"sprint.drop_ratio": 0.25}, off=())[
            "model.sprint.drop_ratio"
        ]
        == 0.25
    )
    with pytest.raises(ConfigError, match="technique sprint: unknown knob 'width'"):
        merge_diffs(["sprint"], searched={"sprint.width": 3})
    cfg = with_techniques(RunConfig(), ["sprint"], searched=searched, off=["rope"], extra={"train.seed": 7})
    assert cfg.model.sprint.drop_ratio == 0.3 and cfg.train.lr == 2e-3 and cfg.train.seed == 7
    assert not cfg.model.rope.enabled and cfg.techniques == ("sprint",)


def test_study_cells_use_the_same_merge():
    from srdit.study.designs import resolve_config
    from srdit.study.spec import study_from_dict

    s = study_from_dict(
        {
            "name": "m",
            "techniques": [
                "swiglu",
                "relu2",
                {"sprint": {"drop_ratio": 0.5}},
                {"name": "wide_lr", "diff": {"train.lr": 3e-3}},
            ],
            "constraints": [{"wins": "relu2", "over": "swiglu"}],
        }
    )
    cfg = resolve_config(s, ("swiglu", "relu2", "sprint", "wide_lr"), 1, {"sprint.drop_ratio": 0.4})
    assert cfg.model.mlp == "relu2" and cfg.model.sprint.drop_ratio == 0.4 and cfg.train.lr == 3e-3
    assert cfg.techniques == ("swiglu", "relu2", "sprint") and cfg.train.seed == 1
    assert s.factor("wide_lr").technique.diff == {"train.lr": 3e-3}
    assert s.factor("sprint").technique.diff == {"model.sprint.enabled": True, "model.sprint.drop_ratio": 0.5}
    with pytest.raises(ConfigError, match=r"techniques a and b both set train\.lr \(0\.001 vs 0\.002\)"):
        study_from_dict(
            {
                "name": "m",
                "techniques": [{"name": "a", "diff": {"train.lr": 1e-3}}, {"name": "b", "diff": {"train.lr": 2e-3}}],
            }
        )


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_studies_plan(path):
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    plan = plan_study(load_study(path))
    assert plan.cells or plan.search_budget


# ------------------------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------------------------


def test_every_technique_says_where_its_code_lives():
    missing = []
    for t in TECHNIQUES.values():
        assert t.code and all(m.startswith("srdit.") for m in t.code), t.name
        missing += [m for m in t.code if importlib.util.find_spec(m) is None]
    assert not missing, f"registry names modules that do not exist: {sorted(set(missing))}"


def test_knobs_name_config_keys_and_the_stack_is_registered():
    for t in TECHNIQUES.values():
        for knob, key in t.knobs.items():
            section, _, rest = key.partition(".")
            assert rest and section in C.to_dict(RunConfig()), (t.name, knob)
        C.apply_diff(RunConfig(), {**t.diff, **{key: C.flatten(RunConfig())[key] for key in t.knobs.values()}})
    assert set(SRDIT_STACK) <= set(TECHNIQUES)
    assert preset("SR-DiT-B/1").techniques == SRDIT_STACK


def test_srdit_techniques_lists_diff_knobs_paper_and_code(capsys):
    assert main(["techniques"]) == 0
    blocks: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith(" "):
            name = line.split(":")[0]
        blocks[name] = blocks.get(name, "") + line + "\n"
    assert list(blocks) == list(TECHNIQUES)
    for t in TECHNIQUES.values():
        text = blocks[t.name]
        assert text.startswith(f"{t.name}: {t.description}\n") and f"paper:  {t.paper}\n" in text
        assert f"code:   {', '.join(t.code)}" in text
        for key in t.diff:
            assert key in text
        for knob, key in t.knobs.items():
            assert f"{knob} -> {key}" in text
    assert main(["techniques", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == list(TECHNIQUES)
    for e in listed:
        t = TECHNIQUES[e["name"]]
        assert e["code"] == list(t.code) and e["diff"] == dict(t.diff) and e["knobs"] == dict(t.knobs)
        assert e["paper"] == t.paper and e["description"] == t.description


# ------------------------------------------------------------------------------------------------------------------
# the loader (a run YAML and a study's base: section)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,where,match",
    [
        ({"train": {"steps": "many"}}, "base", r"^base\.train\.steps: expected an integer, got 'many'$"),
        ({"train": {"steps": "many"}}, "", r"^train\.steps: expected an integer, got 'many'$"),
        ({"preset": "SR-DiT-XL"}, "base", r"^base\.preset: unknown preset 'SR-DiT-XL'; allowed: digits, SR-DiT-B/1$"),
        ({"preset": 3}, "", r"^preset: expected a string; allowed: digits, SR-DiT-B/1$"),
        ({"techniques": "rope"}, "base", r"^base\.techniques: expected a list of names; allowed: sprint"),
        ({"techniques": ["flash"]}, "base", r"^base: unknown technique 'flash'; allowed: sprint"),
        (
            {"modle": {}},
            "base",
            r"^base\.modle: unknown key; allowed keys in base: preset, techniques, model, transport",
        ),
        ({"modle": {}}, "", r"^modle: unknown key; allowed keys: preset, techniques, model, transport"),
        ({"sample": {"path_drop_guidance": True}}, "base", r"^base\.sample\.path_drop_guidance needs model\.sprint"),
        ({"techniques": ["swiglu", "relu2"]}, "base", r"^base: techniques swiglu and relu2 both set model\.mlp"),
    ],
)
def test_run_config_from_dict_errors_name_the_yaml_path(data, where, match):
    with pytest.raises(ConfigError, match=match):
        run_config_from_dict(data, where)


def test_one_loader_for_run_files_and_study_bases(tmp_path):
    from srdit.study.spec import parse_base

    data = {
        "preset": "digits",
        "techniques": ["rope", "cfm"],
        "train": {"steps": 10},
        "model": {"rope": {"theta": 100}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    from_file = load_run_config(tmp_path / "run.yaml")
    from_base, as_written = parse_base(data)
    assert from_file == from_base == run_config_from_dict(data)
    assert from_file.techniques == ("rope", "cfm") and from_file.model.rope.theta == 100 and as_written == data
    assert parse_base("run.yaml", relative_to=tmp_path)[0] == from_file
    # overrides come after the techniques; a file may be fixed by an override before validation
    (tmp_path / "bad.yaml").write_text("sample: {path_drop_guidance: true}\n")
    with pytest.raises(ConfigError, match="needs model.sprint.enabled"):
        load_run_config(tmp_path / "bad.yaml")
    assert load_run_config(tmp_path / "bad.yaml", ["model.sprint.enabled=true"]).sample.path_drop_guidance


def test_sizes_and_tokenizers_are_config_data():
    from srdit.encoders import TOKENIZERS
    from srdit.model import SIZES as MODEL_SIZES
    from srdit.model.sizes import SIZES

    assert SIZES is C.SIZES and MODEL_SIZES is C.SIZES and TOKENIZERS == C.TOKENIZER_NAMES
    with pytest.raises(ConfigError, match="model.size: unknown size 'XXL'; allowed: debug, S, B, L, XL"):
        C.apply_diff(RunConfig(), {"model.size": "XXL"}).validate()
    with pytest.raises(ConfigError, match="data.tokenizer: unknown tokenizer 'vqgan'; allowed: invae, sdvae"):
        C.apply_diff(RunConfig(), {"data.tokenizer": "vqgan"}).validate()


def test_config_techniques_and_study_planning_load_no_torch():
    code = """
import sys
import srdit.config, srdit.techniques, srdit.metric_registry
srdit.techniques.load_run_config(None, ["train.steps=3"]).validate()
srdit.techniques.preset("SR-DiT-B/1").validate()
srdit.techniques.with_techniques(srdit.config.RunConfig(), ["sprint", "rope"])
assert "torch" not in sys.modules, "config layer"
from srdit.study.designs import plan_study
from srdit.study.spec import load_study
plan_study(load_study("studies/digits_quick.yaml"))
assert "torch" not in sys.modules, "study plan"
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------------------------
# training-time vs evaluation-time techniques
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_stage_matches_the_config_sections_its_diff_and_knobs_touch(name):
    """A technique is evaluation-time exactly when every key it writes (diff and knobs) is in an evaluation-time
    section; a training-time technique writes at least one training-time key."""
    from srdit.techniques import EVAL_SECTIONS, key_stage

    t = TECHNIQUES[name]
    keys = list(t.diff) + list(t.knobs.values())
    sections = {k.split(".")[0] for k in keys}
    assert t.stage in ("train", "eval")
    if t.stage == "eval":
        assert sections <= set(EVAL_SECTIONS), f"{name} is marked eval but writes {sorted(sections)}"
    else:
        assert sections - set(EVAL_SECTIONS), f"{name} writes only {sorted(sections)}: mark it stage='eval'"
    assert all(t.knob_stage(k) == key_stage(t.knobs[k]) for k in t.knobs)


def test_evaluation_time_techniques_leave_training_bit_identical(tmp_path):
    """Behaviour behind the classification: a short training with every evaluation-time technique on gives the same
    weights, bit for bit, as without them, and the training part of both configs is the same."""
    import torch

    from srdit.config import apply_diff, to_dict
    from srdit.techniques import training_config
    from srdit.train import load_checkpoint, train

    tiny = {
        "train.steps": 6,
        "train.batch_size": 8,
        "train.log_every": 3,
        "train.ckpt_every": 6,
        "train.eval_every": 0,
        "train.threads": 1,
        "eval.n_samples": 60,
        "eval.batch_size": 60,
        "sample.steps": 2,
    }
    evals = [n for n, t in TECHNIQUES.items() if t.stage == "eval"]
    assert set(evals) >= {"balanced_labels", "path_drop_guidance"}
    a = apply_diff(with_techniques(RunConfig(), ["sprint"]), tiny)
    b = apply_diff(with_techniques(RunConfig(), ["sprint", *evals]), tiny)
    assert training_config(to_dict(a)) == training_config(to_dict(b)) and to_dict(a) != to_dict(b)
    train(a, tmp_path / "a", progress=False)
    train(b, tmp_path / "b", progress=False)
    ca, cb = (load_checkpoint(tmp_path / x / "checkpoints/last.pt") for x in "ab")
    for key in ("model", "ema"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])


def test_custom_diff_stage_follows_its_keys():
    assert custom_technique("cfg2", {"sample": {"cfg_scale": 2.0}}).stage == "eval"
    assert custom_technique("nfe", {"sample.steps": 8, "eval.n_samples": 200}).stage == "eval"
    assert custom_technique("mixed", {"sample.steps": 8, "train.lr": 1e-3}).stage == "train"
