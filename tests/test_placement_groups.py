"""A data-parallel trial whose Tune trial died with its node leaves its worker group's placement group behind: Ray
frees it only when its creator actor and the study's driver have both ended, and it keeps its bundles on the nodes
that remain, so the retried trial would wait for resources forever (seen on a two-node cluster with a node
removed). The next attempt removes what earlier attempts recorded and any group whose creator actor has died (one
lost before its rank 0 could record it), never a live controller's or the driver's own."""

import time

import ray
from ray.util.placement_group import placement_group_table

from srdit.runtime.data_parallel import PLACEMENT_GROUPS, remove_left_placement_groups


@ray.remote(num_cpus=0)
class Controller:
    """Stands in for Ray Train's controller: it creates a worker group's placement group and then dies."""

    def start_group(self) -> str:
        from ray.util.placement_group import placement_group

        pg = placement_group([{"CPU": 1}, {"CPU": 1}])
        ray.get(pg.ready())
        return pg.id.hex()


def _cpus_free(n: float, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= n:
            return True
        time.sleep(0.2)
    return False


def test_a_group_left_by_a_dead_controller_is_removed_before_the_next_attempt(ray_local_2cpus, tmp_path):
    controller = Controller.remote()
    left = ray.get(controller.start_group.remote())
    ray.kill(controller)
    time.sleep(1)
    # the leak: its creator is dead, the group still holds both CPUs
    assert placement_group_table()[left]["state"] == "CREATED"
    assert not _cpus_free(1, timeout=2)

    other = Controller.remote()  # another trial's live group is not in this trial's record: it stays
    (tmp_path / PLACEMENT_GROUPS).write_text(left + "\n")
    assert remove_left_placement_groups(tmp_path) == [left]
    assert placement_group_table()[left]["state"] == "REMOVED"
    assert _cpus_free(2)
    assert not (tmp_path / PLACEMENT_GROUPS).exists()
    assert remove_left_placement_groups(tmp_path) == []  # nothing recorded: nothing to do

    kept = ray.get(other.start_group.remote())
    (tmp_path / PLACEMENT_GROUPS).write_text(left + "\n")  # an id already removed is skipped
    assert remove_left_placement_groups(tmp_path) == []
    assert placement_group_table()[kept]["state"] == "CREATED"


def test_a_group_whose_dead_controller_recorded_nothing_is_removed_too(ray_local_2cpus, tmp_path):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

    for pg_id, pg in placement_group_table().items():  # the module's earlier groups: both CPUs free again
        if pg["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    assert _cpus_free(2)
    lost, live = Controller.remote(), Controller.remote()
    unrecorded = ray.get(lost.start_group.remote())
    ray.kill(lost)
    time.sleep(1)
    assert placement_group_table()[unrecorded]["state"] == "CREATED"
    assert remove_left_placement_groups(tmp_path) == [unrecorded]  # nothing recorded in the trial folder
    assert placement_group_table()[unrecorded]["state"] == "REMOVED"
    own = placement_group([{"memory": 1 << 20}])  # the driver's own group (as Tune's trials): no creator actor
    ray.get(own.ready())
    kept = ray.get(live.start_group.remote())
    assert remove_left_placement_groups(tmp_path) == []
    table = placement_group_table()
    assert table[kept]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
