"""`srdit study submit --slurm`: the sbatch script (every resource asked for, valid bash), bad input in one line, and
a real Slurm (Debian's slurmctld, slurmd and munge on loopback, configured by the `slurm` fixture): a tiny study
submitted and run to the end on Ray inside the job; a second one stopped mid-trial by SIGTERM to the batch shell
(`scancel --signal=TERM --batch`, the path of Slurm's `--signal` before a time limit), resubmitted, and ending with
the same results as the uninterrupted one."""

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import study_command
from test_signals import _trials

from srdit.commands.study import main as study_main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)
STUDY = {
    "name": "sl",
    "techniques": ["rmsnorm"],
    "seeds": [0],
    "base": {
        "train": {"steps": 200, "batch_size": 16, "log_every": 5, "ckpt_every": 100000},
        "eval": {"n_samples": 50, "batch_size": 50},
        "sample": {"sampler": "euler", "steps": 2},
    },
}


def _study_file(folder: Path, steps: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "sl.yaml"
    study = {**STUDY, "base": {**STUDY["base"], "train": {**STUDY["base"]["train"], "steps": steps}}}
    p.write_text(yaml.safe_dump(study))
    return p


# --- the script and bad input (no Slurm needed) ---


def test_dry_run_prints_a_valid_script_naming_every_resource_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _study_file(tmp_path)
    state = tmp_path / "shared" / "state"
    args = ["submit", "sl.yaml", "--slurm", "--state", str(state), "--nodes", "3", "--gpus-per-node", "4"]
    args += ["--cpus-per-node", "32", "--partition", "gpu", "--time", "1-12:00:00", "--account", "lab-7", "--dry-run"]
    assert study_main(args) == 0
    script = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1-12:00:00",
        "#SBATCH --account=lab-7",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:TERM@180",
        f"#SBATCH --output={state}/slurm/sl-%j.out",
        "export RAY_AUTH_MODE=token",
        f"export RAY_AUTH_TOKEN_PATH={state}/slurm/ray_token",
    ):
        assert line in script.splitlines(), line
    assert "wait_nodes 3 " in script  # waits for the 3 nodes before the driver starts
    for guard in ('--num-gpus="$gpus"', "gpus=${SLURM_GPUS_ON_NODE:-4}", '--node-ip-address="$head_ip"', "--temp-dir="):
        assert guard in script, guard
    assert 'study run "$STUDY" --state "$STATE" --address "$address"' in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not state.exists()  # nothing written, nothing submitted


def test_the_port_block_of_a_job_lies_below_the_ephemeral_range_and_is_its_own():
    from srdit.runtime.slurm import PORT_BASE, PORT_BLOCK, PORT_SLOTS

    blocks = [PORT_BASE + (j % PORT_SLOTS) * PORT_BLOCK for j in range(1000, 1000 + PORT_SLOTS)]
    assert len(set(blocks)) == PORT_SLOTS  # consecutive jobs never share a block
    assert min(blocks) >= 1024 and max(blocks) + PORT_BLOCK - 1 < 32768


@pytest.mark.parametrize(
    "value, seconds",
    [("0", 0), ("90", 5400), ("5:30", 330), ("2:00:00", 7200), ("1-2", 93600), ("1-2:30", 95400), ("1-0:0:9", 86409)],
)
def test_time_limits_in_every_sbatch_format(value, seconds):
    from srdit.runtime.slurm import time_limit_s

    assert time_limit_s(value) == seconds


@pytest.mark.parametrize(
    "extra, state, message",
    [
        ([], "state", "--state must be an absolute path on storage every node sees"),
        (["--nodes", "0"], None, "--nodes must be at least 1, got 0"),
        (["--gpus-per-node", "-1"], None, "--gpus-per-node must be 0 or more, got -1"),
        (["--cpus-per-node", "0"], None, "--cpus-per-node must be at least 1, got 0"),
        (["--time", "two hours"], None, "--time must be one of sbatch's formats"),
        (["--time", "4:00"], None, "--time must be longer than 4 minutes: the job is told to stop 180 s before"),
        (["--partition", "gpu; rm -rf ~"], None, "--partition must be a Slurm name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, state, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _study_file(tmp_path)
    rc = study_main(["submit", "sl.yaml", "--slurm", "--state", state or str(tmp_path / "st"), "--dry-run", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("srdit study submit: error: ") and message in err[0], err


def test_without_sbatch_or_without_a_scheduler_it_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _study_file(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert study_main(["submit", "sl.yaml", "--slurm", "--state", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "srdit study submit: error: sbatch not found on PATH: submit from a machine of the Slurm cluster "
        "(or print the script with --dry-run)"
    ]
    assert study_main(["submit", "sl.yaml", "--state", str(tmp_path / "st")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "srdit study submit: error: one of the arguments --slurm --kuberay is required"
    ]


def test_status_names_the_recorded_job_and_says_when_slurm_cannot_be_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _study_file(tmp_path)
    (tmp_path / "st" / "slurm").mkdir(parents=True)
    (tmp_path / "st" / "slurm" / "sl.job").write_text("4242\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert study_main(["status", "sl.yaml", "--state", "st"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "Slurm job 4242: unknown (squeue is not on PATH here) (log st/slurm/sl-4242.out)",
        "no trial has run yet: the job starts the study",
    ]


# --- a real Slurm ---

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm on loopback (munged, slurmctld, slurmd as this machine's processes, their files in a temp
    folder, run as the user running the tests: Slurm's daemons need no root to run that user's jobs); SLURM_CONF
    points the clients at it. Skipped where the Debian packages (slurmctld slurmd munge slurm-client) are absent,
    unless SRDIT_REQUIRE_SLURM is set (CI), where that fails."""
    missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
    if missing:
        why = f"no Slurm here ({', '.join(missing)} not found; Debian: apt-get install slurmctld slurmd munge slurm-client)"
        if os.environ.get("SRDIT_REQUIRE_SLURM"):
            pytest.fail(why)
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "spool", "state", "log"):
        (d / sub).mkdir(mode=0o700)
    key = d / "munge" / "key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = d / "munge" / "sock"
    conf = d / "slurm.conf"
    conf.write_text(
        f"""ClusterName=srdit
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={getpass.getuser()}
SlurmdUser={getpass.getuser()}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "log" / "slurmctld.log"}
SlurmdLogFile={d / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=30
# job ids from 60: the job's Ray ports (srdit.runtime.slurm) then start at 22000, above the worker ports
# (10002-19999) of any other Ray on this machine
FirstJobId=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = ENV["SLURM_CONF"] = str(conf)
    log = open(d / "log" / "daemons.out", "w")  # noqa: SIM115 - open for the daemons' lifetime
    procs = [
        subprocess.Popen(
            [
                _which("munged"),
                "-F",
                "-f",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munge' / 'seed'}",
                f"--log-file={d / 'log' / 'munged.log'}",
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
    ]
    try:
        deadline = time.time() + 60
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.2)
        procs.append(subprocess.Popen([_which("slurmctld"), "-D", "-i"], stdout=log, stderr=log, env=ENV))
        time.sleep(1)
        procs.append(subprocess.Popen([_which("slurmd"), "-D", "-N", "localhost"], stdout=log, stderr=log, env=ENV))
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=ENV)
            if r.stdout.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Slurm node never became idle: {(d / 'log' / 'daemons.out').read_text()[-2000:]}")
        yield d
    finally:
        jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True, env=ENV)
        subprocess.run(["scancel", "--user", getpass.getuser()], capture_output=True, env=ENV)
        time.sleep(1)
        for job in jobs.stdout.split():  # the Ray temp folders of this cluster's jobs
            shutil.rmtree(f"/tmp/srdit-ray-{job}", ignore_errors=True)
        for p in reversed(procs):  # slurmd, slurmctld, munged: the processes this fixture started
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _srdit(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srdit", *args], cwd=cwd, env=ENV, capture_output=True, text=True)


def _status(folder: Path) -> str:
    """`srdit study status` of the study in `folder`, in this process (Slurm is asked through the fixture's
    SLURM_CONF)."""
    return study_command("status", str(folder / "sl.yaml"), "--state", str(folder / "st"))


def _submit(folder: Path, *extra: str) -> str:
    r = _srdit("study", "submit", "sl.yaml", "--slurm", "--state", str(folder / "st"), "--cpus-per-node", "2",
               "--gpus-per-node", "0", "--nodes", "1", *extra, cwd=folder)  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert job.isdigit() and r.stdout.count("\n") == 1, r.stdout
    assert (folder / "st" / "slurm" / "sl.job").read_text().strip() == job
    assert oct((folder / "st" / "slurm" / "ray_token").stat().st_mode & 0o777) == "0o600"
    return job


def _job(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=ENV).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait_job(job: str, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(job)
        if info.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} did not end in {timeout} s: {_job(job)}")


def _wait_training(folder: Path, job: str) -> None:
    """Until both trials of the job's study have logged a training report."""
    trials = folder / "st" / "trials" / "sl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if len([p for p in trials.glob("*/train_metrics.jsonl") if p.stat().st_size]) >= 2:
            return
        time.sleep(0.2)
    raise AssertionError(_log(folder, job)[-4000:])


def _log(folder: Path, job: str) -> str:
    return (folder / "st" / "slurm" / f"sl-{job}.out").read_text()


@pytest.fixture(scope="module")
def whole(slurm, tmp_path_factory) -> dict:
    """The study submitted and run to the end in one job."""
    folder = tmp_path_factory.mktemp("whole")
    _study_file(folder)
    job = _submit(folder)
    info = _wait_job(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _log(folder, job)[-4000:]
    status = _status(folder)
    return {"folder": folder, "job": job, "trials": _trials(folder, "sl"), "status": status}


@pytest.mark.slow
def test_a_study_submitted_to_slurm_runs_to_the_end_on_ray_with_token_auth(whole):
    log = _log(whole["folder"], whole["job"])
    assert "srdit: Ray on 1 node(s) at " in log and "(2 CPUs, 0 GPUs per node)" in log
    assert "Ray: the cluster at " in log and "(RAY_AUTH_MODE=token)" in log
    assert "study sl: 2/2 trials done (2 finished)" in log
    trials = whole["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials.values()} == {"finished"}
    assert all(t["fd"] is not None and len(t["loss"]) == 40 for t in trials.values())
    assert f"Slurm job {whole['job']}: COMPLETED" in whole["status"]
    assert "2/2 trials done (2 finished)" in whole["status"]


@pytest.mark.slow
def test_a_slurm_job_stopped_by_sigterm_keeps_checkpoints_and_a_resubmission_ends_equal(whole, tmp_path):
    folder = tmp_path
    _study_file(folder)
    job = _submit(folder)
    trials = folder / "st" / "trials" / "sl"
    _wait_training(folder, job)
    # SIGTERM to the batch shell, as Slurm's --signal=B:TERM@... sends it before the time limit
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, env=ENV)
    info = _wait_job(job)
    log = _log(folder, job)
    assert info["ExitCode"] == "143:0", log[-4000:]
    assert "srdit: SIGTERM received" in log
    assert (
        "stopped by SIGTERM: the running trials wrote a checkpoint at their current step; "
        f"`srdit study run {folder / 'sl.yaml'} --state {folder / 'st'}` resumes the study"
    ) in log
    assert "requeueing" not in log  # not at a time limit: the job ends, the user resubmits
    got = _trials(folder, "sl")
    assert {t["status"] for t in got.values()} == {"interrupted"}, got
    import torch

    for key, t in got.items():  # each trial's checkpoint holds the step its status names
        step = int(t["reason"].split("checkpoint at step ")[1].split()[0])
        ckpt = torch.load(trials / key / "checkpoints" / "last.pt", weights_only=False)
        assert ckpt["step"] == step and 0 < step < 200
    status = _status(folder)
    assert f"Slurm job {job}: FAILED" in status and "will run 2 trial(s): 2 interrupted" in status, status

    again = _submit(folder)
    info = _wait_job(again)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _log(folder, again)[-4000:]
    got, want = _trials(folder, "sl"), whole["trials"]
    assert {t["status"] for t in got.values()} == {"finished"}
    assert got.keys() == want.keys()
    for key in want:  # every logged loss and the final evaluation as in the uninterrupted job
        assert got[key]["loss"] == want[key]["loss"], key
        assert got[key]["fd"] == want[key]["fd"], key


@pytest.mark.slow
def test_a_job_reaching_its_time_limit_stops_with_checkpoints_and_requeues_itself(slurm, tmp_path):
    """--time 5, then, once both trials train, the limit cut to 3 minutes (`scontrol update`, as a user may shorten
    their own job): Slurm's --signal=B:TERM@180 reaches the batch shell at its next time-limit check instead of about
    two minutes later; the trials stop with a checkpoint and the script requeues the job (its next start is `study
    run` again: the resume of the test above). The test cancels the requeued job instead of waiting for Slurm's delay
    before a requeued start."""
    folder = tmp_path
    _study_file(folder, steps=100000)  # it cannot finish before the signal
    job = _submit(folder, "--time", "5")
    _wait_training(folder, job)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=3"], check=True, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and _job(job).get("Restarts") != "1":
        time.sleep(1)
    subprocess.run(["scancel", job], check=True, env=ENV)
    log = _log(folder, job)
    assert f"srdit: the time limit is near; requeueing job {job}, which resumes the study" in log, log[-4000:]
    left = int(log.split("srdit: SIGTERM received (")[1].split()[0])
    assert 0 < left <= 180, log[-4000:]  # the limit is 3 minutes once the trials train: under 180 s are left
    got = _trials(folder, "sl")
    assert {t["status"] for t in got.values()} == {"interrupted"}, got
    for t in got.values():
        assert "interrupted by SIGTERM: checkpoint at step" in t["reason"], t["reason"]


@pytest.mark.slow
def test_a_job_sbatch_refuses_is_one_line_and_exit_2(slurm, tmp_path):
    _study_file(tmp_path)
    r = _srdit("study", "submit", "sl.yaml", "--slurm", "--state", str(tmp_path / "st"), "--partition", "nosuch",
               cwd=tmp_path)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("srdit study submit: error: sbatch refused the job (") and "nosuch" not in r.stdout
    assert "invalid partition" in lines[0].lower(), lines[0]
    assert not (tmp_path / "st" / "slurm" / "sl.job").exists()
