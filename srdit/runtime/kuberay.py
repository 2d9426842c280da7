"""A study on Kubernetes: the KubeRay `RayJob` manifest that brings up a Ray cluster, runs `srdit study run` on it
and deletes the cluster when the study ends (`srdit study submit STUDY.yaml --kuberay`).

The RayJob (apiVersion `ray.io/v1`; KubeRay's RayJob quickstart and API reference,
https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/rayjob-quick-start.html and
https://ray-project.github.io/kuberay/reference/api/; field names checked against the CRD
`ray-operator/config/crd/bases/ray.io_rayjobs.yaml` of github.com/ray-project/kuberay):

- `spec.entrypoint`: `cd MOUNT && srdit study run MOUNT/STUDY --state MOUNT/state`, which KubeRay's submitter
  runs with `ray job submit` on the head (Ray sets `RAY_ADDRESS` for it, so the driver joins this cluster);
  relative input paths of the study resolve in the shared volume, which every pod mounts at the same path.
- `spec.rayClusterSpec`: a head group (`num-cpus: 0`: it runs the driver, no trial) and one worker group of
  `workers` pods, each asking for `cpus`, `memory` and `nvidia.com/gpu: gpus` (requests = limits), all with the
  srdit image, the shared PersistentVolumeClaim and a memory-backed /dev/shm (PyTorch's data loader, Ray's object
  store).
- Ray's token authentication: `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` from a Kubernetes Secret (key
  `auth_token`, KubeRay's own key) in every Ray container and in the submitter pod (`ray job submit` talks to the
  token-protected dashboard). Set on the containers, not through `rayClusterSpec.authOptions`, so that it works with
  every KubeRay of the `ray.io/v1` API (authOptions needs KubeRay 1.5.1).
- Stopping (`srdit.stop`): every pod's `terminationGracePeriodSeconds` is srdit's stop grace (`SRDIT_STOP_GRACE_S`,
  set in the containers too) plus `GRACE_MARGIN_S`. While the study's driver runs, the head's preStop hook writes
  the study's stop file, so an evicted or deleted head makes every running trial write a checkpoint at its current
  step; a `ray job stop` (deleting or suspending the RayJob) gives the driver the same grace
  (`RAY_JOB_STOP_WAIT_TIME_S`). An evicted worker pod loses its trials, which Ray Tune retries on the others from
  their last checkpoint.
- `shutdownAfterJobFinishes: true` and `ttlSecondsAfterFinished`: the cluster goes when the study ends.
  `backoffLimit`: a failed job (the head evicted, a node lost) is retried on a new cluster, and `srdit study run`
  resumes from the state on the volume (finished trials are kept, interrupted ones resume from their checkpoint).
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path, PurePosixPath

from srdit import stop
from srdit.config import ConfigError
from srdit.runtime.lock import lock_path

API_VERSION = "ray.io/v1"
KIND = "RayJob"
TOKEN_KEY = "auth_token"
"The key of the Ray token in its Secret (KubeRay's `RAY_AUTH_TOKEN_SECRET_KEY`)."
GRACE_MARGIN_S = 30
"Seconds of the pod's grace period beyond srdit's stop grace: the preStop hook, Ray's own shutdown."
TTL_AFTER_FINISHED_S = 300
"Seconds the finished cluster stays (to read its logs) before KubeRay deletes it."
BACKOFF_LIMIT = 3
"Retries of a failed job, each on a new cluster; each resumes the study from its state."
HEAD_CPUS = "2"
HEAD_MEMORY = "8Gi"
"The head pod runs the driver only (MLflow, Ray Tune's controller): a small fixed request."
VOLUME = "srdit-shared"
MAX_NAME = 47
"KubeRay's longest RayJob name (`MaxRayJobNameLength`: its cluster's name, 53, less a suffix)."
_QUANTITY = re.compile(r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[kMGTPE])?$")
"A Kubernetes memory quantity (bytes, optionally with a decimal or binary suffix: 512Mi, 32Gi, 64G)."


def job_name(study: str) -> str:
    """A RayJob name for study `study`: `srdit-<study>` as a DNS-1035 label (lowercase letters, digits, '-';
    starts with a letter, ends with a letter or digit) of at most `MAX_NAME` characters."""
    s = re.sub(r"[^a-z0-9-]+", "-", f"srdit-{study}".lower()).strip("-")
    return s[:MAX_NAME].rstrip("-")


def pod_path(path: str | Path, mount: str, cwd: Path, what: str) -> str:
    """Where `path` (relative to `cwd`, or absolute under `cwd` or under `mount`) is inside the pods, whose shared
    volume holds a copy of `cwd` at `mount`. ConfigError (one line, naming `what`) for a path outside both."""
    m = PurePosixPath(mount)
    p = Path(path)
    if p.is_absolute():
        if PurePosixPath(p.as_posix()).is_relative_to(m):
            return p.as_posix()
        try:
            p = p.resolve().relative_to(cwd.resolve())
        except ValueError:
            raise ConfigError(
                f"{what} {path}: not under this folder ({cwd}) nor under --mount {mount}; give its path relative "
                f"to the folder you copy to the volume"
            ) from None
    rel = PurePosixPath(p.as_posix())
    if ".." in rel.parts:
        raise ConfigError(f"{what} {path}: a path inside the folder you copy to the volume has no '..'")
    return (m / rel).as_posix()


def check_memory(memory: str) -> str:
    """`memory` if it is a positive Kubernetes quantity (e.g. 32Gi, 512Mi, 64G); else ConfigError."""
    m = _QUANTITY.match(memory or "")
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(
            f"--memory {memory!r}: not a Kubernetes memory quantity; give a positive number with an optional "
            f"suffix Ki, Mi, Gi, Ti (binary) or k, M, G, T (decimal), e.g. 32Gi"
        )
    return memory


def rayjob_manifest(
    *,
    study: str,
    study_path: str,
    state: str,
    image: str,
    workers: int,
    gpus_per_worker: int,
    cpus_per_worker: int,
    memory: str,
    volume_claim: str,
    mount: str,
    token_secret: str,
    namespace: str | None = None,
    ray_version: str | None = None,
    grace_s: float | None = None,
) -> dict:
    """The RayJob of study `study` as a dict (dump it with `yaml.safe_dump`): `study_path` and `state` are paths
    inside the pods (under `mount`, where the PersistentVolumeClaim `volume_claim` is mounted on every pod);
    `workers` worker pods of `cpus_per_worker` CPUs, `memory` (a Kubernetes quantity) and `gpus_per_worker`
    `nvidia.com/gpu`; the Ray token from Secret `token_secret` (key `auth_token`); `grace_s`: srdit's stop grace
    in seconds (default `srdit.stop.grace_s()`); `ray_version`: the image's Ray (KubeRay's `rayVersion`).
    ConfigError (one line) for a bad value."""
    if not image:
        raise ConfigError("--image: give the container image with srdit installed (e.g. registry/srdit:TAG)")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: a RayJob needs at least 1 worker pod")
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker}: must be 0 or more")
    if cpus_per_worker < 1:
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker}: must be 1 or more")
    check_memory(memory)
    for flag, v in (("--volume-claim", volume_claim), ("--token-secret", token_secret)):
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", v or ""):
            raise ConfigError(
                f"{flag} {v!r}: not a Kubernetes object name (lowercase letters, digits, '-', '.'; starting and "
                f"ending with a letter or digit)"
            )
    if not PurePosixPath(mount).is_absolute():
        raise ConfigError(f"--mount {mount!r}: must be an absolute path (where the volume is mounted in the pods)")
    grace = stop.grace_s() if grace_s is None else grace_s
    pod_grace = math.ceil(grace) + GRACE_MARGIN_S
    name = job_name(study)
    # StudyState.stop_file's place (srdit.runtime.state imports MLflow; tests/test_kuberay.py holds the two equal)
    stop_dir = (PurePosixPath(state) / "trials" / study).as_posix()
    lock = lock_path(state, study).as_posix()

    # Each use gets its own copy (functions, not shared lists): the YAML then holds no anchors / aliases.
    def token_env() -> list[dict]:
        return [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret, "key": TOKEN_KEY}}},
        ]

    def env() -> list[dict]:
        return [*token_env(), {"name": "SRDIT_STOP_GRACE_S", "value": f"{grace:g}"}]

    def mounts() -> list[dict]:
        return [{"name": VOLUME, "mountPath": mount}, {"name": "dshm", "mountPath": "/dev/shm"}]

    def volumes() -> list[dict]:
        return [
            {"name": VOLUME, "persistentVolumeClaim": {"claimName": volume_claim}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ]

    def resources(cpu: str, mem: str, gpus: int = 0) -> dict:  # requests = limits: a Guaranteed pod
        r = {"cpu": cpu, "memory": mem, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        return {"requests": r, "limits": dict(r)}

    # The head's preStop: while a driver holds the study's lock (srdit.runtime.lock: a flock, which flock(1)
    # tests), the study's stop file, then a wait while the trials write their checkpoints. The cluster of a
    # finished study goes at once.
    pre_stop = (
        f"if [ -e {shlex.quote(lock)} ] && ! flock -n -s {shlex.quote(lock)} true 2>/dev/null; then "
        f"mkdir -p {shlex.quote(stop_dir)} && echo SIGTERM > {shlex.quote(stop_dir + '/STOP')}; "
        f"sleep {math.ceil(grace)}; fi"
    )
    head = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "spec": {
                "terminationGracePeriodSeconds": pod_grace,
                "containers": [
                    {
                        "name": "ray-head",
                        "image": image,
                        "env": [*env(), {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(math.ceil(grace))}],
                        "resources": resources(HEAD_CPUS, HEAD_MEMORY),
                        "volumeMounts": mounts(),
                        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", pre_stop]}}},
                        "ports": [
                            {"containerPort": 6379, "name": "gcs"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                        ],
                    }
                ],
                "volumes": volumes(),
            }
        },
    }
    worker = {
        "groupName": "workers",
        "replicas": workers,
        "minReplicas": workers,
        "maxReplicas": workers,
        "rayStartParams": {"num-cpus": str(cpus_per_worker), "num-gpus": str(gpus_per_worker)},
        "template": {
            "spec": {
                "terminationGracePeriodSeconds": pod_grace,
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": image,
                        "env": env(),
                        "resources": resources(str(cpus_per_worker), memory, gpus_per_worker),
                        "volumeMounts": mounts(),
                    }
                ],
                "volumes": volumes(),
            }
        },
    }
    cluster: dict = {"headGroupSpec": head, "workerGroupSpecs": [worker]}
    if ray_version:
        cluster = {"rayVersion": ray_version, **cluster}
    metadata: dict = {"name": name, "labels": {"app.kubernetes.io/name": "srdit"}}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "entrypoint": (
                f"cd {shlex.quote(mount)} && srdit study run {shlex.quote(study_path)} --state {shlex.quote(state)}"
            ),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "backoffLimit": BACKOFF_LIMIT,
            "rayClusterSpec": cluster,
            "submitterPodTemplate": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "ray-job-submitter",
                            "image": image,
                            "env": token_env(),
                            "resources": resources("500m", "512Mi"),
                        }
                    ],
                }
            },
        },
    }


def to_yaml(manifest: dict) -> str:
    """The manifest as YAML, keys in the order built (what `kubectl apply -f` reads)."""
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


__all__ = ["API_VERSION", "KIND", "check_memory", "job_name", "pod_path", "rayjob_manifest", "to_yaml"]
