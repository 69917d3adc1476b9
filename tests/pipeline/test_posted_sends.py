"""Sends moved ahead of receives (``sends_first``) when sends are posted and never block.

Pure logic, no processes: every schedule, reordered, still sends each payload after
the compute that made it, keeps its receives in order, and completes in a replay
where a send is posted (never blocks) and a receive waits for its message. The
replay itself must be able to fail: a rank that never sends leaves its peer waiting.
Blocking sends are not this model (the reordered 1F1B would hang on XCCL), which is
why the executor reorders only when its ``PipeComm`` says sends never block.
"""

from __future__ import annotations

from collections import defaultdict, deque

import pytest

from lightning_pp.pipeline.executor import sends_first
from lightning_pp.pipeline.schedules import SCHEDULES, Op, build_schedule


def _replay_posted_sends(actions_by_rank) -> bool:
    """Whether every rank finishes when sends never block and receives wait for their message."""
    queues: dict = defaultdict(deque)
    heads = [0] * len(actions_by_rank)
    moved = True
    while moved:
        moved = False
        for rank, actions in enumerate(actions_by_rank):
            while heads[rank] < len(actions):
                a = actions[heads[rank]]
                if a.op.is_send:
                    queues[(rank, a.peer)].append((a.op, a.stage, a.microbatch))
                elif a.op.is_recv:
                    channel = queues[(a.peer, rank)]
                    if not channel:
                        break
                    op, stage, k = channel.popleft()
                    expected = (Op.SEND_ACT, a.stage - 1) if a.op is Op.RECV_ACT else (Op.SEND_GRAD, a.stage + 1)
                    assert (op, stage, k) == (*expected, a.microbatch), f"rank {rank}: {a} met {op}{stage},{k}"
                heads[rank] += 1
                moved = True
    return all(h == len(actions) for h, actions in zip(heads, actions_by_rank))


CASES = [(name, p, m) for name in SCHEDULES for p in (2, 3, 4) for m in (1, 3, 4, 8)]


@pytest.mark.parametrize("name, p, m", CASES)
def test_sends_first_keeps_dependencies_and_completes(name, p, m):
    v = 2 if name == "interleaved1f1b" else 1
    schedule = build_schedule(name, p, m, virtual_stages=v)
    reordered = [sends_first(actions) for actions in schedule.actions]
    for before, after in zip(schedule.actions, reordered):
        assert sorted(map(str, before)) == sorted(map(str, after))
        assert [a for a in before if not a.op.is_send] == [a for a in after if not a.op.is_send]
        for i, action in enumerate(after):  # a send follows the compute that made its payload
            if action.op.is_send:
                made_by = Op.FORWARD if action.op is Op.SEND_ACT else (Op.BACKWARD, Op.BACKWARD_INPUT)
                computes = [a for a in after[:i] if a.op.is_compute and a.stage == action.stage]
                assert any(
                    a.microbatch == action.microbatch and a.op in ((made_by,) if isinstance(made_by, Op) else made_by)
                    for a in computes
                ), f"{action} before its producer"
    assert _replay_posted_sends(reordered)


def test_sends_first_moves_the_odd_ranks_gradient_ahead_of_its_receive():
    schedule = build_schedule("1f1b", 2, 4)
    rank1 = [str(a) for a in schedule.actions[1]]
    moved = [str(a) for a in sends_first(schedule.actions[1])]
    # Proven order on rank 1 (odd): receive the next input, then send the gradient; posted: the other way round.
    i = rank1.index("1RECV_F1")
    assert rank1[i + 1] == "1SEND_B0"
    j = moved.index("1SEND_B0")
    assert moved[j + 1] == "1RECV_F1"


def test_the_replay_catches_a_receive_that_never_gets_its_message():
    schedule = build_schedule("1f1b", 2, 2)
    rank0 = [a for a in schedule.actions[0] if a.op is not Op.SEND_ACT]  # rank 0 never sends its activations
    assert not _replay_posted_sends([rank0, list(schedule.actions[1])])


class _RecordingComm:
    """Stands in for a PipeComm: records when each receive was posted and completed."""

    def __init__(self, sends_never_block: bool) -> None:
        self.sends_never_block = sends_never_block
        self.posted: list = []

    def post_recv(self, peer, *, channel, what):
        self.posted.append((self.now, peer))
        return ("handle", self.now)

    def recv(self, peer, *, what, channel, posted):
        return posted


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "interleaved1f1b", "zbh1"])
def test_receives_ahead_never_pass_a_send_to_the_same_peer_on_stream_ordered_backends(name):
    from lightning_pp.pipeline.executor import _ReceiveAhead

    schedule = build_schedule(name, 4, 8, virtual_stages=2 if name == "interleaved1f1b" else 1)
    for passes in (False, True):
        for actions in schedule.actions:
            comm = _RecordingComm(passes)
            ahead = _ReceiveAhead(actions, comm)
            for index, action in enumerate(actions):
                comm.now = index
                if action.op.is_compute:
                    ahead.post_next(index)
                if action.op.is_recv:
                    handle = ahead.receive(index)
                    if handle is None or passes:
                        continue
                    posted_at = handle[1]
                    between = actions[posted_at + 1 : index]
                    assert not any(a.op.is_send and a.peer == action.peer for a in between), (
                        f"{action} posted at {posted_at} ahead of a send to the same peer"
                    )
            if passes:
                assert comm.posted, "on gloo receives are posted ahead"


def test_a_stream_ordered_comm_keeps_the_proven_order():
    import torch

    from lightning_pp.distributed.p2p import PipeComm

    class _Posting:
        def send(self, *a): ...
        def recv(self, *a): ...
        def isend(self, *a): ...
        def irecv(self, *a): ...

    cpu = PipeComm(None, torch.device("cpu"), transport=_Posting(), stream_ordered=False)
    device = PipeComm(None, torch.device("cpu"), transport=_Posting(), stream_ordered=True)
    blocking = PipeComm(None, torch.device("cpu"), transport=type("T", (), {"send": None, "recv": None})())
    assert cpu.sends_never_block and not device.sends_never_block and not blocking.sends_never_block
