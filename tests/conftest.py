import os
import site
import sys

# One thread per test process and per process it starts (`srdit` subprocesses, Ray workers, spawned ranks), set
# before torch and numpy load their thread pools: `make test` runs two test processes on two cores, and torch's
# default of one thread per core oversubscribes them several times over (a 160-step `srdit train` took 129 s with
# the default threads under that load, 12-20 s with one). Every comparison in the suite is between runs under this
# same setting (BLAS rounds by thread count too, so a spawned rank and its parent must agree on it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def held_port():
    """`take() -> int`: a port for a test's process group, held by a rendezvous store of this test process until the
    test ends (never one that was merely free a moment ago: `srdit.parallel.rendezvous_store`); the spawned ranks
    join it with `srdit.parallel.join_group`."""
    import datetime

    from srdit.parallel import rendezvous_store

    stores = []

    def take() -> int:
        stores.append(rendezvous_store("127.0.0.1", None, datetime.timedelta(minutes=5)))
        return stores[-1].port

    yield take
    stores.clear()


def _private_ray(num_cpus: int):
    """A private local Ray (`num_cpus` CPUs, no dashboard), shut down afterwards. `address="local"` always starts a
    new one: a plain `ray.init()` would join a `ray start` cluster running on the machine (another job's, or another
    test's at the same time) and refuse `num_cpus`."""
    import ray

    from srdit.runtime.ray_parts import shutdown_ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray with one CPU for the tests of one module. One CPU: one trial worker runs a study's trials
    in turn; a second would add only its start-up (imports, the MLflow store) on two cores that the other test
    process keeps busy."""
    yield from _private_ray(1)


@pytest.fixture(scope="module")
def ray_local_2cpus():
    """As `ray_local`, with two CPUs: for tests about what two CPUs hold (placement groups of two bundles), and for
    studies of many trials, where two trials at a time use what the other test process leaves idle."""
    yield from _private_ray(2)


LONGEST_FIRST = (
    "test_signals.py",
    "test_study_ray.py",
    "test_ext.py",
    "test_slurm.py",
    "test_plugin_shipping.py",
    "test_cluster_rehearsal.py",
    "test_state_safety.py",
    "test_compile.py",
    "test_store.py",
    "test_cluster.py",
    "test_study_console.py",
    "test_reuse.py",
    "test_tracking_server.py",
    "test_data_parallel.py",
    "test_study_run.py",
    "test_shared_training.py",
    "test_study_resume.py",
    "test_foldover.py",
    "test_memory_monitor.py",
    "test_latent_study.py",
    "test_imagenet_eval.py",
    "test_faults.py",
    "test_train.py",
    "test_convert.py",
    "test_technique_check.py",
    "test_study_bench.py",
    "test_imagenet_data.py",
    "test_dinov2.py",
    "test_layers.py",
)
"""The test files that took longest in `make test` (its --durations, summed per file), longest first. A stale list
costs only wall time, never a check."""


def pytest_collection_modifyitems(config, items):
    """The longest test files first, the rest in their usual order: with `-n 2 --dist loadfile` a worker takes the
    next whole file when it is free, so the long files start early and the short ones fill the end, instead of one
    long file running alone at the end. Order within a file is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort keeps the rest's order


def study_command(*args: str) -> str:
    """What `srdit study <args>` prints, run in this process (exit 0 asserted): for the commands that only read a
    study's store (status, export). The ones that rebuild it (repair) run as processes: MLflow keeps one engine per
    store for the whole process, which would still read a store that repair set aside."""
    import contextlib
    import io

    from srdit.commands.study import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0, args
    return out.getvalue()


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KEEP = tuple(
    os.path.realpath(p) + os.sep
    for p in {os.path.join(_REPO, "srdit"), sys.prefix, sys.base_prefix, *site.getsitepackages()}
)


def plugin_modules_since(before: set[str], roots: tuple[str, ...]) -> list[str]:
    """The modules imported since `before` (a set of `sys.modules` names) whose file lies under one of `roots` (the
    example plugins' folder, the temporary folder where the tests write plugins), for a test to forget the plugins
    it loaded. Never srdit's own modules or the environment's packages, wherever the clone or the virtual
    environment sits (a fresh clone in the temporary folder would otherwise lose sqlalchemy's modules mid-session and
    import a second copy of them, which breaks MLflow's store)."""
    roots = tuple(os.path.realpath(r) + os.sep for r in roots)
    out = []
    for name in set(sys.modules) - before:
        file = getattr(sys.modules.get(name), "__file__", None)
        if not file:
            continue
        file = os.path.realpath(file)
        if file.startswith(roots) and not file.startswith(_KEEP):
            out.append(name)
    return out
