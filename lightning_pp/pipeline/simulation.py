"""Checking and timing schedules without running them.

:func:`validate_schedule` is the gate every schedule passes before the engine
walks it: static checks (each forward and backward once -- a backward is one
``B`` or an ``I`` then a ``W`` -- on the rank that holds its stage, in
data-dependency order; every send matched by one receive, pairwise in FIFO
order), then a replay in which every send and every receive is a
blocking rendezvous -- the strictest backend there is (XCCL's ``isend``
busy-polls until the receive is posted). A schedule that completes under that
model completes under any buffering.

:func:`simulate` replays with durations and returns a timeline, from which
:func:`bubble_fraction` measures idle time; :func:`peak_live_activations` counts
the activations each rank must hold.
"""

from __future__ import annotations

import collections
from typing import Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

from lightning_pp.pipeline.actions import (
    Action,
    Op,
    Schedule,
    ScheduleError,
    check_sizes,
)

__all__ = [
    "TimedAction",
    "bubble_fraction",
    "ideal_bubble_fraction",
    "peak_live_activations",
    "simulate",
    "validate_schedule",
]

_MAX_PROBLEMS = 12  # reported per error; the first few are what a reader fixes


class TimedAction(NamedTuple):
    """One executed action of a simulated (or traced) run, ``end - start`` long."""

    start: float
    end: float
    action: Action


def _key(op: Op, stage: int, microbatch: int) -> str:
    return f"{stage}{op.value}{microbatch}"


def _pairs(a: Action, b: Action) -> bool:
    """Whether ``a`` and ``b`` are the two ends of one message (either order)."""
    send, recv = (a, b) if a.op.is_send else (b, a)
    if not (send.op.is_send and recv.op.is_recv) or send.microbatch != recv.microbatch:
        return False
    if send.op is Op.SEND_ACT:
        return recv.op is Op.RECV_ACT and recv.stage == send.stage + 1
    return recv.op is Op.RECV_GRAD and recv.stage == send.stage - 1


def validate_schedule(schedule: Schedule) -> None:
    """Raises :class:`ScheduleError` unless ``schedule`` is complete, ordered and deadlock-free.

    Checks, without any process group:

    * every action's stage and microbatch exist and its stage lives on that rank;
      comm actions name the right peer and have something to carry;
    * every ``F(s, k)`` appears exactly once and, unless forward-only, so does its
      backward: either one ``B(s, k)``, or one ``I(s, k)`` (input gradient) and one
      ``W(s, k)`` (weight gradients), never both kinds;
    * on each rank ``F(s, k)`` precedes ``B(s, k)`` / ``I(s, k)``, and ``I(s, k)``
      precedes ``W(s, k)`` (W reuses the graph I kept); an input arriving from
      another rank is received before the compute that uses it and a result is
      sent after the compute that makes it (an input gradient after ``B`` or
      ``I``); stages sharing a rank (``pp_size == 1``) run ``F(s-1, k)`` before
      ``F(s, k)`` and ``B(s+1, k)`` before ``B(s, k)`` (``I`` likewise);
    * between each ordered pair of ranks, the n-th send matches the n-th receive;
    * the schedule completes when every send and receive blocks until its
      partner is reached; otherwise the error shows where each rank is stuck.
    """
    _check_static(schedule)
    _replay(schedule, blocking_send=True)


def _check_static(schedule: Schedule) -> None:
    problems = _static_problems(schedule)
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        raise ScheduleError(
            f"{_describe(schedule)} is invalid:\n  - "
            + "\n  - ".join(problems[:_MAX_PROBLEMS])
            + (f"\n  ... and {more} more" if more > 0 else "")
        )


def _describe(schedule: Schedule) -> str:
    return (
        f"schedule {schedule.name!r} (pp_size={schedule.pp_size}, num_microbatches="
        f"{schedule.num_microbatches}, virtual_stages={schedule.virtual_stages})"
    )


def _static_problems(schedule: Schedule) -> List[str]:
    p, m, last = schedule.pp_size, schedule.num_microbatches, schedule.num_stages - 1
    problems: List[str] = []
    where: Dict[Tuple[Op, int, int], List[Tuple[int, int]]] = collections.defaultdict(list)
    sent: Dict[Tuple[int, int], List[Action]] = collections.defaultdict(list)
    received: Dict[Tuple[int, int], List[Action]] = collections.defaultdict(list)
    for rank, actions in enumerate(schedule.actions):
        for i, a in enumerate(actions):
            at = f"rank {rank} action #{i} '{a}'"
            if a.stage > last or a.microbatch >= m:
                problems.append(f"{at}: out of range; stages are 0..{last}, microbatches 0..{m - 1}")
                continue
            if a.stage % p != rank:
                problems.append(f"{at}: stage {a.stage} lives on rank {a.stage % p} (stage s on rank s % pp_size)")
                continue
            if schedule.forward_only and (a.op.is_backward or a.op in (Op.SEND_GRAD, Op.RECV_GRAD)):
                problems.append(f"{at}: a forward_only schedule has no backward or gradient traffic; remove it")
                continue
            if not a.op.is_compute:
                other = a.stage + (1 if a.op in (Op.SEND_ACT, Op.RECV_GRAD) else -1)
                if not 0 <= other <= last or other % p == rank:
                    why = "does not exist" if not 0 <= other <= last else "is on the same rank"
                    problems.append(f"{at}: nothing to carry, stage {other} {why}; remove it")
                    continue
                if a.peer != other % p:
                    problems.append(f"{at}: peer must be rank {other % p} (holder of stage {other}), got {a.peer}")
                    continue
                if a.op.is_send:
                    sent[(rank, other % p)].append(a)
                else:
                    received[(other % p, rank)].append(a)
            where[(a.op, a.stage, a.microbatch)].append((rank, i))
    for (op, s, k), places in where.items():
        if len(places) > 1:
            spots = ", ".join(f"rank {r} #{i}" for r, i in places)
            problems.append(f"'{_key(op, s, k)}' appears {len(places)} times ({spots}); it must appear once")

    def index(op: Op, s: int, k: int) -> Optional[int]:
        places = where.get((op, s, k))
        return places[0][1] if places else None

    def before(first: Tuple[Op, int, int], then: Tuple[Op, int, int], why: str, report_missing: bool) -> None:
        i, j = index(*first), index(*then)
        if i is None and report_missing:
            problems.append(f"missing '{_key(*first)}' on rank {first[1] % p}: {why}")
        elif i is not None and j is not None and i > j:
            problems.append(
                f"rank {then[1] % p}: '{_key(*first)}' (#{i}) must come before '{_key(*then)}' (#{j}): {why}"
            )

    def backward_of(s: int, k: int) -> Tuple[Op, int, int]:
        """The action making the input gradient of ``(s, k)``: its ``B``, or its ``I`` when split."""
        split = (Op.BACKWARD, s, k) not in where and (
            (Op.BACKWARD_INPUT, s, k) in where or (Op.BACKWARD_WEIGHT, s, k) in where
        )
        return (Op.BACKWARD_INPUT if split else Op.BACKWARD, s, k)

    for s in range(last + 1):
        for k in range(m):
            if index(Op.FORWARD, s, k) is None:
                problems.append(f"missing '{_key(Op.FORWARD, s, k)}' on rank {s % p}: each stage runs it exactly once")
            if not schedule.forward_only:
                problems += _backward_problems(where, s, k, p)
            F, B = (Op.FORWARD, s, k), backward_of(s, k)
            if s > 0 and (s - 1) % p == s % p:
                before((Op.FORWARD, s - 1, k), F, "a forward needs the previous stage's output", False)
            elif s > 0:
                before((Op.RECV_ACT, s, k), F, "a forward needs its input received first", True)
            if s < last and (s + 1) % p != s % p:
                before(F, (Op.SEND_ACT, s, k), "an output is sent after it is computed", True)
            if schedule.forward_only:
                continue
            before(F, B, "a backward needs its forward's activations", False)
            if B[0] is Op.BACKWARD_INPUT:
                before(B, (Op.BACKWARD_WEIGHT, s, k), "a weight gradient W reuses the graph its I kept", False)
            if s < last and (s + 1) % p == s % p:
                before(backward_of(s + 1, k), B, "a backward needs the next stage's gradient", False)
            elif s < last:
                before((Op.RECV_GRAD, s, k), B, "a backward needs its output gradient received first", True)
            if s > 0 and (s - 1) % p != s % p:
                before(B, (Op.SEND_GRAD, s, k), "an input gradient is sent after it is computed", True)
    for (src, dst) in sorted(set(sent) | set(received)):
        sends, recvs = sent[(src, dst)], received[(src, dst)]
        for n, (x, y) in enumerate(zip(sends, recvs)):
            if not _pairs(x, y):
                problems.append(
                    f"rank {src} -> rank {dst}, message #{n}: rank {src} sends '{x}' but rank {dst} expects '{y}'; "
                    f"messages between two ranks match in order, so order rank {dst}'s receives like the sends"
                )
                break
    return problems


def _backward_problems(where: Dict[Tuple[Op, int, int], List[Tuple[int, int]]], s: int, k: int, p: int) -> List[str]:
    """What is wrong with the backward of stage ``s``, microbatch ``k``: one ``B``, or one ``I`` and one ``W``."""
    full, inp, weight = ((op, s, k) in where for op in (Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT))
    b, i, w = (_key(op, s, k) for op in (Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT))
    if full and (inp or weight):
        return [
            f"'{b}' and '{i if inp else w}' both appear on rank {s % p}: a backward is either one full B, or an "
            f"input part I then a weight part W; keep one form"
        ]
    if inp and not weight:
        return [f"missing '{w}' on rank {s % p}: '{i}' computed only the input gradient; add its W after it"]
    if weight and not inp:
        return [f"missing '{i}' on rank {s % p}: '{w}' needs the input-gradient part I before it"]
    if not (full or inp):
        return [f"missing '{b}' on rank {s % p}: each stage runs it exactly once (whole, or split as I then W)"]
    return []


def _replay(
    schedule: Schedule,
    *,
    blocking_send: bool,
    forward_time: float = 0.0,
    backward_time: float = 0.0,
    weight_time: float = 0.0,
    comm_time: float = 0.0,
) -> List[List[TimedAction]]:
    """Executes ``schedule`` on simulated ranks; raises :class:`ScheduleError` on deadlock.

    Assumes the static checks passed. With ``blocking_send`` a send and its receive
    form a rendezvous: both start when the later of the two ranks arrives and both
    take ``comm_time``. Otherwise a send returns at once and its receive finishes
    no earlier than ``comm_time`` after the send was posted. A split backward takes
    ``backward_time - weight_time`` for ``I`` and ``weight_time`` for ``W``.
    """
    actions, p = schedule.actions, schedule.pp_size
    duration = {
        Op.FORWARD: forward_time,
        Op.BACKWARD: backward_time,
        Op.BACKWARD_INPUT: backward_time - weight_time,
        Op.BACKWARD_WEIGHT: weight_time,
    }
    pos, clock = [0] * p, [0.0] * p
    timeline: List[List[TimedAction]] = [[] for _ in range(p)]
    in_flight: Dict[Tuple[int, int], Deque[float]] = collections.defaultdict(collections.deque)
    runnable = collections.deque(range(p))

    def finish(rank: int, start: float, end: float) -> None:
        timeline[rank].append(TimedAction(start, end, actions[rank][pos[rank]]))
        pos[rank] += 1
        clock[rank] = end

    # Whoever reaches a rendezvous second completes it and wakes the other rank, so
    # each rank is (re)visited only when it can move: linear in the number of actions.
    while runnable:
        rank = runnable.popleft()
        while pos[rank] < len(actions[rank]):
            a = actions[rank][pos[rank]]
            if a.op.is_compute:
                finish(rank, clock[rank], clock[rank] + duration[a.op])
                continue
            peer = a.peer
            assert peer is not None  # Action.__post_init__ guarantees it for comm ops
            if blocking_send:
                b = actions[peer][pos[peer]] if pos[peer] < len(actions[peer]) else None
                if b is None or b.peer != rank or not _pairs(a, b):
                    break
                start = max(clock[rank], clock[peer])
                finish(rank, start, start + comm_time)
                finish(peer, start, start + comm_time)
                runnable.append(peer)
            elif a.op.is_send:
                in_flight[(rank, peer)].append(clock[rank] + comm_time)
                finish(rank, clock[rank], clock[rank])
                runnable.append(peer)
            elif in_flight[(peer, rank)]:
                finish(rank, clock[rank], max(clock[rank], in_flight[(peer, rank)].popleft()))
            else:
                break
    if any(pos[r] < len(actions[r]) for r in range(p)):
        raise ScheduleError(_deadlock_message(schedule, pos, blocking_send))
    return timeline


def _deadlock_message(schedule: Schedule, pos: Sequence[int], blocking_send: bool) -> str:
    lines = []
    for rank, actions in enumerate(schedule.actions):
        if pos[rank] == len(actions):
            lines.append(f"rank {rank}: finished")
            continue
        a = actions[pos[rank]]
        peer_at = "has finished"
        if a.peer is not None and pos[a.peer] < len(schedule.actions[a.peer]):
            peer_at = f"is at #{pos[a.peer]} '{schedule.actions[a.peer][pos[a.peer]]}'"
        lines.append(f"rank {rank}: blocked at #{pos[rank]} '{a}' waiting for rank {a.peer}, which {peer_at}")
    model = "every send waits for its matching receive" if blocking_send else "sends are buffered"
    return (
        f"{_describe(schedule)} deadlocks when {model}:\n  "
        + "\n  ".join(lines)
        + "\nRanks that both send to each other before receiving wait forever: lower the schedule with "
        "parity ordering (lower(schedule, parity=True): even ranks send first, odd ranks receive first) "
        "or reorder its compute actions."
    )


def simulate(
    schedule: Schedule,
    *,
    forward_time: float = 1.0,
    backward_time: float = 2.0,
    weight_time: Optional[float] = None,
    comm_time: float = 0.0,
    blocking_send: bool = True,
) -> List[List[TimedAction]]:
    """Times ``schedule`` on ideal ranks and returns each rank's executed actions.

    Every action starts as soon as its rank is free and its data is there. With
    ``blocking_send=True`` (XCCL, NCCL) a send and its receive start together when
    both ranks have reached them; otherwise sends are posted and forgotten and a
    receive waits for the message. 1F1B at ``pp_size=2, num_microbatches=3``
    (digit: forward of that microbatch, ``k=``: its backward)::

        rank 0 |01..0=21=.2=|      makespan (m + p - 1)(F + B) = 12
        rank 1 |.00=11=22=..|

    Args:
        schedule: A schedule; its static checks run first, and a deadlock under
            the chosen model raises :class:`ScheduleError`.
        forward_time: Duration of one ``F`` action (one stage, one microbatch).
        backward_time: Duration of one whole backward: a ``B`` action, or an ``I``
            and its ``W`` together, so that schedules with and without a split
            backward are timed on the same work.
        weight_time: The part of ``backward_time`` that is the weight gradients:
            how long a ``W`` takes; ``I`` takes the rest. Default: half, which with
            the default times is the paper's ``F = I = W`` (= 1).
        comm_time: Duration of one send/receive pair.
        blocking_send: Whether a send waits for its receiver.

    Returns:
        ``timeline[r]`` lists :class:`TimedAction` ``(start, end, action)`` for rank
        ``r`` in execution order, comm actions included.
    """
    if weight_time is None:
        weight_time = backward_time / 2
    for name, value in (
        ("forward_time", forward_time),
        ("backward_time", backward_time),
        ("weight_time", weight_time),
        ("comm_time", comm_time),
    ):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if weight_time > backward_time:
        raise ValueError(
            f"weight_time={weight_time!r} exceeds backward_time={backward_time!r}: weight_time is the weight-gradient "
            "part of the whole backward, so pass weight_time <= backward_time"
        )
    _check_static(schedule)
    return _replay(
        schedule,
        blocking_send=blocking_send,
        forward_time=forward_time,
        backward_time=backward_time,
        weight_time=weight_time,
        comm_time=comm_time,
    )


def bubble_fraction(timeline: Sequence[Sequence[TimedAction]]) -> float:
    """Share of rank-time not spent computing: ``1 - busy / (num_ranks * makespan)``.

    Works on :func:`simulate` output and on measured traces converted to
    :class:`TimedAction`. Communication counts as idle.
    """
    events = [e for rank_events in timeline for e in rank_events]
    if not events:
        return 0.0
    span = max(e.end for e in events) - min(e.start for e in events)
    busy = sum(e.end - e.start for e in events if e.action.op.is_compute)
    return 0.0 if span <= 0 else 1.0 - busy / (len(timeline) * span)


def ideal_bubble_fraction(
    pp_size: int, num_microbatches: int, virtual_stages: int = 1, *, zero_bubble: bool = False
) -> float:
    """Textbook bubble ``(p - 1) / (v m + p - 1)`` of GPipe/1F1B (``v = 1``) and interleaving.

    This is idle time over total time, with a stage's work split evenly over its
    ``v`` chunks; for interleaving it is exact when ``m`` is a multiple of ``p``.
    With ``zero_bubble=True``, ZB-H1's ``(p - 1) / (3 m + p - 1)``: each rank idles
    ``(p - 1)(F + I - W)`` against 1F1B's ``(p - 1)(F + I + W)``, a third when
    ``F = I = W``, for which it is exact when ``m >= p``.
    """
    check_sizes(pp_size, num_microbatches, virtual_stages)
    if zero_bubble:
        if virtual_stages != 1:
            raise ValueError(
                f"zero_bubble is ZB-H1's bubble, one stage per rank: pass virtual_stages=1, got {virtual_stages}"
            )
        return (pp_size - 1) / (3 * num_microbatches + pp_size - 1)
    return (pp_size - 1) / (virtual_stages * num_microbatches + pp_size - 1)


def peak_live_activations(schedule: Schedule) -> Tuple[int, ...]:
    """Per rank, the most forwards at any time whose backward has not finished yet.

    That is how many microbatches' activations a rank must keep: ``m`` on every
    rank for GPipe, ``min(p - r, m)`` on rank ``r`` for 1F1B, ``min(p, m)`` on
    every rank for ZB-H1 (a split backward frees its activations at ``W``, not at
    ``I``). With virtual stages a unit is one chunk's activations. Forward-only
    schedules keep none (0).
    """
    peaks = []
    for actions in schedule.actions:
        live = peak = 0
        for a in actions:
            if schedule.forward_only:
                break
            live += 1 if a.op is Op.FORWARD else -1 if a.op.releases_activations else 0
            peak = max(peak, live)
        peaks.append(peak)
    return tuple(peaks)
