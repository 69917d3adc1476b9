"""Every process group of a topology waits as long as it was told to, and no longer.

``new_group`` without ``timeout=`` gets the backend's default (30 minutes on gloo),
not the one given to ``init_process_group``, and so do a ``DeviceMesh``'s
sub-groups. Each check reads the timeout the group's backend really runs with, and
then proves it on a collective one member never joins: it must fail after the
short timeout, where the default would hang the test (and fail it on the spawn
timeout instead).
"""

from __future__ import annotations

import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lightning_pp.distributed import topology as topology_module
from lightning_pp.distributed.topology import MeshShape, build_topology, destroy_topology, process_group_timeout

from multirank import run_on_ranks

pytestmark = pytest.mark.slow

SHORT = timedelta(seconds=2)


def _all_groups(topo) -> dict[str, object]:
    """Every distinct group handle of ``topo``, device groups and CPU twins, by a readable name."""
    found: dict[str, object] = {}
    for name, group in topo.groups().items():
        for kind, pg in (("device", group.device_group), ("cpu", group.cpu_group)):
            if pg is not None:
                found[f"{name}.{kind}"] = pg
    for axis in ("pp", "dp", "cp", "tp"):
        found[f"mesh.{axis}"] = topo.mesh.get_group(axis)
    return found


def _alone_in(group) -> tuple[float, str]:
    """An all-reduce over ``group`` that the other members never join: (seconds until it failed, error)."""
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError as error:
        return time.monotonic() - start, str(error)
    return time.monotonic() - start, "completed"


def _short_timeout_rank(rank: int, world_size: int) -> dict:
    # The default group keeps torch's 30 minutes (run_on_ranks' init_process_group):
    # only build_topology's `timeout` can make these groups short.
    # A CPU platform shares the device group as the CPU twin; pretend to be a device
    # platform so that the twins are built (on gloo) and checked too.
    topology_module.current_platform = lambda: SimpleNamespace(device_type="cpu", dist_backend="nccl")
    topo = build_topology(MeshShape(pp=2, cp=2), device_type="cpu", timeout=SHORT)
    reported = {name: process_group_timeout(pg) for name, pg in _all_groups(topo).items()}
    # Rank 0 tries a collective on three kinds of group (a mesh axis, a bare new_group,
    # a CPU twin); the other members stay alive in a world barrier meanwhile, so a
    # failure is the deadline, not a lost connection.
    probes = {
        "pp.device": topo.pp.device_group,
        "replica.device": topo.replica.device_group,
        "pp.cpu": topo.pp.cpu_group,
    }
    # (Only when every group says so: a group with the default would hang here, and
    # the wrong reading fails the test faster and more clearly.)
    short_everywhere = all(t == SHORT for t in reported.values())
    measured = {name: _alone_in(group) for name, group in probes.items()} if rank == 0 and short_everywhere else {}
    dist.barrier()
    return {"reported": reported, "measured": measured, "topology_timeout": topo.timeout}


def test_every_group_of_the_topology_has_the_timeout_it_was_given():
    results = run_on_ranks(_short_timeout_rank, 4, timeout=90)
    for rank, result in enumerate(results):
        assert result["topology_timeout"] == SHORT
        assert len(result["reported"]) >= 10, result["reported"]  # axes, derived groups, twins, mesh
        wrong = {name: t for name, t in result["reported"].items() if t != SHORT}
        assert not wrong, f"rank {rank}: groups with another timeout than {SHORT}: {wrong}"
    assert results[0]["measured"].keys() == {"pp.device", "replica.device", "pp.cpu"}
    for name, (seconds, error) in results[0]["measured"].items():
        assert "Timed out" in error, (name, error)
        assert 1.5 <= seconds < 10, f"{name} failed after {seconds:.1f}s, not after its {SHORT}"


def _inherit_rank(rank: int, world_size: int) -> dict:
    dist.init_process_group(
        "gloo", init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=7)
    )
    counts = [len(dist.distributed_c10d._world.pg_map)]
    inherited = build_topology(MeshShape(pp=4), device_type="cpu")
    counts.append(len(dist.distributed_c10d._world.pg_map))
    other = build_topology(MeshShape(pp=4), device_type="cpu", timeout=SHORT)
    counts.append(len(dist.distributed_c10d._world.pg_map))
    out = {
        "inherited": {name: process_group_timeout(pg) for name, pg in _all_groups(inherited).items()},
        "other": {name: process_group_timeout(pg) for name, pg in _all_groups(other).items()},
        # An axis over the whole world is the default group itself when the timeout
        # agrees, and a group of its own when it does not.
        "pp_is_world": (inherited.pp.device_group is dist.group.WORLD, other.pp.device_group is dist.group.WORLD),
    }
    destroy_topology(other)
    counts.append(len(dist.distributed_c10d._world.pg_map))
    destroy_topology(inherited)
    counts.append(len(dist.distributed_c10d._world.pg_map))
    # What remains works: the default group is untouched.
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    out.update(counts=counts, total=total.item())
    return out


def test_groups_inherit_the_default_groups_timeout_and_destroy_gives_them_back():
    results = run_on_ranks(_inherit_rank, 4, init_process_group=False, timeout=90)
    for result in results:
        assert set(result["inherited"].values()) == {timedelta(seconds=7)}, result["inherited"]
        assert set(result["other"].values()) == {SHORT}, result["other"]
        assert result["pp_is_world"] == (True, False)
        before, after_inherited, after_both, after_one_destroyed, after_all = result["counts"]
        # pp=4 over 4 ranks: dp, cp, tp are groups of one each; the short one adds its own pp group.
        assert (after_inherited - before, after_both - after_inherited) == (3, 4)
        assert (after_one_destroyed, after_all) == (after_inherited, before)
        assert result["total"] == 6.0
