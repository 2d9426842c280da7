"""`srdit.runtime.ray_parts.shutdown_ray`, the stop of every local Ray srdit starts: the Ray this process started
stops whole, its autoscaler monitor gone before Ray stops the GCS (Ray's own order leaves the monitor reporting to a
stopped GCS until it is killed a second later); connected to a Ray started elsewhere, it only disconnects. Real
local Rays."""

import pytest

pytestmark = pytest.mark.slow


def test_a_ray_this_process_started_stops_whole_its_monitor_before_the_gcs(monkeypatch):
    import ray
    import ray._private.node as ray_node
    import ray._private.worker as ray_worker

    from srdit.runtime.ray_parts import shutdown_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    node = ray_worker._global_node
    processes = {kind: [i.process for i in infos] for kind, infos in node.all_processes.items()}
    monitor = processes["monitor"][0]
    monitor_at_gcs_stop = []
    kill = ray_node.Node._kill_process_impl

    def recording(self, process_type, **kw):
        if process_type == "gcs_server":
            monitor_at_gcs_stop.append(monitor.poll())
        return kill(self, process_type, **kw)

    monkeypatch.setattr(ray_node.Node, "_kill_process_impl", recording)
    shutdown_ray()
    assert not ray.is_initialized()
    assert monitor_at_gcs_stop and monitor_at_gcs_stop[0] is not None  # the monitor had ended when the GCS stopped
    alive = [kind for kind, procs in processes.items() for p in procs if p.poll() is None]
    assert alive == [], alive


def test_connected_to_a_ray_started_elsewhere_it_only_disconnects(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from srdit.runtime.ray_parts import shutdown_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        processes = {kind: [i.process for i in infos] for kind, infos in cluster.head_node.all_processes.items()}
        assert "monitor" in processes and "gcs_server" in processes
        ray.init(address=cluster.address, logging_level="WARNING")
        shutdown_ray()
        assert not ray.is_initialized()
        stopped = [kind for kind, procs in processes.items() for p in procs if p.poll() is not None]
        assert stopped == [], stopped  # the cluster's monitor, GCS, raylet ... all still run
    finally:
        cluster.shutdown()
