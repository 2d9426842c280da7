"""`srdit study submit --kuberay`: the KubeRay RayJob manifest (srdit.runtime.kuberay) parses, carries every field
a study needs on Kubernetes, and validates against KubeRay's own RayJob CRD schema.

The schema is the CRD's `openAPIV3Schema` of `ray.io/v1` (tests/data/kuberay_rayjob_v1_schema.json.gz: from
github.com/ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayjobs.yaml, the commit named in the file,
descriptions removed). Two checks stand in for the API server without a cluster: jsonschema (types, required keys,
enums, quantity patterns) and a walk that refuses a key the schema does not declare, as `kubectl apply`'s strict
field validation does.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from srdit import stop
from srdit.commands.study import main
from srdit.runtime import kuberay
from srdit.runtime.lock import study_lock
from srdit.runtime.state import StudyState
from srdit.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = "studies/digits_quick.yaml"
SCHEMA = ROOT / "tests" / "data" / "kuberay_rayjob_v1_schema.json.gz"
ARGS = [
    "submit",
    STUDY,
    "--kuberay",
    "--image",
    "registry.example/srdit:1.0",
    "--workers",
    "3",
    "--gpus-per-worker",
    "4",
    "--cpus-per-worker",
    "16",
    "--memory",
    "64Gi",
    "--volume-claim",
    "lab-shared",
    "--mount",
    "/mnt/lab",
    "--token-secret",
    "lab-ray-token",
    "--namespace",
    "vision",
]


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the study path is relative to the folder copied to the volume
    monkeypatch.delenv("SRDIT_STOP_GRACE_S", raising=False)


def submit(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def manifest(capsys, *argv: str) -> dict:
    rc, out, err = submit(capsys, *(argv or ARGS))
    assert rc == 0, err
    return yaml.safe_load(out)


def ray_containers(m: dict) -> list[tuple[dict, dict]]:
    c = m["spec"]["rayClusterSpec"]
    pods = [c["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in c["workerGroupSpecs"]]
    return [(pod, ctr) for pod in pods for ctr in pod["containers"]]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_manifest_carries_every_field(capsys):
    m = manifest(capsys)
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayJob")
    assert m["metadata"]["name"] == "srdit-digits-quick" and m["metadata"]["namespace"] == "vision"
    spec = m["spec"]
    # The entrypoint: the study run from the volume, its state on the volume.
    assert shlex.split(spec["entrypoint"]) == [
        "cd",
        "/mnt/lab",
        "&&",
        "srdit",
        "study",
        "run",
        "/mnt/lab/studies/digits_quick.yaml",
        "--state",
        "/mnt/lab/state",
    ]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1  # an evicted job runs again on a new cluster and resumes
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver's pod runs no trial
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert all(isinstance(v, str) for g in (head, group) for v in g["rayStartParams"].values())
    (worker,) = group["template"]["spec"]["containers"]
    want = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert worker["resources"] == {"requests": want, "limits": want}
    assert group["rayStartParams"]["num-gpus"] == "4"
    for pod, ctr in ray_containers(m):
        assert ctr["image"] == "registry.example/srdit:1.0"
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        mounts = {v["name"]: v["mountPath"] for v in ctr["volumeMounts"]}
        assert [mounts[name] for name in claims] == ["/mnt/lab"] and list(claims.values()) == ["lab-shared"]
        env = env_of(ctr)
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "lab-ray-token", "key": "auth_token"}}
        assert float(env["SRDIT_STOP_GRACE_S"]) == stop.DEFAULT_GRACE_S
        assert pod["terminationGracePeriodSeconds"] > stop.DEFAULT_GRACE_S
    # The submitter (`ray job submit`) talks to the token-protected dashboard: it has the token too.
    (sub,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert env_of(sub)["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "lab-ray-token", "key": "auth_token"}}
    assert sub["image"] == "registry.example/srdit:1.0"


def test_no_gpus_asks_for_none(capsys):
    m = manifest(capsys, "submit", STUDY, "--kuberay", "--image", "srdit:1", "--gpus-per-worker", "0")
    (worker,) = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]


def test_the_grace_follows_srdit_stop_grace(capsys, monkeypatch):
    monkeypatch.setenv("SRDIT_STOP_GRACE_S", "90")
    m = manifest(capsys)
    for pod, ctr in ray_containers(m):
        assert env_of(ctr)["SRDIT_STOP_GRACE_S"] == "90"
        assert pod["terminationGracePeriodSeconds"] == 90 + kuberay.GRACE_MARGIN_S
    head = m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert env_of(head)["RAY_JOB_STOP_WAIT_TIME_S"] == "90"  # `ray job stop` waits as long before SIGKILL


@pytest.mark.skipif(shutil.which("flock") is None, reason="the hook tests the driver's lock with flock(1) (util-linux)")
def test_the_heads_prestop_hook_stops_a_running_study(capsys, monkeypatch, tmp_path):
    """Run the head's hook as the pod would (with a zero grace, so its wait is 0 s): with no driver running it does
    nothing (the cluster of a finished study goes at once); while a driver holds the study's lock it writes the
    stop file that the study's trial workers watch, at the place srdit's runtime puts it."""
    monkeypatch.setenv("SRDIT_STOP_GRACE_S", "0")
    m = manifest(capsys, "submit", STUDY, "--kuberay", "--image", "srdit:1", "--mount", str(tmp_path))
    head = m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    cmd = head["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[:2] == ["/bin/sh", "-c"]
    spec = load_study(STUDY)
    state = tmp_path / "state"
    stop_file = StudyState.of(spec, state).stop_file
    subprocess.run(cmd, check=True, timeout=30)
    assert not stop_file.exists()  # no driver ever ran
    with study_lock(state, spec.name):
        pass
    subprocess.run(cmd, check=True, timeout=30)
    assert not stop_file.exists()  # a driver ran and ended
    with study_lock(state, spec.name):
        subprocess.run(cmd, check=True, timeout=30)
    assert stop_file.read_text().strip() == "SIGTERM"
    stop.reset()
    try:
        stop.watch(stop_file)
        assert stop.requested() == "SIGTERM"
    finally:
        stop.reset()


def test_print_and_out_write_the_same_manifest(capsys, tmp_path):
    rc, printed, _ = submit(capsys, *ARGS)
    absolute = [str(ROOT / STUDY) if a == STUDY else a for a in ARGS]  # a path under this folder: the same place
    assert submit(capsys, *absolute)[1] == printed
    out = tmp_path / "job.yaml"
    rc2, said, _ = submit(capsys, *ARGS, "--out", str(out))
    assert rc == rc2 == 0 and out.read_text() == printed
    assert said.strip() == f"wrote the RayJob srdit-digits-quick to {out}"
    assert "&id" not in printed and "*id" not in printed  # no YAML anchors: each container stands alone


# ---------------------------------------------------------------------------------------------------------------
# KubeRay's CRD
# ---------------------------------------------------------------------------------------------------------------


def crd_schema() -> dict:
    with gzip.open(SCHEMA) as f:
        return json.load(f)["openAPIV3Schema"]


def unknown_fields(value, schema: dict, where: str = "") -> list[str]:
    """Every key of `value` that `schema` does not declare (what the API server's strict field validation
    refuses); maps (`additionalProperties`) and int-or-string values take any key."""
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                out += unknown_fields(v, props[k], f"{where}.{k}")
            elif isinstance(extra, dict):
                out += unknown_fields(v, extra, f"{where}.{k}")
            elif props is not None or extra is False:
                out.append(f"{where}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += unknown_fields(v, schema["items"], f"{where}[{i}]")
    return out


def schema_errors(m: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    v = jsonschema.Draft7Validator(crd_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(m)]


def test_the_manifest_validates_against_kuberays_rayjob_crd(capsys):
    schema = crd_schema()
    spec = schema["properties"]["spec"]["properties"]
    for field in (
        "entrypoint",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "backoffLimit",
        "rayClusterSpec",
        "submitterPodTemplate",
    ):
        assert field in spec, field
    for m in (
        manifest(capsys),
        manifest(capsys, "submit", STUDY, "--kuberay", "--image", "s:1", "--gpus-per-worker", "0"),
    ):
        assert schema_errors(m) == []
        assert unknown_fields(m, schema) == []
        assert set(spec["rayClusterSpec"]["required"]) <= set(m["spec"]["rayClusterSpec"])


def test_the_crd_checks_catch_a_wrong_manifest(capsys):
    """The two checks are not vacuous: a misspelled field and a wrong type are found."""
    m = manifest(capsys)
    m["spec"]["shutdownAfterJobFinish"] = m["spec"].pop("shutdownAfterJobFinishes")
    assert unknown_fields(m, crd_schema()) == [".spec.shutdownAfterJobFinish"]
    m = manifest(capsys)
    m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "3"
    m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"
    ] = "lots"
    errors = schema_errors(m)
    assert len(errors) == 2 and any("replicas" in e for e in errors) and any("memory" in e for e in errors)
    m = manifest(capsys)
    del m["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in schema_errors(m))


def test_job_names_are_kuberay_names():
    long = kuberay.job_name("An_Extremely_Long_Study_Name_That_Goes_On_And_On_Forever_42")
    assert len(long) <= kuberay.MAX_NAME == 47
    for name in (long, kuberay.job_name("digits_quick"), kuberay.job_name("x--")):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ---------------------------------------------------------------------------------------------------------------


def test_apply_without_kubectl_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no kubectl
    rc, out, err = submit(capsys, *ARGS, "--apply")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "kubectl" in err and "--out" in err


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--workers", "0"], "--workers 0"),
        (["--memory", "lots"], "--memory 'lots'"),
        (["--memory", "0Gi"], "--memory '0Gi'"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker 0"),
        (["--gpus-per-worker", "-1"], "--gpus-per-worker -1"),
        (["--token-secret", "Bad_Name"], "--token-secret 'Bad_Name'"),
        (["--mount", "shared"], "--mount 'shared'"),
        (["--state", "../elsewhere"], "--state ../elsewhere"),
        (["--state", "/tmp/outside-the-volume"], "--state /tmp/outside-the-volume"),
        (["--workers", "two"], "--workers: invalid int value"),
    ],
)
def test_bad_values_are_one_line(capsys, extra, says):
    rc, out, err = submit(capsys, *ARGS, *extra)
    assert rc == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("srdit study submit: error: ") and says in err, err


def test_no_image_no_mode_and_slurm_are_one_line(capsys):
    for argv, says in (
        (["submit", STUDY, "--kuberay"], "--image"),
        (["submit", STUDY, "--image", "s:1"], "--slurm --kuberay"),
        (["submit", STUDY, "--kuberay", "--slurm", "--image", "s:1"], "not allowed with"),
        (["submit", STUDY, "--slurm"], "--state"),  # Slurm's: a relative state folder
        (["submit", STUDY, "--slurm", "--image", "s:1"], "--image is an option of --kuberay"),
        (["submit", STUDY, "--kuberay", "--image", "s:1", "--nodes", "2"], "--nodes is an option of --slurm"),
        (["submit", "studies/no_such_study.yaml", "--kuberay", "--image", "s:1"], "no_such_study.yaml"),
    ):
        rc, out, err = submit(capsys, *argv)
        assert rc == 2 and out == "" and err.count("\n") == 1 and says in err, (argv, err)


def test_a_trial_larger_than_a_worker_pod_is_refused(capsys, tmp_path):
    study = ROOT / "studies" / "digits_quick.yaml"
    big = tmp_path / "big.yaml"
    big.write_text(study.read_text().replace("resources: {cpus: 1, gpus: 0}", "resources: {cpus: 2, gpus: 2}"))
    rc, out, err = submit(
        capsys, "submit", str(big), "--kuberay", "--image", "s:1", "--gpus-per-worker", "1", "--mount", str(tmp_path)
    )
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--gpus-per-worker" in err and "GPU" in err, err
    rc, out, _ = submit(
        capsys, "submit", str(big), "--kuberay", "--image", "s:1", "--gpus-per-worker", "2", "--mount", str(tmp_path)
    )
    assert rc == 0 and yaml.safe_load(out)["spec"]["entrypoint"].endswith(
        f"{tmp_path}/big.yaml --state {tmp_path}/state"
    )
