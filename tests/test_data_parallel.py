"""Data-parallel training: two gloo workers follow the single-process run with the same global batch.

Every rank draws the global batch's randomness and keeps its slice (srdit.parallel), so the only difference from
one process is the order of floating-point sums in the gradient all-reduce: losses agree to float32 round-off.
"""

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from srdit.config import RunConfig, apply_diff
from srdit.parallel import DataParallel, rendezvous_store
from srdit.runtime.data_parallel import PLACEMENT_GROUPS
from srdit.techniques import with_techniques
from srdit.train import JsonlReporter, load_checkpoint, train

# Every technique with randomness or cross-sample coupling: SPRINT routing and path drop, REG noise, CFM negatives.
TECHS = ["sprint", "repa", "reg", "cfm", "rope", "qk_norm", "rmsnorm", "value_residual"]
DIFF = {
    "train.steps": 12,
    "train.log_every": 1,
    "train.ckpt_every": 6,
    "train.threads": 1,
    "train.batch_size": 16,
    "eval.n_samples": 40,
    "eval.batch_size": 40,
    "sample.steps": 3,
    "model.sprint.path_drop_prob": 0.3,
}
TOLERANCE = 2e-5  # relative, on every step's loss; float32 sums in another order


def _cfg() -> RunConfig:
    return apply_diff(with_techniques(RunConfig(), TECHS), DIFF)


TIMEOUT = datetime.timedelta(minutes=5)


def _worker(rank: int, world: int, port: int, out: str, stop_after: int | None, diff: dict | None = None) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=TIMEOUT)  # the parent's (`_spawn`)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        cfg = apply_diff(_cfg(), diff or {})
        if stop_after is not None:  # an interrupted run: the first `stop_after` steps only, same config otherwise
            cfg = apply_diff(cfg, {"train.steps": stop_after})
        train(cfg, out, JsonlReporter(Path(out) / "metrics.jsonl"), progress=False)
    finally:
        dist.destroy_process_group()


def _losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _spawn(out: Path, stop_after: int | None = None, diff: dict | None = None) -> None:
    store = rendezvous_store("127.0.0.1", None, TIMEOUT)  # held by this process while the workers run
    mp.spawn(_worker, args=(2, store.port, str(out), stop_after, diff), nprocs=2, join=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    train(_cfg(), out, JsonlReporter(out / "metrics.jsonl"), progress=False)
    return out


def test_two_gloo_workers_follow_the_single_process_run(tmp_path, single):
    _spawn(tmp_path)
    one, two = _losses(single), _losses(tmp_path)
    assert sorted(two) == list(range(1, 13))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=TOLERANCE), step
    a, b = load_checkpoint(single / "checkpoints/last.pt"), load_checkpoint(tmp_path / "checkpoints/last.pt")
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "result.json").is_file() and (tmp_path / "samples.png").is_file()  # rank 0's outputs


def test_resume_on_another_world_size(tmp_path, single):
    """Two workers stop at step 6 (a checkpoint); one process resumes: the trajectory is unchanged."""
    _spawn(tmp_path, stop_after=6)
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["step"] == 6
    # The interrupted run had steps=6 in its config; make it the full run's so that resume accepts it.
    ckpt["config"] = load_checkpoint(single / "checkpoints/last.pt")["config"]
    torch.save(ckpt, tmp_path / "checkpoints/last.pt")
    train(_cfg(), tmp_path, JsonlReporter(tmp_path / "metrics.jsonl"), progress=False)
    one, resumed = _losses(single), _losses(tmp_path)
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(one[step], rel=TOLERANCE), step


def test_sprint_without_dropping_trains_data_parallel(tmp_path):
    """drop_ratio 0 routes nothing: [MASK] stays in the graph so that DDP still sees a gradient for it."""
    _spawn(tmp_path, stop_after=3, diff={"model.sprint.drop_ratio": 0.0, "model.sprint.path_drop_prob": 0.0})
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "finished"


def test_each_rank_reads_its_half_of_the_global_batch():
    from srdit.train import DigitsBatches

    cfg = _cfg()
    whole = DigitsBatches(cfg, torch.device("cpu")).next()[0]
    halves = [DigitsBatches(cfg, torch.device("cpu"), DataParallel(r, 2)).next()[0] for r in range(2)]
    assert [len(h) for h in halves] == [8, 8] and torch.equal(torch.cat(halves), whole)


def test_slicing_and_rolling_match_the_global_batch():
    x = torch.arange(12.0).view(6, 2)
    assert DataParallel().part(x) is x and torch.equal(DataParallel().rolled(x), x.roll(1, 0))
    parts = [DataParallel(r, 3).part(x) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ValueError, match="train.batch_size 6 is not divisible by the 4 data-parallel workers"):
        DataParallel(1, 4).local_batch(6)


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        lengths = [4, 0, 2]  # unequal shares, one of them empty
        x = torch.arange(lengths[rank] * 6, dtype=torch.float64).view(-1, 2, 3) + 100 * rank
        got = DataParallel.current().gather(x)
        if rank == 0:
            torch.save(got, out)
        else:
            assert got is None
    finally:
        dist.destroy_process_group()


def test_gather_brings_every_ranks_rows_to_rank_0(tmp_path):
    """Three gloo ranks with 4, 0 and 2 rows of [2, 3] float64: rank 0 gets each rank's rows, exactly, in rank
    order; one process gets its own tensor."""
    store = rendezvous_store("127.0.0.1", None, TIMEOUT)
    mp.spawn(_gather_worker, args=(3, store.port, str(tmp_path / "gathered.pt")), nprocs=3, join=True)
    got = torch.load(tmp_path / "gathered.pt", weights_only=True)
    want = [torch.arange(n * 6, dtype=torch.float64).view(-1, 2, 3) + 100 * r for r, n in enumerate([4, 0, 2])]
    assert len(got) == 3 and all(g.dtype == torch.float64 and torch.equal(g, w) for g, w in zip(got, want))
    x = torch.ones(2, 5)
    assert len(DataParallel().gather(x)) == 1 and torch.equal(DataParallel().gather(x)[0], x)


@pytest.mark.slow
def test_study_trial_on_two_workers_is_a_ray_train_run(tmp_path):
    """A study with resources.workers: 2 runs each trial as a Ray Train TorchTrainer (gloo) inside its Tune trial;
    rank 0's curve lands in the MLflow child run and equals a single-process run of the trial's own config."""
    import ray
    import yaml
    from mlflow import MlflowClient

    from srdit.config import from_dict, read_yaml
    from srdit.runtime.driver import run_study
    from srdit.runtime.ray_parts import shutdown_ray
    from srdit.study.spec import load_study

    techs = [t for t in TECHS if t != "cfm"]
    base = {
        "techniques": techs,
        "train": {k.split(".", 1)[1]: v for k, v in DIFF.items() if k.startswith("train.")},
        "eval": {"n_samples": 40, "batch_size": 40},
        "sample": {"steps": 3},
    }
    study = {"name": "dp", "base": base, "techniques": ["cfm"], "seeds": [0], "resources": {"cpus": 0.5, "workers": 2}}
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        res = run_study(load_study(tmp_path / "dp.yaml"), tmp_path / "state")
        groups = {p.parent.name: p.read_text().split() for p in (tmp_path / "state").rglob(PLACEMENT_GROUPS)}
        table = ray.util.placement_group_table()
        actors = [a["ActorClassName"] for a in ray._private.state.actors().values()]
    finally:
        shutdown_ray()
    assert res.complete and res.statuses == {"finished": 2}, res
    # rank 0 recorded its worker group's placement group, which Ray Train removed when the run ended
    assert len(groups) == 2 and all(len(ids) == 1 for ids in groups.values()), groups
    assert all(table[ids[0]]["state"] == "REMOVED" for ids in groups.values()), table
    # Ray Train's detached cleaner (it needs the dashboard's state API) is not started: one process less per trial
    assert "PlacementGroupCleaner" not in actors and "TrainController" in actors, actors

    client = MlflowClient(res.uri)
    for run in client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'"):
        assert run.data.tags["status"] == "finished" and run.data.metrics["fd"] > 0
        folder = Path(run.data.tags["trial_dir"])
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
        assert sorted(history) == list(range(1, 13))
        ref = tmp_path / f"single-{folder.name}"
        train(
            from_dict(RunConfig, read_yaml(folder / "config.yaml")),
            ref,
            JsonlReporter(ref / "metrics.jsonl"),
            progress=False,
        )
        for step, loss in _losses(ref).items():
            assert history[step] == pytest.approx(loss, rel=TOLERANCE), (folder.name, step)


def test_two_groups_on_one_node_rendezvous_on_ports_they_hold():
    """The rendezvous of a worker group never uses a port that was free a moment ago (Ray Train's rule: bind port
    0, read it, close, start the store later, during which another group on the node may be handed the same port).
    Two groups set up at once on one node: each rank 0's store holds its port (nothing else can bind it while the
    group lives), the ports differ, and each group's other rank joins its own group's store."""
    import datetime
    import threading

    from srdit.runtime.tracking import port_free

    timeout = datetime.timedelta(seconds=30)
    stores, joined = {}, {}

    def group(name: str) -> None:
        store = rendezvous_store("127.0.0.1", 2, timeout)
        stores[name] = store
        other = dist.TCPStore(store.host, store.port, 2, False, timeout=timeout)  # rank 1 of this group
        other.set("group", name)
        joined[name] = store.get("group").decode()

    threads = [threading.Thread(target=group, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ports = {n: s.port for n, s in stores.items()}
    assert joined == {"a": "a", "b": "b"}, joined
    assert ports["a"] != ports["b"], ports
    assert not any(port_free("127.0.0.1", p) for p in ports.values()), ports  # held while the groups live


def test_a_free_port_by_ray_trains_rule_is_free_again_at_once():
    """Why the rule above is needed: the port Ray Train's TorchTrainer hands a group's rendezvous is free (any
    process may bind it) until torch's store starts on it."""
    from ray._common.network_utils import find_free_port

    from srdit.runtime.tracking import port_free

    assert port_free("", find_free_port())
