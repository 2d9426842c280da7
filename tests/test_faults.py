"""Faults of the machine, not of the input: a full disk during a checkpoint save, an input file that never ends
(/dev/zero, a FIFO) or is far too big, a device the machine does not have, memory the machine will not give.
Each ends in one line naming what happened (no traceback), a non-zero exit, the run finished or resumable, and
nothing lost; in a study, a recorded reason that says it plainly."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from srdit.analysis.results import CRASH_CAUSE, INFRASTRUCTURE
from srdit.cache import save_atomic
from srdit.commands import main
from srdit.config import YAML_MAX_BYTES, ConfigError
from srdit.runtime.worker import _crash, is_oom
from srdit.train import TRAIN_LOG, load_checkpoint, out_of_memory, resolve_device

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "train.steps=20",
    "train.log_every=1",
    "train.ckpt_every=10",
    "train.threads=1",
    "eval.n_samples=60",
    "eval.batch_size=60",
    "sample.steps=4",
]


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, code: int) -> str:
    """Assert exit `code` and exactly one line on stderr, no traceback; return the line."""
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def srdit(*args, limit_bytes: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m srdit ARGS` in a fresh process, its address space capped at `limit_bytes` when given."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "srdit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=cap if limit_bytes else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# 1. A full disk during a checkpoint save
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def full_disk_for(monkeypatch):
    """`full_disk_for(name, after=k)`: the atomic writes of files named `name` after the first `k` (in each folder) go
    to /dev/full,
    where every write fails with ENOSPC, as on a full disk (the temporary file itself is created, as it would be).
    Returns a function that frees the disk again."""
    real = tempfile.mkstemp

    def arm(name: str, after: int = 0):
        calls: dict[Path, int] = {}

        def mkstemp(*args, **kwargs):
            fd, tmp = real(*args, **kwargs)
            if Path(tmp).name.startswith(f".{name}."):
                folder = Path(tmp).parent
                calls[folder] = calls.get(folder, 0) + 1
                if calls[folder] > after:
                    full = os.open("/dev/full", os.O_WRONLY)
                    os.dup2(full, fd)
                    os.close(full)
            return fd, tmp

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        return lambda: monkeypatch.setattr(tempfile, "mkstemp", real)

    return arm


def test_a_full_disk_during_save_names_the_file_and_keeps_the_old_one(tmp_path, full_disk_for):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    full_disk_for("last.pt")
    with pytest.raises(OSError) as raised:
        save_atomic({"step": 2, "w": torch.zeros(100_000)}, path)
    e = raised.value
    assert e.errno == errno.ENOSPC and e.filename == str(path)
    assert torch.load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    # in a study the trial's recorded reason says it, and a full disk is the infrastructure's failure
    status, reason, cause = _crash(e)
    assert status == "crashed" and cause == INFRASTRUCTURE
    assert "No space left on device" in reason and str(path) in reason


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_resumes(tmp_path, capsys, full_disk_for):
    """The checkpoint of step 10 is written, the final one (step 20) meets a full disk: one line, exit 1, the step
    10 checkpoint intact; the rerun resumes from it and finishes."""
    out = tmp_path / "run"
    free_space = full_disk_for("last.pt", after=1)
    line = one_line(*cli(capsys, "train", *TINY, "--out", out, "--quiet")[::2], code=1)
    ckpt = out / "checkpoints/last.pt"
    assert line.startswith(f"srdit train: error: {ckpt}: no space left on device; rerun"), line
    assert load_checkpoint(ckpt)["step"] == 10
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    free_space()
    with (out / "metrics.jsonl").open("a") as f:  # a fresh start would clear the file; a resumed run keeps it
        f.write(json.dumps({"step": 0, "written_before_the_rerun": 1}) + "\n")
    rc, stdout, err = cli(capsys, "train", *TINY, "--out", out, "--quiet")
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "finished"
    assert load_checkpoint(ckpt)["step"] == 20
    assert "written_before_the_rerun" in (out / "metrics.jsonl").read_text()  # trained on from step 10


@pytest.mark.slow
def test_a_study_on_a_full_disk_records_it_plainly_and_resumes(tmp_path, full_disk_for):
    """Every trial's final checkpoint meets a full disk: each trial is `crashed`, its reason naming the disk and
    the file, its cause the infrastructure's (no evidence against the techniques); run again with room on the disk,
    every trial finishes from its last checkpoint."""
    from srdit.runtime.driver import _context, prepare, work_units
    from srdit.runtime.jobs import trial_job
    from srdit.runtime.worker import execute_group
    from srdit.study.spec import study_from_dict

    spec = study_from_dict(
        {
            "name": "full-disk",
            "base": {
                "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2, "threads": 1},
                "eval": {"n_samples": 40, "batch_size": 40},
                "sample": {"sampler": "euler", "steps": 2},
            },
            "seeds": [0],
            "techniques": [{"name": "slow_lr", "diff": {"train.lr": 5e-5}}],
            "metrics": {"primary": "fd", "direction": "min"},
        }
    )
    plan, tracking, state = prepare(spec, tmp_path / "state")
    ctx = _context(spec, tracking, state, plan)

    def run_all():
        for unit in work_units(plan, [trial_job(t, ".") for t in plan.trials], {}):
            execute_group(unit, ctx)
        return {r.data.tags["cell"]: r.data.tags for r in tracking.children_by_key().values()}

    free_space = full_disk_for("last.pt", after=1)  # the step-2 checkpoint is written, the final one is not
    runs = run_all()
    assert {c: t["status"] for c, t in runs.items()} == {"0": "crashed", "1": "crashed"}
    for tags in runs.values():
        assert tags[CRASH_CAUSE] == INFRASTRUCTURE
        assert tags["status_reason"].startswith("OSError: [Errno 28] No space left on device: ")
        assert tags["status_reason"].endswith("checkpoints/last.pt'")
    checkpoints = sorted(Path(ctx.trials_dir).glob("*/checkpoints/*"))
    assert len(checkpoints) == 2 and all(p.name == "last.pt" and load_checkpoint(p)["step"] == 2 for p in checkpoints)
    free_space()
    logs = [p.parent.parent / TRAIN_LOG for p in checkpoints]
    for log in logs:  # a fresh start would clear a trial's training log; a resumed trial keeps it
        with log.open("a") as f:
            f.write(json.dumps({"step": 0, "written_before_the_rerun": 1}) + "\n")
    runs = run_all()
    assert {c: t["status"] for c, t in runs.items()} == {"0": "finished", "1": "finished"}
    assert all(load_checkpoint(p)["step"] == 4 for p in checkpoints)
    assert all("written_before_the_rerun" in log.read_text() for log in logs)  # trained on from step 2


# ----------------------------------------------------------------------------------------------------------------
# 2. Input files that never end or are far too big
# ----------------------------------------------------------------------------------------------------------------

ANALYZE = ["--factors", "A,B", "--metric", "y", "--direction", "min"]


def test_analyze_refuses_dev_zero_and_an_oversize_file(tmp_path, capsys):
    line = one_line(*cli(capsys, "analyze", "/dev/zero", *ANALYZE)[::2], code=2)
    assert line == "srdit analyze: error: /dev/zero: is a character device, not a regular file; give the path of a file"
    big = tmp_path / "runs.csv"
    with big.open("wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: no disk used
    line = one_line(*cli(capsys, "analyze", big, *ANALYZE)[::2], code=2)
    assert f"{big}: is 1.0 GiB, over the 1.0 GiB limit of an input file" in line


def test_a_study_yaml_that_is_dev_zero_or_oversize(tmp_path, capsys):
    line = one_line(*cli(capsys, "study", "plan", "/dev/zero")[::2], code=2)
    assert line.endswith("/dev/zero: is a character device, not a regular file; give the path of a file")
    big = tmp_path / "study.yaml"
    with big.open("wb") as f:
        f.truncate(YAML_MAX_BYTES + 1)
    line = one_line(*cli(capsys, "study", "plan", big)[::2], code=2)
    assert f"{big}: is 16.0 MiB, over the 16.0 MiB limit of an input file" in line
    line = one_line(*cli(capsys, "train", big)[::2], code=2)  # a run config: the same reader
    assert f"{big}: is 16.0 MiB" in line


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "{fifo}", *ANALYZE],
        ["study", "plan", "{fifo}"],
        ["train", "{fifo}"],
        ["sample", "{fifo}", "--out", "{out}"],
        ["convert", "{fifo}", "--from", "sit", "--preset", "digits", "--out", "{out}"],
    ],
    ids=["analyze", "study", "train", "checkpoint", "convert"],
)
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, args):
    """A FIFO with no writer: opening it would block forever (a separate process, so a regression times out)."""
    fifo = tmp_path / "input.pipe"
    os.mkfifo(fifo)
    r = srdit(*(a.format(fifo=fifo, out=tmp_path / "s") for a in args), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"srdit {' '.join(args[:2] if args[0] == 'study' else args[:1])}: error: {fifo}: is a named pipe (FIFO), "
        "not a regular file; give the path of a file"
    ]


def test_a_plugin_file_that_is_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    (tmp_path / "run.yaml").write_text("plugins: [pipe.py]\n")
    r = srdit("train", tmp_path / "run.yaml", "--print-config", timeout=120)
    line = one_line(r.returncode, r.stderr, code=2)
    assert f"plugin {fifo}: is a named pipe (FIFO), not a regular file" in line, line


# ----------------------------------------------------------------------------------------------------------------
# 3. A device this machine does not have
# ----------------------------------------------------------------------------------------------------------------


def _missing_cuda() -> list[tuple[str, str]]:
    """(train.device value, what the line must say) for the CUDA devices this machine lacks."""
    if not torch.cuda.is_available():
        return [
            ("cuda", "train.device=cuda: no CUDA device here (torch.cuda.is_available() is False); use cpu or auto"),
            ("cuda:7", "train.device=cuda:7: no CUDA device here"),
        ]
    n = torch.cuda.device_count()
    return [(f"cuda:{n}", f"train.device=cuda:{n}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")]


@pytest.mark.parametrize(
    "device,message",
    [
        *_missing_cuda(),
        ("mps", "train.device: 'mps' is not allowed; allowed values: auto, cpu, cuda, cuda:N"),
        ("gpu0", "train.device: 'gpu0' is not allowed; allowed values: auto, cpu, cuda, cuda:N"),
    ],
)
def test_a_device_this_machine_lacks_is_one_line_before_training(tmp_path, capsys, device, message):
    line = one_line(*cli(capsys, "train", f"train.device={device}", "--out", tmp_path / "run")[::2], code=2)
    assert line.startswith(f"srdit train: error: {message}"), line
    assert not (tmp_path / "run/checkpoints").exists()  # refused before anything was built


def test_sample_and_evaluate_name_their_own_flag_for_a_missing_device():
    """`srdit sample` / `evaluate` resolve --device with the same rule, sharded sampling included."""
    from srdit.sample_shards import shard_device

    bad = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    for resolve in (resolve_device, shard_device):
        with pytest.raises(ConfigError, match=f"^--device={bad}: "):
            resolve(bad, "--device") if resolve is resolve_device else resolve(bad)


# ----------------------------------------------------------------------------------------------------------------
# 4. Memory the machine will not give
# ----------------------------------------------------------------------------------------------------------------

ADDRESS_SPACE = 3 << 30
"The cap of the out-of-memory runs: 3 GiB of address space (torch and the digits run fit in about 1.5)."


def test_a_cpu_allocation_failure_is_out_of_memory():
    """torch's CPU allocator reports a refused allocation as a RuntimeError; it counts as out of memory, in a study
    too (an `oom` result, not a crash). The allocation asked for is far beyond any machine: refused at once."""
    with pytest.raises(RuntimeError) as raised:
        torch.empty(1 << 62, dtype=torch.uint8)
    e = raised.value
    assert "can't allocate memory" in str(e)
    assert out_of_memory(e) == "out of CPU memory allocating 4294967296.00 GiB; lower the batch size or the model size"
    assert is_oom(e) and _crash(e)[0] == "oom" and _crash(MemoryError())[0] == "oom"
    assert out_of_memory(ValueError("can't allocate memory")) is None


@pytest.mark.slow
def test_train_out_of_memory_in_a_step_is_an_oom_result(tmp_path):
    """A batch too large for the memory it may use: the run ends as `oom`, its reason one line with the size it
    asked for and what to lower; exit 1, no traceback."""
    r = srdit(
        "train",
        "train.batch_size=200000",
        "train.steps=2",
        "train.threads=1",
        "--out",
        tmp_path,
        "--quiet",
        limit_bytes=ADDRESS_SPACE,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["status"] == "oom"
    assert summary["reason"].startswith("out of CPU memory allocating ")
    assert "lower train.batch_size (now 200000) or the model size (model.size debug) (at step 1)" in summary["reason"]


@pytest.mark.slow
def test_train_out_of_memory_while_building_is_one_line(tmp_path):
    """A model too large for the memory it may use fails before training: one line, exit 1, no traceback."""
    r = srdit("train", "model.size=XL", "train.steps=2", "--out", tmp_path, "--quiet", limit_bytes=ADDRESS_SPACE)
    line = one_line(r.returncode, r.stderr, code=1)
    assert line.startswith("srdit train: error: out of CPU memory allocating ")
    assert line.endswith("; lower train.batch_size (now 64) or the model size (model.size XL)")


@pytest.mark.slow
def test_sample_out_of_memory_is_one_line(tmp_path):
    """The same rule for every run command: sampling a batch too large for the memory it may use."""
    r = srdit("train", "train.steps=2", "eval.n_samples=20", "eval.batch_size=20", "--out", tmp_path, "--quiet")
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "checkpoints/last.pt"
    r = srdit(
        "sample", ckpt, "--n", "200000", "--batch-size", "200000", "--steps", "2", "--out", tmp_path / "s",
        limit_bytes=ADDRESS_SPACE,
    )  # fmt: skip
    line = one_line(r.returncode, r.stderr, code=1)
    assert line.startswith("srdit sample: error: out of CPU memory allocating ")
    assert line.endswith("; lower the batch size or the model size")


def test_an_image_that_is_a_fifo_is_refused(tmp_path):
    """`srdit preprocess` / `srdit reference` decode every image of a folder: a FIFO among them is named, not waited
    on (a separate process, so a regression times out)."""
    fifo = tmp_path / "n01" / "a.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    code = f"from srdit.data.imagenet import load_crop\ntry:\n    load_crop({str(fifo)!r}, 8)\nexcept ValueError as e:\n    print(e)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.stdout.strip() == f"{fifo}: is a named pipe (FIFO), not a regular file; give the path of a file", r.stderr
