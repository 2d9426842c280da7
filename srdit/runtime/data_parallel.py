"""A trial with several data-parallel workers: a Ray Train run inside the Tune trial (Ray Train V2).

The Tune trial is only the driver; the workers run `srdit.train.train` under torch.distributed (NCCL on GPUs, gloo
on CPUs), whose process group srdit sets up (`_init_process_group`: a rendezvous port that no other group can be
given). Rank 0 logs to the trial's MLflow child run and writes the checkpoint in the trial folder.

Failures are classified here, not by Ray Train (its FailureConfig allows no retry): an exception raised by the
training code on any rank (a bug, an out-of-memory error) is written to the trial folder by that rank and is the
trial's outcome at once (crashed / oom, crash cause "code"), since every attempt would hit it again; a group that
fails without such a record (a lost worker or node, or a rank whose exception is the infrastructure's, e.g. the
collective error of a rank whose peer died: `srdit.runtime.worker.crash_cause`) is started again, up to
`max_failures` times (each start an attempt of the trial, `srdit.runtime.attempts`), and the trainer resumes
from the checkpoint; beyond that the trial crashed for the
infrastructure. The run name is the trial key. The trial folder must be on storage that every node sees (as for any
multi-node study).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from srdit.cache import write_atomic

if TYPE_CHECKING:
    from srdit.config import RunConfig
    from srdit.runtime.worker import TrialContext


OUTCOME = "trial_outcome.json"
WORKER_ERROR = "trial_worker_error.json"
"Written by the first rank whose training code raised: {status, reason, rank}."
PLACEMENT_GROUPS = "trial_placement_groups.txt"
"""The placement groups (hex ids) of the trial's worker groups, one per line, written by rank 0 when its group
starts: what `remove_left_placement_groups` frees before the next attempt."""


def remove_left_placement_groups(out_dir: str | Path) -> list[str]:
    """Remove the placement groups that earlier attempts of this trial left behind; returns their ids.

    A worker group's placement group outlives its Ray Train controller when the Tune trial that owned the
    controller dies with its node: Ray frees a placement group only when its creator actor *and* the job (the
    study's driver) have ended, and Ray Train's own cleaner needs the dashboard's state API, which srdit's Rays
    run without. The left group keeps its bundles (re-placed on the nodes that remain), so the retried trial would
    wait for resources forever. Removed: the groups rank 0 recorded in the trial folder (only one attempt of a
    trial runs at a time: Tune, and the study lock across drivers, so every group recorded before this attempt
    starts is an earlier attempt's), and every group of this job whose creator actor has died (`orphaned`: a
    controller lost before its rank 0 could record the group, e.g. while its workers were still starting)."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    record = Path(out_dir) / PLACEMENT_GROUPS
    recorded = record.read_text().split() if record.is_file() else []
    if not ray.is_initialized():
        record.unlink(missing_ok=True)
        return []
    table = placement_group_table()
    removed = []
    for pg_id in dict.fromkeys([*recorded, *orphaned()]):
        if table.get(pg_id, {}).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(pg_id)
    record.unlink(missing_ok=True)
    return removed


def orphaned() -> list[str]:
    """The placement groups (hex ids) of this Ray job whose creator was an actor that has died: nothing will use
    them again, and Ray frees them only when the job ends. Groups made by the driver itself (Tune's trials) have no
    creator actor and are never among them."""
    import ray
    from ray._private.state import state
    from ray._raylet import ActorID
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    nil = ActorID.nil().binary()
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (
            pg.creator_actor_id != nil
            and pg.creator_actor_dead
            and not pg.is_detached
            and pg.creator_job_id.hex() == job
            and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
        ):
            out.append(pg.placement_group_id.hex())
    return out


def _own_cleanup(trainer_cls: type) -> type:
    """`trainer_cls` without Ray Train's PlacementGroupCleaner: a detached actor (one more process) per run that asks
    the dashboard's state API every second whether the controller lives. srdit's Rays run without the dashboard:
    when a controller dies it can never tell, warns every second and lives until Ray shuts down.
    `remove_left_placement_groups` does its job from the trial folder instead."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def _node_devices():
    """Ray Train's backend setting for srdit's groups: the workers of one node see all of that node's GPUs (as
    under TorchTrainer, so that NCCL finds its peers on the node); the process group is srdit's
    (`_init_process_group`)."""
    from ray.train.backend import Backend, BackendConfig

    class NodeDevices(Backend):
        share_cuda_visible_devices = True

    class Config(BackendConfig):
        @property
        def backend_cls(self):
            return NodeDevices

    return Config()


def _record_placement_group(out_dir: str | Path) -> None:
    import ray.util

    pg = ray.util.get_current_placement_group()
    if pg is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / PLACEMENT_GROUPS, "a", encoding="utf-8") as f:
            f.write(pg.id.hex() + "\n")


def _worker_loop(loop: dict) -> None:
    """One worker: pick its device and train; rank 0 leaves the outcome in the trial folder for the driver (Ray
    Train V2 keeps reported metrics only with a checkpoint, and ours live in the trial folder)."""
    import ray.train
    import ray.train.torch
    import torch

    from srdit import stop
    from srdit.analysis.results import INFRASTRUCTURE
    from srdit.runtime.shipping import refusal
    from srdit.runtime.state import STOP_FILE
    from srdit.runtime.tracking import RUN_JOURNAL, ChildRun, TrialReporter
    from srdit.train import TrainResult, train

    refused = refusal(loop.get("plugins", ()), loop.get("code", ""))
    if refused:  # this worker's node has other srdit or plugin code than the driver keyed: the trial is refused
        rank = ray.train.get_context().get_world_rank()
        text = json.dumps({"status": "crashed", "reason": refused, "rank": rank, "cause": INFRASTRUCTURE})
        path = Path(loop["out_dir"]) / WORKER_ERROR
        if not path.exists():
            write_atomic(path, lambda f: f.write(text.encode()))
        raise RuntimeError(refused)
    torch.set_num_threads(loop["threads"])
    if loop["gpus"]:
        torch.cuda.set_device(ray.train.torch.get_device())
    _init_process_group(loop)
    cfg = loop["config"]
    main = ray.train.get_context().get_world_rank() == 0
    if main:
        _record_placement_group(loop["out_dir"])
    journal = Path(loop["out_dir"]) / RUN_JOURNAL
    reporter = TrialReporter(ChildRun(loop["uri"], loop["run_id"], True, journal), to_tune=False) if main else None
    stop.reset()  # each rank watches the study's stop file; the ranks decide together (`srdit.train`)
    stop.watch(Path(loop["out_dir"]).parent / STOP_FILE)
    try:
        res = train(cfg, loop["out_dir"], reporter, resume=True, progress=False, snapshots=True)
    except stop.Interrupted as e:  # told to stop: rank 0 saved this step; the trial ends interrupted
        res = TrainResult("interrupted", f"{e}; a rerun resumes it", e.step, {})
    except Exception as e:  # the training code's failure is this trial's outcome: record it, then fail the group
        from srdit.runtime.worker import _one_line, crash_cause, is_oom

        oom = is_oom(e)
        cause = "" if oom else crash_cause(e)
        if cause == INFRASTRUCTURE:  # not the trial's: the group fails and is started again
            raise
        rank = ray.train.get_context().get_world_rank()
        text = json.dumps(
            {
                "status": "oom" if oom else "crashed",
                "reason": f"rank {rank}: {_one_line(e)}",
                "rank": rank,
                "cause": cause,
            }
        )
        path = Path(loop["out_dir"]) / WORKER_ERROR
        if not path.exists():
            write_atomic(path, lambda f: f.write(text.encode()))
        raise
    final = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
    if main:
        logged = sorted(reporter.at_last_step) if reporter.last_step == res.step else []
        text = json.dumps(
            {
                "status": res.status,
                "reason": res.reason,
                "step": res.step,
                "metrics": final,
                "logged_at_last_step": logged,
                "workers": loop["workers"],
            }
        )
        write_atomic(Path(loop["out_dir"]) / OUTCOME, lambda f: f.write(text.encode()))


def _init_process_group(loop: dict) -> None:
    """The worker group's torch.distributed process group, set up by srdit for every data-parallel trial (NCCL on
    GPUs, gloo on CPUs; two hours' collective timeout: rank 0 evaluates alone).

    The rendezvous never goes through a port that was free a moment ago. Ray Train's TorchTrainer asks rank 0's
    node for a free port (`ray._common.network_utils.find_free_port`: bind port 0, read it, close) and only then
    starts torch's TCPStore on it; between the two the port is free, and another group on that node (two trials
    restarted at once after a node loss), a gloo listener or any outgoing connection may be handed the same number.
    Here:

    - a local study (`loop["store"]`): a FileStore in the trial folder, named once per group by the driver, and
      gloo / NCCL on the loopback interface (no listener on another address; torch's TCPStore listens on every
      interface);
    - otherwise rank 0 starts the TCPStore on port 0, so the operating system assigns a port to the listening
      socket itself, which holds it as long as the group lives, and sends (address, port) to the other ranks
      (`ray.train.collective.broadcast_from_rank_zero`)."""
    import datetime

    import ray.train
    import ray.train.collective
    import ray.util
    import torch.distributed as dist

    from srdit.parallel import rendezvous_store

    c = ray.train.get_context()
    rank, world = c.get_world_rank(), c.get_world_size()
    timeout = datetime.timedelta(hours=2)
    backend = "nccl" if loop["gpus"] else "gloo"
    if backend == "nccl":  # as Ray Train sets it: a failed NCCL collective raises instead of blocking
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if loop.get("store"):
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
        store = dist.FileStore(loop["store"], world)
    else:
        store = None
        if rank == 0:
            store = rendezvous_store(ray.util.get_node_ip_address(), world, timeout)  # its port: held
        host, port = ray.train.collective.broadcast_from_rank_zero(
            (store.host, store.port) if store is not None else None
        )
        if store is None:
            store = dist.TCPStore(host, port, world, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def train_data_parallel(config: RunConfig, out_dir: str | Path, run_id: str, ctx: TrialContext, max_failures: int):
    """Run the resolved `config` on ctx.workers workers; returns (status, reason, step, final metrics, keys already
    logged at the last step, crash cause: "code" when a rank's training code raised, else ""). Raises when the group
    fails beyond its retries (the caller records the trial as crashed, for the infrastructure)."""
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from srdit.evaluate import check_evaluation
    from srdit.parallel import DataParallel

    workers, gpus = int(ctx.workers), float(ctx.gpus)
    # Errors every attempt would hit are raised here, so that Ray Train does not retry them.
    cfg = config.validate()
    DataParallel(0, workers).local_batch(cfg.train.batch_size)
    if cfg.data.dataset != "digits" and cfg.eval.reference:
        check_evaluation(cfg)
    per_worker = {"CPU": ctx.cpus, **({"GPU": gpus / workers} if gpus else {})}
    loop = {
        "config": config,
        "out_dir": str(out_dir),
        "uri": ctx.uri,
        "run_id": run_id,
        "gpus": gpus,
        "workers": workers,
        "threads": max(1, int(math.floor(ctx.cpus))),
        "plugins": ctx.plugins,
        "code": ctx.code,
    }
    outcome, error = Path(out_dir) / OUTCOME, Path(out_dir) / WORKER_ERROR
    for attempt in range(max_failures + 1):
        remove_left_placement_groups(out_dir)  # an earlier attempt's, when its trial died with a node
        outcome.unlink(missing_ok=True)
        error.unlink(missing_ok=True)
        common = dict(
            train_loop_config=loop,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=bool(gpus), resources_per_worker=per_worker
            ),
            run_config=ray.train.RunConfig(
                name=f"{ctx.study}-{Path(out_dir).name}-{attempt}",
                storage_path=ctx.train_storage,
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )
        if ctx.loopback:  # a local study: no listener beyond loopback (see _init_process_group)
            loop["store"] = str(Path(out_dir) / f".process_group_{uuid.uuid4().hex}")  # this group's own file
        trainer = _own_cleanup(DataParallelTrainer)(_worker_loop, backend_config=_node_devices(), **common)
        try:
            trainer.fit()
            break
        except Exception as e:
            if error.is_file():  # the training code raised: the same on every attempt
                m = json.loads(error.read_text())
                return m["status"], m["reason"], 0, {}, set(), m.get("cause", "")
            if attempt == max_failures:
                raise
            from srdit.runtime import attempts
            from srdit.runtime.worker import _one_line

            attempts.end(out_dir, f"worker group failed: {_one_line(e)[:300]}")
            attempts.start(out_dir)  # the next group resumes from the checkpoint
        finally:
            if loop.get("store"):
                Path(loop["store"]).unlink(missing_ok=True)
    if not outcome.is_file():
        raise FileNotFoundError(  # the storage's failure, not the training code's (crash cause: infrastructure)
            f"the worker group ended without writing {outcome} (is the trial folder on storage that every node sees?)"
        )
    m = json.loads(outcome.read_text())
    return m["status"], m["reason"], int(m["step"]), m["metrics"], set(m["logged_at_last_step"]), ""
