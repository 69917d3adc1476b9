"""DP-attention batch sync: the padding rule as a table, dp=1 without collectives,
and the token-count all-gather on gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_pp.distributed.errors import CollectiveError
from lightning_pp.distributed.topology import MeshShape, ParallelGroup, build_topology
from lightning_pp.parallel.dp_attention import (
    gather_batch_info,
    make_idle_batch,
    plan_padding,
)

from multirank import run_on_ranks

# (global_num_tokens, dp_rank, attn_tp_size, pad_mode) -> (need_idle_batch, padded_num_tokens, should_run)
PLAN_TABLE = [
    # dp = 1: never idle, but still padded to the attention-TP multiple (SGLang's dp=1 fix).
    (((5,), 0, 2, "ceil"), (False, 6, True)),
    (((5,), 0, 4, "max_len"), (False, 8, True)),
    (((0,), 0, 2, "ceil"), (False, 0, False)),
    (((8,), 0, 4, "ceil"), (False, 8, True)),
    # a rank without tokens while a peer has some: idle batch.
    (((5, 0), 1, 1, "ceil"), (True, 0, True)),
    (((5, 0), 0, 1, "ceil"), (False, 5, True)),
    (((5, 0), 1, 2, "max_len"), (True, 6, True)),
    # nobody has tokens: nobody runs, no idle batch.
    (((0, 0, 0), 2, 2, "ceil"), (False, 0, False)),
    (((0, 0, 0), 2, 2, "max_len"), (False, 0, False)),
    # ceil pads each rank to its own multiple; max_len pads all to the largest, aligned.
    (((3, 7, 1), 0, 4, "ceil"), (False, 4, True)),
    (((3, 7, 1), 1, 4, "ceil"), (False, 8, True)),
    (((3, 7, 1), 2, 4, "max_len"), (False, 8, True)),
    (((3, 7, 1), 2, 1, "max_len"), (False, 7, True)),
    (((1, 1), 1, 3, "ceil"), (False, 3, True)),
]


@pytest.mark.parametrize("args, expect", PLAN_TABLE)
def test_plan_padding_table(args, expect):
    counts, dp_rank, attn_tp, mode = args
    info = plan_padding(counts, dp_rank, attn_tp_size=attn_tp, pad_mode=mode)
    assert (info.need_idle_batch, info.padded_num_tokens, info.should_run) == expect
    assert info.global_num_tokens == counts and info.num_tokens == counts[dp_rank]
    assert info.padded_num_tokens % attn_tp == 0 and info.padded_num_tokens >= info.num_tokens


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_num_tokens=(), dp_rank=0, attn_tp_size=1), "empty"),
        (dict(global_num_tokens=(1, -1), dp_rank=0, attn_tp_size=1), "non-negative"),
        (dict(global_num_tokens=(1,), dp_rank=1, attn_tp_size=1), "outside"),
        (dict(global_num_tokens=(1,), dp_rank=0, attn_tp_size=0), "at least 1"),
        (dict(global_num_tokens=(1,), dp_rank=0, attn_tp_size=1, pad_mode="floor"), "pad_mode"),
    ],
)
def test_plan_padding_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_padding(**kwargs)


_COLLECTIVES = ("all_gather", "all_gather_object", "all_gather_into_tensor", "all_reduce", "broadcast")


@pytest.mark.parametrize("dp_group", [ParallelGroup.single("cp"), None], ids=["single-group", "no-dist"])
def test_dp_size_one_issues_no_collective_but_pads(monkeypatch, dp_group):
    calls = []
    for name in _COLLECTIVES:
        monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: calls.append(_name))
    info = gather_batch_info(5, dp_group=dp_group, attn_tp_size=4)
    assert calls == []
    assert info.global_num_tokens == (5,)
    assert not info.need_idle_batch
    assert info.padded_num_tokens == 8
    empty = gather_batch_info(0, dp_group=dp_group, attn_tp_size=4)
    assert calls == [] and not empty.need_idle_batch and not empty.should_run


def test_make_idle_batch_is_empty_and_typed():
    batch = make_idle_batch(16, dtype=torch.bfloat16)
    assert batch.hidden.shape == batch.residual.shape == (0, 16)
    assert batch.hidden.dtype == torch.bfloat16 and batch.positions.shape == (0,)


# (tokens per global rank, dp group label) — the cp groups (0, 2) and (1, 3) of a
# cp2 x tp2 mesh, and the whole world as one DP group.
RANK_TOKENS = [5, 0, 3, 0]


def _gather_on_rank(rank: int, world_size: int) -> dict:
    topo = build_topology(MeshShape(cp=2, tp=2), device_type="cpu")
    world = ParallelGroup("world", tuple(range(world_size)), dist.group.WORLD, dist.group.WORLD)
    counted = []
    real_all_gather = dist.all_gather

    def counting_all_gather(*args, **kwargs):
        counted.append("all_gather")
        return real_all_gather(*args, **kwargs)

    dist.all_gather = counting_all_gather
    try:
        out = {
            "cp": gather_batch_info(RANK_TOKENS[rank], dp_group=topo.cp, attn_tp_size=2),
            "world_ceil": gather_batch_info(RANK_TOKENS[rank], dp_group=world, attn_tp_size=2),
            "world_max": gather_batch_info(RANK_TOKENS[rank], dp_group=world, attn_tp_size=4, pad_mode="max_len"),
            # A bare ProcessGroup works too (the gather then runs on that group).
            "process_group": gather_batch_info(RANK_TOKENS[rank], dp_group=topo.cp.device_group, attn_tp_size=2),
            "all_empty": gather_batch_info(0, dp_group=world, attn_tp_size=2),
        }
    finally:
        dist.all_gather = real_all_gather
    out["collectives"] = counted
    out["cp_ranks"] = topo.cp.ranks
    return out


def test_gather_batch_info_on_four_ranks():
    results = run_on_ranks(_gather_on_rank, 4)
    for rank, res in enumerate(results):
        members = res["cp_ranks"]
        cp_counts = tuple(RANK_TOKENS[r] for r in members)
        assert res["collectives"] == ["all_gather"] * 5  # exactly one per call
        for key in ("cp", "process_group"):
            assert res[key] == plan_padding(cp_counts, members.index(rank), attn_tp_size=2)
        assert res["world_ceil"] == plan_padding(RANK_TOKENS, rank, attn_tp_size=2)
        assert res["world_max"] == plan_padding(RANK_TOKENS, rank, attn_tp_size=4, pad_mode="max_len")
        assert res["all_empty"].global_num_tokens == (0, 0, 0, 0)
        assert not res["all_empty"].should_run and not res["all_empty"].need_idle_batch
    # Spelled out: ranks 1 and 3 have nothing while 0 and 2 have tokens.
    assert [r["world_ceil"].need_idle_batch for r in results] == [False, True, False, True]
    assert [r["world_ceil"].padded_num_tokens for r in results] == [6, 0, 4, 0]
    assert [r["world_max"].padded_num_tokens for r in results] == [8, 8, 8, 8]
    # cp group (1, 3) is all empty: no idle batch there, nobody in it runs.
    assert not results[1]["cp"].should_run and not results[1]["cp"].need_idle_batch


def _gather_fails_on_rank(rank: int, world_size: int) -> str:
    world = ParallelGroup("world", tuple(range(world_size)), dist.group.WORLD, dist.group.WORLD)

    def lost_peer(*args, **kwargs):  # what gloo raises when a peer died
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")

    dist.all_gather = lost_peer
    try:
        gather_batch_info(3, dp_group=world, attn_tp_size=2)
    except CollectiveError as error:
        return str(error)
    return "no error"


def test_a_failed_token_count_exchange_names_itself():
    for message in run_on_ranks(_gather_fails_on_rank, 2):
        assert "could not exchange token counts over the attention data-parallel group" in message, message
