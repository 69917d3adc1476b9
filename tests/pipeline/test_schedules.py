"""Schedules as data: built, lowered, validated and timed without any process group."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import pytest

import lightning_pp.pipeline.schedules as schedules_module
from lightning_pp.pipeline.schedules import (
    SCHEDULES,
    Action,
    Op,
    Schedule,
    ScheduleError,
    build_schedule,
    lower,
    validate_schedule,
)
from lightning_pp.pipeline.simulation import (
    TimedAction,
    bubble_fraction,
    ideal_bubble_fraction,
    peak_live_activations,
    simulate,
)

F, B, I, W = Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT  # noqa: E741 - torch's letters
TABLE = [("gpipe", 1), ("1f1b", 1), ("interleaved1f1b", 2), ("interleaved1f1b", 3), ("zbh1", 1)]


def _strings(schedule: Schedule) -> List[List[str]]:
    return [[str(a) for a in actions] for actions in schedule.actions]


def _rendezvous(actions: Sequence[Sequence[Action]]) -> bool:
    """Independent of the validator: can every rank finish if each send waits for its receive?"""
    pos = [0] * len(actions)
    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(actions):
            while pos[r] < len(acts) and acts[pos[r]].op.is_compute:
                pos[r] += 1
                progress = True
            if pos[r] == len(acts):
                continue
            a = acts[pos[r]]
            q = a.peer
            b = actions[q][pos[q]] if pos[q] < len(actions[q]) else None
            if b is None or b.peer != r or b.microbatch != a.microbatch or a.op.is_send == b.op.is_send:
                continue
            send, recv = (a, b) if a.op.is_send else (b, a)
            delta = 1 if send.op is Op.SEND_ACT else -1
            kinds = (Op.SEND_ACT, Op.RECV_ACT) if delta == 1 else (Op.SEND_GRAD, Op.RECV_GRAD)
            if (send.op, recv.op) == kinds and recv.stage == send.stage + delta:
                pos[r] += 1
                pos[q] += 1
                progress = True
    return all(pos[r] == len(acts) for r, acts in enumerate(actions))


def _replace_rank(schedule: Schedule, rank: int, actions: Sequence[Action]) -> Schedule:
    ranks = list(schedule.actions)
    ranks[rank] = tuple(actions)
    return dataclasses.replace(schedule, actions=tuple(ranks))


# --------------------------------------------------------------------------- table


@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("pp_size", range(1, 7))
@pytest.mark.parametrize("name,virtual_stages", TABLE)
def test_every_schedule_in_the_table_is_complete_and_deadlock_free(name, virtual_stages, pp_size, forward_only):
    for m in range(1, 13):
        s = build_schedule(name, pp_size, m, virtual_stages=virtual_stages, forward_only=forward_only)
        validate_schedule(s)
        assert (s.pp_size, s.num_microbatches, s.num_stages) == (pp_size, m, pp_size * virtual_stages)
        seen: Dict[Tuple[Op, int, int], int] = {}
        for rank, actions in enumerate(s.actions):
            for a in actions:
                assert s.stage_to_rank(a.stage) == rank, (str(a), rank)
                if a.op.is_compute:
                    seen[(a.op, a.stage, a.microbatch)] = seen.get((a.op, a.stage, a.microbatch), 0) + 1
                elif pp_size == 1:
                    pytest.fail(f"pp_size=1 needs no comm, got {a}")
        passes = (F,) if forward_only else (F, I, W) if name == "zbh1" else (F, B)
        expected = {(op, st, k): 1 for op in passes for st in range(s.num_stages) for k in range(m)}
        assert seen == expected
        assert _rendezvous(s.actions), f"{name} pp={pp_size} m={m} hangs with blocking sends"
        n_sends = sum(a.op.is_send for acts in s.actions for a in acts)
        n_edges = 0 if pp_size == 1 else (s.num_stages - 1) * m * (1 if forward_only else 2)
        assert n_sends == n_edges == sum(a.op.is_recv for acts in s.actions for a in acts)


def test_building_is_deterministic_and_names_are_case_insensitive():
    assert build_schedule("Interleaved1F1B", 4, 8, virtual_stages=2) == build_schedule(
        "interleaved_1f1b", 4, 8, virtual_stages=2
    )
    assert build_schedule("GPipe", 2, 3).name == "gpipe"
    assert build_schedule("ZB-H1", 2, 3) == build_schedule("zb_h1", 2, 3) == build_schedule("ZBH1", 2, 3)
    assert build_schedule("ZBH1", 2, 3).name == "zbh1"
    assert SCHEDULES == ("gpipe", "1f1b", "interleaved1f1b", "zbh1")


# --------------------------------------------------------------------------- golden


def test_golden_1f1b_pp2_m3():
    s = build_schedule("1f1b", 2, 3)
    # Rank 1 is odd, so it receives the next input before returning the gradient.
    assert _strings(s) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0F2 0SEND_F2 0RECV_B1 0B1 0RECV_B2 0B2".split(),
        "1RECV_F0 1F0 1B0 1RECV_F1 1SEND_B0 1F1 1B1 1RECV_F2 1SEND_B1 1F2 1B2 1SEND_B2".split(),
    ]
    assert {a.peer for a in s.actions[0] if not a.op.is_compute} == {1}
    assert {a.peer for a in s.actions[1] if not a.op.is_compute} == {0}
    assert s.actions[0][1] == Action(Op.SEND_ACT, 0, 0, peer=1)


def test_golden_gpipe_pp3_m2_sends_first_where_the_receive_depends_on_it():
    # Odd rank 1 must send 1SEND_F1 before 1RECV_B0: rank 2 only runs 2B0 after 2F1.
    assert _strings(build_schedule("gpipe", 3, 2)) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1".split(),
        "1RECV_F0 1F0 1RECV_F1 1SEND_F0 1F1 1SEND_F1 1RECV_B0 1B0 1RECV_B1 1SEND_B0 1B1 1SEND_B1".split(),
        "2RECV_F0 2F0 2RECV_F1 2F1 2B0 2SEND_B0 2B1 2SEND_B1".split(),
    ]


def test_golden_single_rank_is_local():
    assert _strings(build_schedule("1f1b", 1, 2)) == [["0F0", "0B0", "0F1", "0B1"]]
    assert _strings(build_schedule("interleaved1f1b", 1, 2, virtual_stages=2)) == [
        "0F0 1F0 1B0 0F1 0B0 1F1 1B1 0B1".split()
    ]
    assert _strings(build_schedule("gpipe", 2, 2, forward_only=True)) == [
        "0F0 0SEND_F0 0F1 0SEND_F1".split(),
        "1RECV_F0 1F0 1RECV_F1 1F1".split(),
    ]


def test_golden_interleaved_compute_order_matches_megatron():
    s = build_schedule("interleaved1f1b", 2, 4, virtual_stages=2)
    compute = [[str(a) for a in acts if a.op.is_compute] for acts in s.actions]
    # Groups of p=2 microbatches through chunk 0 then chunk 1; warm-up 2(p-1-r) + (v-1)p.
    assert compute[0] == "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3".split()
    assert compute[1] == "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3".split()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("pp_size", [2, 3, 4])
def test_naive_send_first_lowering_deadlocks_and_parity_does_not(pp_size):
    good = build_schedule("1f1b", pp_size, 4)
    naive = lower(good, parity=False)
    assert [[a for a in acts if a.op.is_compute] for acts in naive.actions] == [
        [a for a in acts if a.op.is_compute] for acts in good.actions
    ]
    with pytest.raises(ScheduleError, match="deadlocks when every send waits") as err:
        validate_schedule(naive)
    assert "blocked at" in str(err.value) and "parity" in str(err.value)
    assert not _rendezvous(naive.actions)
    validate_schedule(lower(naive))  # re-lowering the same compute order with parity fixes it
    assert _rendezvous(good.actions)
    simulate(naive, blocking_send=False)  # only the blocking model hangs: buffered sends finish


def test_naive_deadlock_message_names_each_blocked_rank():
    with pytest.raises(ScheduleError) as err:
        validate_schedule(lower(build_schedule("1f1b", 2, 3), parity=False))
    text = str(err.value)
    assert "rank 0: blocked at #3 '0SEND_F1' waiting for rank 1, which is at #3 '1SEND_B0'" in text
    assert "rank 1: blocked at #3 '1SEND_B0' waiting for rank 0, which is at #3 '0SEND_F1'" in text


def test_literal_parity_rule_alone_hangs_gpipe_at_pp3():
    """Odd ranks receiving first in *every* gap is not enough: the receive may wait on the send."""
    naive = lower(build_schedule("gpipe", 3, 2), parity=False)
    ranks = []
    for rank, actions in enumerate(naive.actions):
        out = list(actions)
        for i in range(len(out) - 1):
            if rank % 2 and out[i].op.is_send and out[i + 1].op.is_recv:
                out[i], out[i + 1] = out[i + 1], out[i]
        ranks.append(tuple(out))
    with pytest.raises(ScheduleError, match="rank 1: blocked at #5 '1RECV_B0'"):
        validate_schedule(dataclasses.replace(naive, actions=tuple(ranks)))


@pytest.mark.parametrize("name", ["1f1b", "zbh1"])
@pytest.mark.parametrize("pp_size", range(2, 7))
def test_1f1b_exchanges_with_one_neighbour_follow_parity(pp_size, name):
    for m in range(pp_size, 13):
        for rank, actions in enumerate(build_schedule(name, pp_size, m).actions):
            gap: List[Action] = []
            for a in list(actions) + [Action(F, rank, 0)]:
                if not a.op.is_compute:
                    gap.append(a)
                    continue
                pairs = [(x, y) for i, x in enumerate(gap) for y in gap[i + 1 :] if x.peer == y.peer]
                for x, y in pairs:
                    if x.op.is_send != y.op.is_send:
                        assert x.op.is_send == (rank % 2 == 0), (pp_size, m, rank, [str(g) for g in gap])
                gap = []


# --------------------------------------------------------------------------- memory and time


@pytest.mark.parametrize("pp_size", range(1, 7))
def test_peak_live_activations(pp_size):
    for m in range(1, 13):
        one_f_one_b = peak_live_activations(build_schedule("1f1b", pp_size, m))
        assert one_f_one_b == tuple(min(pp_size - r, m) for r in range(pp_size))
        assert one_f_one_b[0] <= pp_size
        assert peak_live_activations(build_schedule("gpipe", pp_size, m)) == (m,) * pp_size
        assert peak_live_activations(build_schedule("1f1b", pp_size, m, forward_only=True)) == (0,) * pp_size


@pytest.mark.parametrize("blocking_send", [True, False])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_makespan_is_textbook(name, blocking_send):
    for p in range(1, 7):
        for m in range(1, 13):
            timeline = simulate(build_schedule(name, p, m), blocking_send=blocking_send)
            assert max(e.end for events in timeline for e in events) == (m + p - 1) * 3.0, (p, m)
            assert bubble_fraction(timeline) == pytest.approx(ideal_bubble_fraction(p, m))


def test_simulate_timeline_respects_order_and_data():
    s = build_schedule("1f1b", 3, 4)
    timeline = simulate(s, forward_time=1.0, backward_time=2.0, comm_time=0.5)
    end_of = {}
    for rank, events in enumerate(timeline):
        assert [e.action for e in events] == list(s.actions[rank])
        assert all(a.end <= b.start for a, b in zip(events, events[1:]))
        for e in events:
            assert isinstance(e, TimedAction) and e.end - e.start == {F: 1.0, B: 2.0}.get(e.action.op, 0.5)
            end_of[(e.action.op, e.action.stage, e.action.microbatch)] = e.end
    for (op, stage, k), end in end_of.items():
        if op is Op.RECV_ACT:
            assert end == end_of[(Op.SEND_ACT, stage - 1, k)] >= end_of[(F, stage - 1, k)] + 0.5
    assert max(end_of.values()) > (4 + 3 - 1) * 3.0  # comm costs time now


def test_interleaving_shrinks_the_bubble():
    p, m, v = 4, 8, 2
    plain = bubble_fraction(simulate(build_schedule("1f1b", p, m)))
    inter = bubble_fraction(
        simulate(build_schedule("interleaved1f1b", p, m, virtual_stages=v), forward_time=1 / v, backward_time=2 / v)
    )
    assert inter < plain
    assert plain == pytest.approx(ideal_bubble_fraction(p, m)) == pytest.approx(3 / 11)
    assert inter == pytest.approx(ideal_bubble_fraction(p, m, v)) == pytest.approx(3 / 19)


def test_simulate_and_ideal_reject_bad_inputs():
    with pytest.raises(ValueError, match="comm_time must be >= 0"):
        simulate(build_schedule("1f1b", 2, 2), comm_time=-1)
    with pytest.raises(ValueError, match="num_microbatches"):
        ideal_bubble_fraction(2, 0)
    assert bubble_fraction([[], []]) == 0.0


# --------------------------------------------------------------------------- validator


def test_validator_reports_a_missing_action():
    s = build_schedule("1f1b", 2, 3)
    broken = _replace_rank(s, 1, [a for a in s.actions[1] if str(a) != "1B2"])
    with pytest.raises(ScheduleError, match=r"missing '1B2' on rank 1: each stage runs it exactly once"):
        validate_schedule(broken)


def test_validator_reports_backward_before_forward():
    s = build_schedule("1f1b", 1, 2)
    broken = _replace_rank(s, 0, [Action(F, 0, 0), Action(B, 0, 1), Action(B, 0, 0), Action(F, 0, 1)])
    with pytest.raises(ScheduleError, match=r"'0F1' \(#3\) must come before '0B1' \(#1\)"):
        validate_schedule(broken)


def test_validator_reports_local_stage_order_on_one_rank():
    s = build_schedule("interleaved1f1b", 1, 1, virtual_stages=2, forward_only=True)
    broken = _replace_rank(s, 0, [Action(F, 1, 0), Action(F, 0, 0)])
    with pytest.raises(ScheduleError, match=r"'0F0' \(#1\) must come before '1F0' \(#0\): a forward needs"):
        validate_schedule(broken)


def test_validator_reports_messages_out_of_order():
    s = build_schedule("gpipe", 2, 2, forward_only=True)
    # Rank 1 receives microbatch 1 before microbatch 0; each receive still precedes its forward.
    swapped = [Action(Op.RECV_ACT, 1, 1, 0), Action(Op.RECV_ACT, 1, 0, 0), Action(F, 1, 0), Action(F, 1, 1)]
    expected = r"rank 0 -> rank 1, message #0: rank 0 sends '0SEND_F0' but rank 1 expects '1RECV_F1'"
    with pytest.raises(ScheduleError, match=expected):
        validate_schedule(_replace_rank(s, 1, swapped))


def test_validator_reports_wrong_peer_wrong_rank_and_duplicates():
    s = build_schedule("1f1b", 3, 2)
    wrong_peer = [dataclasses.replace(a, peer=2) if str(a) == "0SEND_F0" else a for a in s.actions[0]]
    with pytest.raises(ScheduleError, match=r"'0SEND_F0': peer must be rank 1 \(holder of stage 1\), got 2"):
        validate_schedule(_replace_rank(s, 0, wrong_peer))
    with pytest.raises(ScheduleError, match=r"'2F0': stage 2 lives on rank 2"):
        validate_schedule(_replace_rank(s, 0, list(s.actions[0]) + [Action(F, 2, 0)]))
    with pytest.raises(ScheduleError, match=r"'0F1' appears 2 times"):
        validate_schedule(_replace_rank(s, 0, list(s.actions[0]) + [Action(F, 0, 1)]))
    with pytest.raises(ScheduleError, match=r"nothing to carry, stage 3 does not exist"):
        validate_schedule(_replace_rank(s, 2, list(s.actions[2]) + [Action(Op.SEND_ACT, 2, 0, 0)]))
    with pytest.raises(ScheduleError, match=r"out of range; stages are 0..2, microbatches 0..1"):
        validate_schedule(_replace_rank(s, 0, list(s.actions[0]) + [Action(F, 0, 5)]))


def test_validator_reports_receive_after_its_forward_and_backward_in_forward_only():
    s = build_schedule("gpipe", 2, 1, forward_only=True)
    late = _replace_rank(s, 1, [Action(F, 1, 0), Action(Op.RECV_ACT, 1, 0, 0)])
    with pytest.raises(ScheduleError, match=r"'1RECV_F0' \(#1\) must come before '1F0' \(#0\)"):
        validate_schedule(late)
    with pytest.raises(ScheduleError, match="forward_only schedule has no backward"):
        validate_schedule(_replace_rank(s, 0, list(s.actions[0]) + [Action(B, 0, 0)]))


def test_validator_caps_long_reports():
    s = build_schedule("gpipe", 1, 12)
    with pytest.raises(ScheduleError, match=r"\.\.\. and 12 more"):
        validate_schedule(_replace_rank(s, 0, []))


# --------------------------------------------------------------------------- zero bubble (ZB-H1)


def test_golden_zbh1_pp2_m4():
    # Rank 1 holds back one W (its first runs after 1I1); rank 0 holds none. 1SEND_B3 goes before the Ws
    # left at the end: nothing waits for a W.
    assert _strings(build_schedule("zbh1", 2, 4)) == [
        (
            "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0I0 0W0 0F2 0SEND_F2 0RECV_B1 0I1 0W1 "
            "0F3 0SEND_F3 0RECV_B2 0I2 0W2 0RECV_B3 0I3 0W3"
        ).split(),
        (
            "1RECV_F0 1F0 1I0 1RECV_F1 1SEND_B0 1F1 1I1 1W0 1RECV_F2 1SEND_B1 1F2 1I2 1W1 "
            "1RECV_F3 1SEND_B2 1F3 1I3 1SEND_B3 1W2 1W3"
        ).split(),
    ]


def test_golden_zbh1_compute_order_pp4():
    compute = [[str(a) for a in acts if a.op.is_compute] for acts in build_schedule("zbh1", 4, 8).actions]
    # Warm-up p-1-r forwards as 1F1B, then F I (W); rank r holds back its first r Ws for the drain.
    assert compute == [
        "0F0 0F1 0F2 0F3 0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0F6 0I3 0W3 0F7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7".split(),
        "1F0 1F1 1F2 1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 1I6 1W5 1I7 1W6 1W7".split(),
        "2F0 2F1 2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 2I7 2W5 2W6 2W7".split(),
        "3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4 3W5 3W6 3W7".split(),
    ]
    # Fewer microbatches than stages: no steady state, every W after its I.
    compute = [[str(a) for a in acts if a.op.is_compute] for acts in build_schedule("zbh1", 4, 2).actions]
    assert compute[0] == "0F0 0F1 0I0 0W0 0I1 0W1".split()
    assert compute[3] == "3F0 3I0 3F1 3I1 3W0 3W1".split()


@pytest.mark.parametrize("pp_size", range(2, 9))
def test_zbh1_completes_when_every_send_waits_for_its_receive(pp_size):
    for m in range(1, 3 * pp_size + 1):
        s = build_schedule("zbh1", pp_size, m)  # validates, replaying under the rendezvous model
        validate_schedule(s)
        assert _rendezvous(s.actions), f"zbh1 pp={pp_size} m={m} hangs with blocking sends"
        assert s.splits_backward and not build_schedule("1f1b", pp_size, m).splits_backward
        for rank, actions in enumerate(s.actions):
            at = {(a.op, a.microbatch): i for i, a in enumerate(actions) if a.op.is_compute}
            assert not any(a.op is B for a in actions)
            for k in range(m):
                assert at[(F, k)] < at[(I, k)] < at[(W, k)], (pp_size, m, rank, k)
        # W is local: the messages are 1F1B's, one activation and one gradient per edge and microbatch.
        assert sum(a.op.is_send for acts in s.actions for a in acts) == 2 * (pp_size - 1) * m


def test_zbh1_cuts_the_1f1b_bubble_to_a_third():
    """Same work (F = 1, B = 2 = I + W): each rank idles (p - 1)(F + I - W) = 3 ticks against 1F1B's 9."""
    p, m = 4, 8
    one, zb = simulate(build_schedule("1f1b", p, m)), simulate(build_schedule("zbh1", p, m))

    def idle(timeline: List[List[TimedAction]]) -> float:
        span = max(e.end for events in timeline for e in events)
        return p * span - sum(e.end - e.start for events in timeline for e in events if e.action.op.is_compute)

    assert idle(one) == p * 9 and idle(zb) == p * 3
    one_bubble, zb_bubble = bubble_fraction(one), bubble_fraction(zb)
    print(f"pp={p} m={m} F=I=W: bubble 1F1B {one_bubble:.3f}, ZB-H1 {zb_bubble:.3f} ({zb_bubble / one_bubble:.2f}x)")
    assert one_bubble == pytest.approx(3 / 11) and zb_bubble == pytest.approx(3 / 27)
    assert zb_bubble == pytest.approx(ideal_bubble_fraction(p, m, zero_bubble=True))


@pytest.mark.parametrize("blocking_send", [True, False])
def test_zbh1_makespan_is_the_papers_and_never_above_1f1b(blocking_send):
    for p in range(1, 9):
        for m in range(1, 3 * p + 1):
            zb = simulate(build_schedule("zbh1", p, m), blocking_send=blocking_send)
            span = max(e.end for events in zb for e in events)
            assert span <= (m + p - 1) * 3.0, (p, m)  # 1F1B's
            if m >= p:
                assert span == 3 * m + p - 1, (p, m)
                assert bubble_fraction(zb) == pytest.approx(ideal_bubble_fraction(p, m, zero_bubble=True))
    # Other splits of the backward, slower or faster forwards: still never slower than 1F1B.
    for weight_time in (0.5, 1.5):
        for forward_time in (0.5, 2.0):
            for p, m in [(2, 3), (4, 2), (4, 8), (6, 9)]:
                times = dict(forward_time=forward_time, backward_time=2.0)
                zb = simulate(build_schedule("zbh1", p, m), weight_time=weight_time, **times)
                one = simulate(build_schedule("1f1b", p, m), **times)
                assert max(e.end for r in zb for e in r) <= max(e.end for r in one for e in r), (weight_time, p, m)


@pytest.mark.parametrize("pp_size", range(1, 9))
def test_zbh1_holds_1f1b_peak_activations(pp_size):
    for m in range(1, 3 * pp_size + 1):
        zb = peak_live_activations(build_schedule("zbh1", pp_size, m))
        one = peak_live_activations(build_schedule("1f1b", pp_size, m))
        # A microbatch's activations live from F to W: min(p, m) on every rank, 1F1B's rank-0 peak.
        assert zb == (min(pp_size, m),) * pp_size
        assert max(zb) == max(one) == one[0]
        assert peak_live_activations(build_schedule("zbh1", pp_size, m, forward_only=True)) == (0,) * pp_size


def test_simulate_times_a_split_backward():
    s = build_schedule("zbh1", 2, 3)
    for weight_time, (i_time, w_time) in [(None, (1.0, 1.0)), (0.5, (1.5, 0.5))]:
        for events in simulate(s, forward_time=1.0, backward_time=2.0, weight_time=weight_time):
            for e in events:
                expected = {F: 1.0, I: i_time, W: w_time}.get(e.action.op, 0.0)
                assert e.end - e.start == expected, (weight_time, str(e.action))
    with pytest.raises(ValueError, match="weight_time=3.0 exceeds backward_time=2.0"):
        simulate(s, weight_time=3.0)
    with pytest.raises(ValueError, match="weight_time must be >= 0"):
        simulate(s, weight_time=-1.0)
    with pytest.raises(ValueError, match="pass virtual_stages=1"):
        ideal_bubble_fraction(2, 4, 2, zero_bubble=True)


def _without(schedule: Schedule, rank: int, *names: str) -> List[Action]:
    return [a for a in schedule.actions[rank] if str(a) not in names]


def test_validator_reports_a_split_backward_that_is_incomplete_or_out_of_order():
    s = build_schedule("zbh1", 2, 3)
    with pytest.raises(ScheduleError, match=r"missing '1W2' on rank 1: '1I2' computed only the input gradient"):
        validate_schedule(_replace_rank(s, 1, _without(s, 1, "1W2")))
    with pytest.raises(ScheduleError, match=r"missing '1I2' on rank 1: '1W2' needs the input-gradient part I"):
        validate_schedule(_replace_rank(s, 1, _without(s, 1, "1I2", "1SEND_B2")))
    with pytest.raises(ScheduleError, match=r"'1B2' and '1I2' both appear on rank 1: a backward is either one full B"):
        validate_schedule(_replace_rank(s, 1, list(s.actions[1]) + [Action(B, 1, 2)]))
    # W before its I on the same rank.
    swapped = [Action(W, 0, 0) if str(a) == "0I0" else Action(I, 0, 0) if str(a) == "0W0" else a for a in s.actions[0]]
    with pytest.raises(ScheduleError, match=r"'0I0' \(#\d+\) must come before '0W0' \(#\d+\): a weight gradient W"):
        validate_schedule(_replace_rank(s, 0, swapped))
    # An input gradient sent before the I that makes it.
    late = _without(s, 1, "1SEND_B0")
    late.insert(late.index(Action(I, 1, 0)), Action(Op.SEND_GRAD, 1, 0, 0))
    with pytest.raises(ScheduleError, match=r"'1I0' \(#\d+\) must come before '1SEND_B0'"):
        validate_schedule(_replace_rank(s, 1, late))
    forward_only = build_schedule("zbh1", 2, 1, forward_only=True)
    with pytest.raises(ScheduleError, match="forward_only schedule has no backward"):
        validate_schedule(_replace_rank(forward_only, 0, list(forward_only.actions[0]) + [Action(W, 0, 0)]))


def test_lowering_keeps_a_hand_made_split_order_and_sends_nothing_for_w():
    # A split backward without ZB-H1's deferral (each W right after its I) lowers and validates too.
    s = build_schedule("1f1b", 3, 4)
    def split(a: Action) -> Tuple[Action, ...]:
        return (Action(I, a.stage, a.microbatch), Action(W, a.stage, a.microbatch)) if a.op is B else (a,)

    actions = tuple(tuple(x for a in acts for x in split(a)) for acts in s.actions)
    lowered = lower(dataclasses.replace(s, name="split-1f1b", actions=actions))
    validate_schedule(lowered)
    assert [sorted(str(a) for a in acts if not a.op.is_compute) for acts in lowered.actions] == [
        sorted(str(a) for a in acts if not a.op.is_compute) for acts in s.actions
    ]
    # The input gradient leaves after I, before W: never later than 1F1B's after B.
    assert max(e.end for r in simulate(lowered) for e in r) <= max(e.end for r in simulate(s) for e in r)


# --------------------------------------------------------------------------- data model and errors


def test_action_notation_and_checks():
    assert str(Action(F, 1, 3)) == "1F3"
    assert str(Action(Op.SEND_ACT, 1, 3, peer=2)) == "1SEND_F3"
    assert str(Action(Op.RECV_GRAD, 2, 0, peer=3)) == "2RECV_B0"
    assert Action("B", 0, 0).op is Op.BACKWARD
    assert (str(Action(I, 1, 3)), str(Action(W, 1, 3))) == ("1I3", "1W3")
    assert Action("I", 0, 0).op is Op.BACKWARD_INPUT and Action("W", 0, 0).op is Op.BACKWARD_WEIGHT
    assert all(op.is_compute and op.is_backward for op in (B, I, W)) and not F.is_backward
    assert [op.makes_input_grad for op in (F, B, I, W)] == [False, True, True, False]
    assert [op.releases_activations for op in (F, B, I, W)] == [False, True, False, True]
    with pytest.raises(ValueError, match="leave peer=None"):
        Action(W, 0, 0, peer=1)
    with pytest.raises(ValueError, match="needs peer"):
        Action(Op.SEND_GRAD, 1, 0)
    with pytest.raises(ValueError, match="leave peer=None"):
        Action(F, 0, 0, peer=1)
    with pytest.raises(ValueError, match="microbatch must be an int >= 0"):
        Action(F, 0, -1)


def test_schedule_placement():
    s = build_schedule("interleaved1f1b", 4, 4, virtual_stages=3)
    assert s.num_stages == 12
    assert s.stage_to_rank(9) == 1
    assert s.stages_of_rank(1) == (1, 5, 9)
    with pytest.raises(ValueError, match="stages 0..11"):
        s.stage_to_rank(12)
    with pytest.raises(ValueError, match="one list per pipeline rank"):
        Schedule("x", 2, 1, 1, False, ((),))
    assert s.format().splitlines()[0].startswith("rank 0: 0F0 0SEND_F0")


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (
            ("zero-bubble", 2, 2),
            {},
            "Unknown pipeline schedule 'zero-bubble'. Choose one of: gpipe, 1f1b, interleaved1f1b, zbh1",
        ),
        (("1f1b", 0, 2), {}, r"pp_size must be a positive int \(the number of pipeline ranks\), got 0"),
        (("1f1b", 2, 0), {}, "num_microbatches must be a positive int"),
        (("1f1b", 2, 2.0), {}, "num_microbatches must be a positive int"),
        (("gpipe", 2, 2), {"virtual_stages": 0}, "virtual_stages must be a positive int"),
        (("1f1b", 2, 2), {"virtual_stages": 2}, "use schedule='interleaved1f1b' for virtual stages"),
        (("interleaved1f1b", 2, 2), {}, "interleaved1f1b needs virtual_stages >= 2"),
        (("zbh1", 2, 2), {"virtual_stages": 2}, "zbh1 runs one stage per rank"),
    ],
)
def test_build_schedule_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(*args, **kwargs)


def test_public_names_resolve():
    namespace: Dict[str, object] = {}
    exec("from lightning_pp.pipeline.schedules import *", namespace)
    assert set(schedules_module.__all__) <= set(namespace)
    assert schedules_module.simulate is simulate
    with pytest.raises(AttributeError):
        schedules_module.no_such_name  # noqa: B018
