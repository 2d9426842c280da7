"""A study as a Slurm batch job: the sbatch script that brings up Ray inside the allocation and runs the study's
driver on it, its submission, and the job's state for `srdit study status`.

The script follows Ray's documented pattern for Slurm ("Deploying on Slurm", docs.ray.io/en/latest/cluster/vms/
user-guides/community/slurm.html): one task per node; `ray start --head --block` through `srun` on the first node,
`ray start --address HEAD:PORT --block` through `srun` on each other node, then the driver (`srdit study run ...
--address HEAD:PORT`) in the batch shell on the first node. `ray symmetric-run` is not used: it refuses
`--node-ip-address`, which is the guard against a head bound to the wrong interface.

Guards against the failure modes reported on Ray's issue tracker:
- GPUs seen on one node only: every node gets `--num-gpus` (and `--num-cpus`) explicitly, from the job's
  allocation (SLURM_GPUS_ON_NODE, else the count asked for), never from Ray's detection;
- the head's address on the wrong interface: taken from `hostname --ip-address` on the head node (the address the
  node's name resolves to, which is how Slurm reaches it; `hostname -I` when that is loopback), passed to every
  `ray start` as `--node-ip-address` / `--address`;
- two jobs' Ray ports clashing on a shared node: every port of the job (GCS, raylet, object manager, client
  server, dashboard, agents, metrics, the workers' range) lies in a block of `PORT_BLOCK` ports chosen from the job
  id below the Linux ephemeral range, and each job has its own temp dir (`--temp-dir /tmp/srdit-ray-JOBID`); the
  script never calls `ray stop`, which would stop the user's other jobs on the node.

Token authentication is on (RAY_AUTH_MODE=token) with a token generated into the state folder (mode 0600).
Stopping: `#SBATCH --signal=B:TERM@SIGNAL_LEAD_S` sends SIGTERM to the batch shell that long before the time limit;
the shell's trap forwards it to the driver, which stops its trials with a checkpoint at their current step
(`srdit.stop`); at a time limit the script then requeues the job (`scontrol requeue`), which resumes the study.
`#SBATCH --requeue` lets Slurm requeue a preempted job or one whose node failed; `--open-mode=append` keeps the log
of every start in one file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from srdit.config import ConfigError

SIGNAL_LEAD_S = 180
"""Seconds before the time limit at which the batch shell gets SIGTERM (`--signal=B:TERM@...`): the driver's stop
grace (`srdit.stop.DEFAULT_GRACE_S`), Ray's shutdown, and Slurm's up to 60 s early delivery of the signal."""
PORT_BASE = 10000
PORT_BLOCK = 200
PORT_SLOTS = 110
"""A job's ports are PORT_BASE + (job id % PORT_SLOTS) * PORT_BLOCK ... + PORT_BLOCK - 1: from 10000 to 31999,
below Linux's ephemeral range (32768-60999), so that outgoing connections never take them."""
NODES_WAIT_S = 600
"How long the script waits for every node's Ray to join before it gives up (exit 1)."

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_NAME = re.compile(r"^[A-Za-z0-9_.,+-]+$")


@dataclass(frozen=True)
class SlurmJob:
    """What a study's batch job asks Slurm for and runs. `state`: absolute path of the state folder on shared
    storage; `study`: absolute path of the study YAML; `cwd`: the folder the job runs in (relative paths of the
    study resolve against it)."""

    name: str
    study: str
    state: str
    cwd: str
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    python: str = sys.executable

    @property
    def folder(self) -> Path:
        """STATE/slurm: the script, the job id, the log and the Ray token."""
        return Path(self.state) / "slurm"

    @property
    def script_path(self) -> Path:
        return self.folder / f"{self.name}.sbatch"

    @property
    def token_path(self) -> Path:
        return self.folder / "ray_token"


def slurm_job(
    name: str,
    study: str | Path,
    state: str | Path,
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    cpus_per_node: int | None = None,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
) -> SlurmJob:
    """A checked `SlurmJob`; ConfigError (one line naming the option and what it allows) on bad input."""
    if not Path(state).is_absolute():
        raise ConfigError(
            f"--state must be an absolute path on storage every node sees (the trial folders and the MLflow "
            f"store live there), got {str(state)!r}"
        )
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 or more, got {gpus_per_node}")
    if cpus_per_node is not None and cpus_per_node < 1:
        raise ConfigError(f"--cpus-per-node must be at least 1, got {cpus_per_node}")
    if time is not None and not _TIME.match(time):
        raise ConfigError(
            f"--time must be one of sbatch's formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), got {time!r}"
        )
    if time is not None and 0 < time_limit_s(time) <= SIGNAL_LEAD_S + 60:
        raise ConfigError(
            f"--time must be longer than {(SIGNAL_LEAD_S + 60) // 60} minutes: the job is told to stop "
            f"{SIGNAL_LEAD_S} s before its limit, got {time!r}"
        )
    for flag, v in (("--partition", partition), ("--account", account)):
        if v is not None and not _NAME.match(v):
            raise ConfigError(f"{flag} must be a Slurm name (letters, digits, _ . , + -), got {v!r}")
    return SlurmJob(
        name=name,
        study=str(Path(study).resolve()),
        state=os.path.normpath(state),
        cwd=os.getcwd(),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_node=cpus_per_node,
        partition=partition,
        time=time,
        account=account,
    )


def time_limit_s(time: str) -> int:
    """Seconds of an sbatch `--time` value (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S); 0 means no limit."""
    days, _, rest = time.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    h = m = sec = 0
    if days:
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        (m,) = parts
    elif len(parts) == 2:
        m, sec = parts
    else:
        h, m, sec = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def sbatch_script(job: SlurmJob) -> str:
    """The batch script of `job` (bash): the #SBATCH lines of every resource asked for, Ray brought up on the
    allocation, the study's driver, signal forwarding, and the requeue at a time limit."""
    q = shlex.quote
    ray = Path(job.python).with_name("ray")
    sb = [
        f"--job-name=srdit-{job.name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
    ]
    if job.gpus_per_node:
        sb.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        sb.append(f"--cpus-per-task={job.cpus_per_node}")
    sb += [f"--partition={job.partition}"] if job.partition else []
    sb += [f"--time={job.time}"] if job.time else []
    sb += [f"--account={job.account}"] if job.account else []
    sb += [
        f"--output={job.folder / job.name}-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:TERM@{SIGNAL_LEAD_S}",
        f"--chdir={job.cwd}",
    ]
    head = "\n".join(f"#SBATCH {s}" for s in sb)
    # Ray's client server starts (on port 10001 unless told) only where its package (grpcio) is installed, and
    # `ray start` refuses the port option without it
    client = "--ray-client-server-port=$((base + 3)) " if importlib.util.find_spec("grpc") else ""
    cpus = f"${{SLURM_CPUS_PER_TASK:-${{SLURM_CPUS_ON_NODE:-{job.cpus_per_node or 1}}}}}"
    return f"""#!/bin/bash
# srdit study {job.name}: Ray on the job's nodes, then `srdit study run` on them. Written by `srdit study submit`.
{head}
set -uo pipefail

PY={q(job.python)}
RAY={q(str(ray) if ray.is_file() else "ray")}
STUDY={q(job.study)}
STATE={q(job.state)}
# every Ray process and the driver authenticate with the job's token
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH={q(str(job.token_path))}
export RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1

echo "srdit: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, $(date -u +%FT%TZ)"
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_node=${{nodes[0]}}
# the head's address: what its name resolves to (how Slurm reaches it), else its first non-loopback address
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" bash -c \\
  'for a in $(hostname --ip-address) $(hostname -I); do case $a in *:*|127.*) ;; *) echo $a; exit;; esac; done')
head_ip=${{head_ip:-127.0.0.1}}
# this job's ports: a block of {PORT_BLOCK} from the job id, so two jobs on one node do not clash
base=$(({PORT_BASE} + (SLURM_JOB_ID % {PORT_SLOTS}) * {PORT_BLOCK}))
address=$head_ip:$base
gpus=${{SLURM_GPUS_ON_NODE:-{job.gpus_per_node}}}
cpus={cpus}
common=(--num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="/tmp/srdit-ray-$SLURM_JOB_ID" --block
  --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))
  --dashboard-agent-grpc-port=$((base + 5)) --dashboard-agent-listen-port=$((base + 6))
  --metrics-export-port=$((base + 7)) --runtime-env-agent-port=$((base + 8))
  --min-worker-port=$((base + 10)) --max-worker-port=$((base + {PORT_BLOCK - 1})))

if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  echo "srdit: the Ray token $RAY_AUTH_TOKEN_PATH is missing: submit again with srdit study submit" >&2
  exit 1
fi

steps=()  # this job's Ray steps
driver=""
left=""
stop_ray() {{  # ends this job's Ray steps only (srun forwards the signal; `ray stop` would end other jobs' Ray)
  [ ${{#steps[@]}} -gt 0 ] || return 0
  kill -TERM "${{steps[@]}}" 2>/dev/null
  wait "${{steps[@]}}" 2>/dev/null
}}
time_left() {{  # seconds to the job's time limit (999999: none known)
  local end
  end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null) && end=$(date -d "$end" +%s 2>/dev/null) \\
    && echo $((end - $(date +%s))) || echo 999999
}}
# a signal to this shell (Slurm's --signal before the time limit, scancel --batch, preemption) goes to the driver,
# which stops the trials with a checkpoint at their current step
forward() {{
  left=$(time_left)
  echo "srdit: $1 received ($left s before the time limit); stopping the study with checkpoints"
  if [ -z "$driver" ]; then finish 143; fi
  kill -TERM "$driver" 2>/dev/null
}}
finish() {{  # stop Ray; requeue when the time limit is near (the next start resumes the study); exit $1
  stop_ray
  if [ -n "$left" ] && [ "$left" -le {SIGNAL_LEAD_S + 60} ] && [ "$1" -ne 0 ]; then
    echo "srdit: the time limit is near; requeueing job $SLURM_JOB_ID, which resumes the study"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$1"
}}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
trap 'forward SIGHUP' HUP

srun --nodes=1 --ntasks=1 -w "$head_node" "$RAY" start --head --node-ip-address="$head_ip" --port="$base" \\
  --dashboard-port=$((base + 4)) {client}"${{common[@]}}" &
steps+=($!)

wait_nodes() {{  # until $1 nodes of the cluster are alive (exit 1 after {NODES_WAIT_S} s)
  "$PY" - "$address" "$1" <<'EOF'
import sys, time
import ray
address, want, deadline = sys.argv[1], int(sys.argv[2]), time.time() + {NODES_WAIT_S}
while True:
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        ray.shutdown()
    except Exception:  # the head is not up yet
        alive = 0
    if alive >= want:
        sys.exit(0)
    if time.time() > deadline:
        sys.exit(f"srdit: {{alive}} of {{want}} Ray nodes joined in {NODES_WAIT_S} s")
    time.sleep(3)
EOF
}}
wait_nodes 1 || finish 1
for node in "${{nodes[@]:1}}"; do
  srun --nodes=1 --ntasks=1 -w "$node" "$RAY" start --address="$address" "${{common[@]}}" &
  steps+=($!)
done
wait_nodes {job.nodes} || finish 1
echo "srdit: Ray on {job.nodes} node(s) at $address ($cpus CPUs, $gpus GPUs per node)"

"$PY" -m srdit study run "$STUDY" --state "$STATE" --address "$address" &
driver=$!
wait "$driver"
rc=$?
while kill -0 "$driver" 2>/dev/null; do  # `wait` returns early when a trap runs
  wait "$driver"
  rc=$?
done
finish "$rc"
"""


def write_token(job: SlurmJob) -> Path:
    """The job's Ray token (kept if it exists), readable by the user only."""
    job.folder.mkdir(parents=True, exist_ok=True)
    path = job.token_path
    if not path.is_file() or not path.read_text().strip():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # as `ray get-auth-token --generate`
    os.chmod(path, 0o600)
    return path


def submit(job: SlurmJob) -> str:
    """Write the script and the token into STATE/slurm, submit with `sbatch --parsable`, record the job id in
    STATE/slurm/<study>.job; returns the job id. ConfigError when sbatch is not on PATH or refuses the job (its
    message's last line: an unknown partition or account, a request no node can meet)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(
            "sbatch not found on PATH: submit from a machine of the Slurm cluster (or print the script with --dry-run)"
        )
    write_token(job)
    job.script_path.write_text(sbatch_script(job))
    r = subprocess.run([sbatch, "--parsable", str(job.script_path)], capture_output=True, text=True, cwd=job.cwd)
    if r.returncode != 0:
        why = ((r.stderr or r.stdout).strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise ConfigError(f"sbatch refused the job ({job.script_path}): {why}")
    job_id = r.stdout.strip().split(";")[0]  # --parsable: "ID" or "ID;CLUSTER"
    (job.folder / f"{job.name}.job").write_text(job_id + "\n")
    return job_id


def recorded_job(state: str | Path, name: str) -> str | None:
    """The job id `submit` recorded for study `name` in `state`, or None."""
    path = Path(state) / "slurm" / f"{name}.job"
    return path.read_text().strip() or None if path.is_file() else None


def job_state(job_id: str) -> str:
    """The Slurm state of a job (PENDING, RUNNING, COMPLETED, ...): `squeue` while Slurm holds it, else `sacct`;
    a sentence when neither knows it."""
    for cmd in (
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
    ):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        out = r.stdout.strip().splitlines()
        if r.returncode == 0 and out:
            return out[-1].strip()
    if shutil.which("squeue") is None:
        return "unknown (squeue is not on PATH here)"
    return "no longer known to squeue or sacct (ended)"


__all__ = [
    "NODES_WAIT_S",
    "PORT_BASE",
    "PORT_BLOCK",
    "PORT_SLOTS",
    "SIGNAL_LEAD_S",
    "SlurmJob",
    "job_state",
    "recorded_job",
    "sbatch_script",
    "slurm_job",
    "submit",
    "write_token",
]
