import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray (2 CPUs, no dashboard) for the tests of one module, shut down after them. `address=
    "local"` always starts a new one: a plain `ray.init()` would join a `ray start` cluster running on the machine
    (another job's, or another test's at the same time) and refuse `num_cpus`."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
