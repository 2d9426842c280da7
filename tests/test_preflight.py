"""Preflight: nothing launches that cannot finish. The ImageNet ladder without its data (every missing input with
the command that makes it; `run` exits 2 and records nothing), metrics the runs do not report, trials that cannot
fit the machine or cluster, and the retry rule of `is_done` (crashed = infrastructure failure, retried)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "studies" / "imagenet256_sr_dit_ladder.yaml"


def test_ladder_plan_lists_every_missing_input_with_its_making_command(tmp_path, monkeypatch, capsys):
    from srdit.commands.study import main

    monkeypatch.chdir(tmp_path)  # no data/ and no weights/ here
    assert main(["plan", str(LADDER), "--json"]) == 0
    problems = json.loads(capsys.readouterr().out)["preflight"]
    by_field = {p.split(" ", 1)[0]: p for p in problems}
    assert set(by_field) == {
        "data.path",
        "data.teacher_path",
        "data.tokenizer_path",
        "data.teacher_cache",
        "eval.reference",
        "eval.inception_path",
        "eval.dinov2_path",
        "resources:",
    }, problems
    assert (
        "`srdit preprocess IMAGE_DIR data/imagenet256_invae --tokenizer invae --weights "
        "weights/e2e-invae-400k.pt --keep-images`"
    ) in by_field["data.path"]
    assert (
        "`srdit reference data/imagenet256_invae data/imagenet256_reference.npz --inception "
        "weights/pt_inception-2015-12-05-6726825d.pth --dinov2 weights/dinov2`"
    ) in by_field["eval.reference"]
    assert "dinov2_vitb14_pretrain.pth" in by_field["data.teacher_path"]
    assert "dinov2_vitl14_pretrain.pth" in by_field["eval.dinov2_path"]
    assert "pt_inception-2015-12-05-6726825d.pth" in by_field["eval.inception_path"]
    assert (
        "`srdit cache-teacher data/imagenet256_invae --teacher dinov2_vitb14 --teacher-path weights/dinov2 "
        "--out data/imagenet256_invae_dinov2_vitb14 --grid 16`"
    ) in by_field["data.teacher_cache"]
    assert "save_reference" not in " ".join(problems)  # commands, not Python functions
    assert "8 workers x 4 CPU + 1 GPU = 32 CPU + 8 GPU" in by_field["resources:"]


def test_ladder_run_without_data_exits_2_and_records_nothing(tmp_path, monkeypatch, capsys):
    from srdit.commands.study import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["run", str(LADDER), "--state", "state"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "srdit study run: error: study imagenet256_sr_dit_ladder cannot run: 8 problem(s); nothing was started"
    )
    for cmd in ("`srdit preprocess IMAGE_DIR data/imagenet256_invae", "`srdit reference data/imagenet256_invae"):
        assert cmd in err
    assert "Traceback" not in err
    assert not (tmp_path / "state").exists()  # no MLflow store, no experiment, no trial folder


def _study(tmp_path, **kw) -> Path:
    data = {"name": "pf", "base": {"train": {"steps": 4}}, "techniques": ["rmsnorm"], "seeds": [0], **kw}
    path = tmp_path / "pf.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_metric_the_runs_do_not_report_is_refused_by_plan_and_run(tmp_path, monkeypatch, capsys):
    from srdit.commands.study import main

    monkeypatch.chdir(tmp_path)
    path = _study(tmp_path, metrics={"primary": "fid", "direction": "min", "others": {"kd_dinov2": "min"}})
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "metrics.primary fid: not reported by these runs (data.dataset digits)" in out
    assert "metrics.others kd_dinov2: not reported" in out and "they report: " in out and " fd," in out
    assert main(["run", str(path), "--state", "state"]) == 2
    assert "metrics.primary fid" in capsys.readouterr().err and not (tmp_path / "state").exists()


def test_latent_runs_report_evaluation_metrics_only_with_a_reference():
    from srdit.config import DataConfig, EvalConfig, RunConfig
    from srdit.study.preflight import reported_metrics

    latents = RunConfig(data=DataConfig(dataset="latents", path="x", tokenizer="invae", tokenizer_path="t"))
    assert "fid" not in reported_metrics(latents) and "loss" in reported_metrics(latents)
    with_ref = RunConfig(data=latents.data, eval=EvalConfig(reference="r.npz"))
    assert {"fid", "sfid", "inception_score"} <= reported_metrics(with_ref)
    assert "kd_dinov2" not in reported_metrics(with_ref)
    assert "fd" in reported_metrics(RunConfig()) and "fid" not in reported_metrics(RunConfig())


def test_every_path_field_a_run_reads_is_checked(tmp_path, monkeypatch):
    """A latent run with REPA on a DINOv2 teacher and full evaluation reads every input field; each missing one is
    reported once; a field without a dedicated check (here: the reference, its check removed) still gets an
    existence check, so a path field added to the config is covered."""
    import srdit.inputs as inputs
    from srdit.config import PATH_FIELDS, DataConfig, EvalConfig, ModelConfig, RepaConfig, RunConfig, TrainConfig

    missing = tmp_path / "missing"
    cfg = RunConfig(
        model=ModelConfig(in_channels=4, input_size=4, num_classes=3, repa=RepaConfig(enabled=True, teacher_dim=768)),
        data=DataConfig(
            dataset="latents",
            path=str(missing / "lat"),
            teacher="dinov2_vitb14",
            teacher_path=str(missing / "dino"),
            tokenizer="invae",
            tokenizer_path=str(missing / "invae.pt"),
            teacher_cache=str(missing / "cache"),
        ),
        eval=EvalConfig(
            reference=str(missing / "ref.npz"),
            inception_path=str(missing / "inc.pth"),
            dinov2_path=str(missing / "dinol"),
        ),
        train=TrainConfig(init=str(missing / "init.pt")),
    )
    fields = [p.field for p in inputs.input_problems(cfg)]
    assert fields == [f for f in PATH_FIELDS if f not in inputs.OUTPUTS]
    assert all(reason for reason in inputs.OUTPUTS.values())  # an output states why it is not read
    monkeypatch.delitem(inputs.CHECKS, "eval.reference")
    generic = [p for p in inputs.input_problems(cfg) if p.field == "eval.reference"]
    assert [p.problem for p in generic] == ["no such file or folder"]
    # nothing is read that the run does not need: digits read no file
    assert inputs.input_problems(RunConfig()) == []


NOT_PATHS = {
    "model.size": "a backbone size name (SIZES)",
    "data.teacher": "a teacher name (TEACHER_NAMES)",
    "data.tokenizer": "a tokenizer name (TOKENIZER_NAMES)",
    "train.device": "a torch device name",
    "techniques": "technique names (the registry)",
    "ext": "plugin knobs, checked by their own rules",
}
"Text fields of RunConfig that name no file: every other one must be a PATH_FIELDS entry."


def test_every_text_field_of_the_config_is_a_checked_path_or_declared_a_name():
    """A new text field is either a path the preflight checks (PATH_FIELDS: `input_problems` covers each, see above)
    or declared here as a name, so a path the trainer, evaluator or data loaders read cannot slip past the
    preflight and end a trial at its start."""
    import dataclasses
    import typing

    from srdit.config import PATH_FIELDS, RunConfig

    def text_fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from text_fields(tp, f"{prefix}{f.name}.")
            elif str in (typing.get_args(tp) or (tp,)) or typing.get_origin(tp) is not None and "str" in str(tp):
                yield prefix + f.name

    fields = set(text_fields(RunConfig))
    unclassified = fields - set(PATH_FIELDS) - set(NOT_PATHS)
    assert not unclassified, f"add to PATH_FIELDS (and a check in srdit.inputs) or to NOT_PATHS: {unclassified}"
    assert set(PATH_FIELDS) <= fields and not set(PATH_FIELDS) & set(NOT_PATHS)


def _teacher_cache_run(tmp_path, cache):
    from srdit.config import DataConfig, ModelConfig, RepaConfig, RunConfig

    return RunConfig(
        model=ModelConfig(in_channels=4, input_size=4, num_classes=3, repa=RepaConfig(enabled=True, teacher_dim=8)),
        data=DataConfig(dataset="latents", path=str(tmp_path / "lat"), teacher="dinov2_vitb14", teacher_cache=cache),
    )


def test_a_missing_or_unfinished_teacher_cache_is_an_input_named_with_its_command(tmp_path):
    """Training only reads the teacher cache (a missing one is a FileNotFoundError at the start of every trial), so
    the preflight lists it, with the `srdit cache-teacher` command that makes it, and an unfinished or mismatched
    one with what to do."""
    from dataclasses import replace

    from srdit.data import teacher_cache as store
    from srdit.data.teacher_cache import TeacherCache
    from srdit.inputs import input_problems

    cache = tmp_path / "cache"
    cfg = _teacher_cache_run(tmp_path, str(cache))
    (p,) = input_problems(cfg, fields=["data.teacher_cache"])
    assert p.problem == "no teacher cache (meta.json missing)"
    assert p.fix == (
        f"make it with `srdit cache-teacher {tmp_path / 'lat'} --teacher dinov2_vitb14 --teacher-path TEACHER_DIR "
        f"--out {cache} --grid 2`"
    )
    with pytest.raises(FileNotFoundError):  # what the trial would hit
        TeacherCache(cache)
    store.create(cache, {"latents": "x", "num_images": 4, "grid": 2, "dim": 8, "parts": 2})
    (p,) = input_problems(cfg, fields=["data.teacher_cache"])
    assert p.problem == "incomplete (2 of 2 parts missing, e.g. part 0)" and "rerun the same" in p.fix
    for k in range(2):
        store.part_dir(cache, k, 2).mkdir(parents=True)
        (store.part_dir(cache, k, 2) / "done.json").write_text("{}")
    assert input_problems(cfg, fields=["data.teacher_cache"]) == []
    larger = replace(cfg, model=replace(cfg.model, input_size=8))
    (p,) = input_problems(larger, fields=["data.teacher_cache"])
    assert p.problem == "made for a 2x2 grid of 8-d tokens, this run needs a 4x4 grid of 8-d tokens"
    assert "into a new folder" in p.fix
    # a cache of another latent folder (told by the fingerprint of data.path's index, when that folder is there)
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "index.json").write_text('{"num_images": 4}')
    (p,) = input_problems(cfg, fields=["data.teacher_cache"])
    assert p.problem == f"made from another latent folder than data.path {tmp_path / 'lat'} (its index differs)"
    from srdit.data.latents import index_fingerprint

    right = tmp_path / "cache2"
    store.create(
        right, {"latents": index_fingerprint(tmp_path / "lat"), "num_images": 4, "grid": 2, "dim": 8, "parts": 1}
    )
    store.part_dir(right, 0, 1).mkdir(parents=True)
    (store.part_dir(right, 0, 1) / "done.json").write_text("{}")
    assert input_problems(replace(cfg, data=replace(cfg.data, teacher_cache=str(right))), ["data.teacher_cache"]) == []
    # relative paths are read from `base`, as a study's trials read them
    rel = replace(cfg, data=replace(cfg.data, path="lat", teacher_cache="cache2"))
    assert input_problems(rel, ["data.teacher_cache"], base=str(tmp_path)) == []
    # without an alignment loss the cache is not read, so not checked
    plain = replace(cfg, model=replace(cfg.model, repa=replace(cfg.model.repa, enabled=False)))
    assert "data.teacher_cache" not in [p.field for p in input_problems(plain)]


def test_evaluation_check_names_the_command_that_makes_the_reference(tmp_path):
    from srdit.config import DataConfig, EvalConfig, RunConfig
    from srdit.evaluate import check_evaluation

    tok = tmp_path / "invae.pt"
    tok.write_bytes(b"x")
    cfg = RunConfig(
        data=DataConfig(dataset="latents", path="lat", tokenizer="invae", tokenizer_path=str(tok)),
        eval=EvalConfig(reference=str(tmp_path / "ref.npz"), inception_path=str(tmp_path / "inc.pth")),
    )
    with pytest.raises(FileNotFoundError) as e:
        check_evaluation(cfg)
    text = str(e.value)
    assert f"`srdit reference lat {tmp_path / 'ref.npz'} --inception {tmp_path / 'inc.pth'}`" in text
    assert "FID Inception weights not found" in text  # both problems at once


def _spec(tmp_path, resources):
    from srdit.study.spec import load_study

    return load_study(_study(tmp_path, resources=resources))


@pytest.mark.parametrize(
    "resources,nodes,fits",
    [
        ({"workers": 2, "cpus": 1}, [{"CPU": 2}], True),  # the README's CPU example on a 2-core machine
        ({"workers": 2, "cpus": 1}, [{"CPU": 1}, {"CPU": 1}], True),  # one worker per node
        ({"workers": 2, "cpus": 2}, [{"CPU": 2}], False),
        ({"cpus": 4}, [{"CPU": 2}, {"CPU": 2}], False),  # a single-process trial lives on one node
        ({"gpus": 8, "cpus": 4}, [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}], True),
        ({"gpus": 8, "cpus": 4}, [{"CPU": 16, "GPU": 8}], False),  # 32 CPUs for 8 workers
        ({"gpus": 2}, [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}], True),  # 2 GPUs = 2 workers, one per node
        ({"gpus": 1}, [{"CPU": 8}], False),
    ],
)
def test_a_trial_that_cannot_fit_is_refused_saying_what_it_needs_and_what_exists(tmp_path, resources, nodes, fits):
    from srdit.study.preflight import resource_problems

    problems = resource_problems(_spec(tmp_path, resources), nodes, "the cluster")
    assert (problems == []) == fits, problems
    if not fits:
        assert problems[0].startswith("resources: a trial needs ") and "; the cluster has " in problems[0]


def test_run_refuses_a_trial_larger_than_this_machine_before_recording(tmp_path, monkeypatch, capsys):
    from srdit.commands.study import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = _study(tmp_path, resources={"cpus": 4})
    assert main(["run", str(path), "--state", "state", "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "resources: a trial needs 4 CPU; this machine has 2 CPU" in err and not (tmp_path / "state").exists()


def _run(status: str | None, mlflow_status: str = "FAILED"):
    return SimpleNamespace(info=SimpleNamespace(status=mlflow_status), data=SimpleNamespace(tags={"status": status}))


def test_retry_rule_crashed_is_retried_diverged_and_oom_stay():
    from srdit.runtime.tracking import has_ended, is_done

    assert is_done(_run("finished", "FINISHED")) and is_done(_run("diverged")) and is_done(_run("oom"))
    assert not is_done(_run("crashed"))  # a failure outside the trial is not a result
    assert has_ended(_run("crashed"))  # ... but it is recorded as what it is
    assert not is_done(_run("running", "RUNNING")) and not is_done(_run(None, "RUNNING"))
    # --retry-failed: only finished stays
    assert is_done(_run("finished", "FINISHED"), retry_failed=True)
    assert not any(is_done(_run(s), retry_failed=True) for s in ("diverged", "oom", "crashed"))
