"""Rank layout tables, and the real groups built from them on 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_pp.distributed.topology import (
    AXES,
    MeshShape,
    ParallelGroup,
    RankCoords,
    attn_tp_groups,
    axis_groups,
    build_topology,
    coords_of,
    global_rank_of,
    group_rank_of,
    mlp_tp_groups,
    rank_of,
    replica_groups,
)

from multirank import run_on_ranks

# (shape, axis or derived group, expected groups): written out by hand from
# global_rank = ((pp * DP + dp) * CP + cp) * TP + tp.
LAYOUT_TABLE = [
    (MeshShape(pp=2, cp=2, tp=2), "tp", [(0, 1), (2, 3), (4, 5), (6, 7)]),
    (MeshShape(pp=2, cp=2, tp=2), "cp", [(0, 2), (1, 3), (4, 6), (5, 7)]),
    (MeshShape(pp=2, cp=2, tp=2), "pp", [(0, 4), (1, 5), (2, 6), (3, 7)]),
    (MeshShape(pp=2, cp=2, tp=2), "dp", [(r,) for r in range(8)]),
    (MeshShape(pp=2, cp=2, tp=2), "attn_tp", [(0, 1), (2, 3), (4, 5), (6, 7)]),
    (MeshShape(pp=2, cp=2, tp=2), "mlp_tp", [(0, 1, 2, 3), (4, 5, 6, 7)]),
    (MeshShape(dp=2, tp=2), "dp", [(0, 2), (1, 3)]),
    (MeshShape(dp=2, tp=2), "mlp_tp", [(0, 1), (2, 3)]),
    (MeshShape(cp=4), "cp", [(0, 1, 2, 3)]),
    (MeshShape(cp=4), "attn_tp", [(0,), (1,), (2,), (3,)]),
    (MeshShape(cp=4), "mlp_tp", [(0, 1, 2, 3)]),
    (MeshShape(pp=2, dp=2, cp=2, tp=2), "mlp_tp", [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)]),
    (MeshShape(pp=2, dp=2, cp=2, tp=2), "dp", [(0, 4), (1, 5), (2, 6), (3, 7), (8, 12), (9, 13), (10, 14), (11, 15)]),
    (MeshShape(pp=2, dp=2, cp=2, tp=2), "pp", [(r, r + 8) for r in range(8)]),
    (MeshShape(pp=4), "pp", [(0, 1, 2, 3)]),
]


def _groups(shape: MeshShape, name: str) -> list[tuple[int, ...]]:
    if name == "attn_tp":
        return attn_tp_groups(shape)
    if name == "mlp_tp":
        return mlp_tp_groups(shape)
    if name == "replica":
        return replica_groups(shape)
    return axis_groups(shape, name)


@pytest.mark.parametrize("shape, name, expected", LAYOUT_TABLE)
def test_group_layout_table(shape, name, expected):
    assert _groups(shape, name) == expected


@pytest.mark.parametrize(
    "rank, coords",
    [(0, RankCoords(0, 0, 0, 0)), (1, RankCoords(0, 0, 0, 1)), (2, RankCoords(0, 0, 1, 0)),
     (4, RankCoords(0, 1, 0, 0)), (8, RankCoords(1, 0, 0, 0)), (13, RankCoords(1, 1, 0, 1)),
     (15, RankCoords(1, 1, 1, 1))],
)
def test_coords_table(rank, coords):
    shape = MeshShape(pp=2, dp=2, cp=2, tp=2)
    assert coords_of(rank, shape) == coords
    assert rank_of(coords, shape) == rank


@pytest.mark.parametrize("shape", [MeshShape(), MeshShape(pp=3, dp=2), MeshShape(pp=2, dp=1, cp=3, tp=2)])
def test_every_axis_partitions_the_world(shape):
    world = list(range(shape.world_size))
    for name in (*AXES, "attn_tp", "mlp_tp", "replica"):
        groups = _groups(shape, name)
        assert sorted(r for g in groups for r in g) == world, name
    assert all(len(g) == shape.mlp_tp_size for g in mlp_tp_groups(shape))
    assert all(len(g) == shape.attn_tp_size for g in attn_tp_groups(shape))
    for r in world:
        assert rank_of(coords_of(r, shape), shape) == r


def test_rank_conversions_are_explicit_and_checked():
    ranks = (5, 7)
    assert global_rank_of(ranks, 0) == 5 and global_rank_of(ranks, 1) == 7
    assert group_rank_of(ranks, 7) == 1
    with pytest.raises(ValueError, match="not a member"):
        group_rank_of(ranks, 0)
    with pytest.raises(ValueError, match="outside a group"):
        global_rank_of(ranks, 2)
    group = ParallelGroup("tp", ranks)
    assert group.global_rank_of(1) == 7 and group.group_rank_of(5) == 0 and group.size == 2


@pytest.mark.parametrize("bad", [dict(tp=0), dict(cp=-1), dict(pp=1.5)])
def test_mesh_shape_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive int"):
        MeshShape(**bad)


def test_coords_out_of_range():
    with pytest.raises(ValueError, match="outside a mesh"):
        coords_of(4, MeshShape(tp=2, cp=2))


BUILT_SHAPES = {"cp2tp2": MeshShape(cp=2, tp=2), "pp2tp2": MeshShape(pp=2, tp=2), "dp2cp2": MeshShape(dp=2, cp=2)}


def _build_on_rank(rank: int, world_size: int) -> dict:
    out = {}
    for label, shape in BUILT_SHAPES.items():
        topo = build_topology(shape, device_type="cpu")
        seen = {}
        for name, group in topo.groups().items():
            # Prove the group connects exactly its listed members, on both the device
            # group and the CPU twin: the sum of members' global ranks.
            sums = []
            for pg in (group.device_group, group.cpu_group):
                t = torch.tensor([float(rank)])
                if pg is not None:
                    dist.all_reduce(t, group=pg)
                sums.append(t.item())
            seen[name] = {"ranks": group.ranks, "rank": group.rank, "sums": sums}
        out[label] = {"coords": topo.coords, "groups": seen}
    with pytest.raises(ValueError, match="needs 8 ranks"):
        build_topology(MeshShape(pp=2, cp=2, tp=2), device_type="cpu")
    return out


def test_build_topology_on_four_ranks():
    results = run_on_ranks(_build_on_rank, 4)
    for label, shape in BUILT_SHAPES.items():
        for rank, result in enumerate(results):
            got = result[label]
            assert got["coords"] == coords_of(rank, shape)
            for name, info in got["groups"].items():
                expected = next(g for g in _groups(shape, name) if rank in g)
                assert info["ranks"] == expected, (label, name, rank)
                assert info["rank"] == expected.index(rank)
                assert info["sums"] == [float(sum(expected))] * 2, (label, name, rank)
