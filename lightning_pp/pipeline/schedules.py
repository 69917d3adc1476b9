"""Pipeline schedules as data: per-rank action lists built from a name.

A schedule says, for every pipeline rank, which forward (``F``), backward (``B``,
or its input part ``I`` and weight part ``W`` in the zero-bubble schedule),
send and receive to run, in order. It is plain data, so it can be built, printed,
validated and timed without a process group or a device; the engine only walks it.
Actions print like torch's notation: ``1F3`` is stage 1's forward of microbatch 3,
``1SEND_F3`` sends its output on, ``2RECV_B0`` receives the gradient of stage 2's
output for microbatch 0.

Stages are placed round-robin ("looping"): stage ``s`` lives on pipeline rank
``s % pp_size``, so with ``virtual_stages=v`` rank ``r`` holds stages
``r, r + p, ..., r + (v - 1) p``. 1F1B and GPipe at ``pp_size=4,
num_microbatches=6`` (a digit is a forward of that microbatch, ``k=`` its
backward, F = 1 tick, B = 2; from :func:`simulate`)::

    1F1B   rank 0 |0123......0=41=52=.3=.4=.5=|   holds <= 4 microbatches
           rank 1 |.012....0=31=42=53=.4=.5=..|
           rank 2 |..01..0=21=32=43=54=.5=....|
           rank 3 |...00=11=22=33=44=55=......|
    GPipe  rank 0 |012345.........0=1=2=3=4=5=|   holds all 6
           rank 3 |...0123450=1=2=3=4=5=......|

ZB-H1 ("zbh1", Qi et al. 2023) splits each backward into ``I`` (the input
gradient, which the previous stage waits for: letter ``a`` for microbatch 0, ...)
and ``W`` (the weight gradients, which nothing waits for: ``A``, ...), each half
of ``B``, and runs owed ``W`` where 1F1B waits. Same work, 1F1B's peak memory
(4 microbatches; on every rank now, as on 1F1B's rank 0), a third of the bubble::

    ZB-H1  rank 0 |0123...aA4bB5cCdDeEfF|   holds <= 4 microbatches
           rank 1 |.012..a3bA4cB5dCeDfEF|
           rank 2 |..01.a2b3cA4dB5eCfDEF|
           rank 3 |...0a1b2c3dA4eB5fCDEF|

Building runs in two steps: a compute-only order per rank (GPipe, 1F1B,
Megatron's interleaved 1F1B or ZB-H1), then :func:`lower`, which inserts the
sends and receives and orders them so that the step completes even when every
send waits for its receiver. That is the case on XCCL, whose ``isend`` busy-polls until the
receive is posted: SGLang's XPU pipeline livelocked with every rank sending first
(PR 23645), and torch's ``Schedule1F1B`` does the same at pp=2..4. Even ranks
send first and odd ranks receive first wherever that is safe (see :func:`lower`
for where it is not), and :func:`validate_schedule` replays every schedule under
that blocking model before anyone runs it.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from lightning_pp.pipeline.actions import (
    Action,
    Op,
    Schedule,
    ScheduleError,
    check_sizes,
)
from lightning_pp.pipeline.simulation import (
    TimedAction,
    bubble_fraction,
    ideal_bubble_fraction,
    peak_live_activations,
    simulate,
    validate_schedule,
)

__all__ = [
    "SCHEDULES",
    "Action",
    "Op",
    "Schedule",
    "ScheduleError",
    "TimedAction",
    "bubble_fraction",
    "build_schedule",
    "ideal_bubble_fraction",
    "lower",
    "normalise_schedule_name",
    "peak_live_activations",
    "simulate",
    "validate_schedule",
]

#: Canonical schedule names; :func:`build_schedule` also accepts any case and ``_``/``-``.
SCHEDULES: Tuple[str, ...] = ("gpipe", "1f1b", "interleaved1f1b", "zbh1")


def normalise_schedule_name(name: str) -> str:
    """The canonical name of a schedule (``"1F1B"``, ``"interleaved_1f1b"``, ``"ZB-H1"`` -> ``"1f1b"``, ...)."""
    key = str(name).lower().replace("_", "").replace("-", "").replace(" ", "")
    if key not in SCHEDULES:
        raise ValueError(
            f"Unknown pipeline schedule {name!r}. Choose one of: {', '.join(SCHEDULES)} "
            "(any case; '_' and '-' ignored)."
        )
    return key


def build_schedule(
    name: str,
    pp_size: int,
    num_microbatches: int,
    *,
    virtual_stages: int = 1,
    forward_only: bool = False,
) -> Schedule:
    """Builds, lowers (with parity ordering) and validates a named schedule.

    Args:
        name: ``"gpipe"``, ``"1f1b"``, ``"interleaved1f1b"`` or ``"zbh1"`` (any case;
            ``_`` and ``-`` ignored).
        pp_size: Number of pipeline ranks.
        num_microbatches: Microbatches per step.
        virtual_stages: Stages per rank; must be 1 for gpipe/1f1b/zbh1, >= 2 for interleaved1f1b.
        forward_only: Emit forwards only (validation, inference). All schedules then
            run the same forward order.

    Returns:
        A :class:`Schedule` that passed :func:`validate_schedule`.

    Raises:
        ValueError: Unknown name or sizes that do not fit the schedule.
        ScheduleError: Not expected for valid input; it would mean the builder
            made a schedule that fails :func:`validate_schedule`.
    """
    key = normalise_schedule_name(name)
    check_sizes(pp_size, num_microbatches, virtual_stages)
    if key == "interleaved1f1b" and virtual_stages < 2:
        raise ValueError(
            f"interleaved1f1b needs virtual_stages >= 2, got {virtual_stages}: "
            "pass virtual_stages=2 (or more), or use schedule='1f1b'"
        )
    if key != "interleaved1f1b" and virtual_stages != 1:
        raise ValueError(
            f"{key} runs one stage per rank, got virtual_stages={virtual_stages}: "
            "use schedule='interleaved1f1b' for virtual stages, or virtual_stages=1"
        )
    orders = [
        _compute_order(key, pp_size, num_microbatches, virtual_stages, rank, forward_only)
        for rank in range(pp_size)
    ]
    actions = tuple(tuple(order) for order in orders)
    schedule = lower(Schedule(key, pp_size, num_microbatches, virtual_stages, forward_only, actions))
    validate_schedule(schedule)
    return schedule


def _compute_order(key: str, p: int, m: int, v: int, rank: int, forward_only: bool) -> List[Action]:
    """Compute-only action order of one rank; see :func:`build_schedule`.

    GPipe: every forward, then every backward (ascending; same makespan as
    descending, and it frees microbatch 0 first). 1F1B (PipeDream-flush): rank r
    runs ``min(p - 1 - r, m)`` warm-up forwards, then alternates F/B, then drains::

        rank 0 |F0 F1 F2 F3 B0 F4 B1 F5 B2 .. B5|   p=4: warm-up 3
        rank 3 |         F0 B0 F1 B1 F2 B2 ..   |   last rank: warm-up 0

    Interleaved (Megatron's virtual pipeline): forwards walk the microbatches in
    groups of p, each group through chunk 0, then chunk 1, ...; backwards walk the
    same table with chunks reversed; rank r warms up with ``2 (p - 1 - r) + (v - 1) g``
    forwards, g the largest group. For ``m % p == 0`` that is Megatron's order
    (g = p). Otherwise the remainder joins the last group (g = p + m % p; one
    group of m when m < p), and the warm-up keeps every backward behind its
    forward: with a short group of its own, pp=4, m=5, v=3 hangs (``8F4`` waits
    on ``7F4``, behind ``7B0``, which waits on ``8B0``, behind ``8F4``).
    """
    if key == "zbh1":
        return _zbh1_order(p, m, rank, forward_only)
    if key == "interleaved1f1b":
        bounds = list(range(0, m, p))[: max(1, m // p)] + [m]  # a short last group joins the one before
        table = [(c, k) for g, h in zip(bounds, bounds[1:]) for c in range(v) for k in range(g, h)]
        forwards = [Action(Op.FORWARD, c * p + rank, k) for c, k in table]
        backwards = [Action(Op.BACKWARD, (v - 1 - c) * p + rank, k) for c, k in table]
        warmup = min(2 * (p - 1 - rank) + (v - 1) * (bounds[-1] - bounds[-2]), m * v)
    else:
        forwards = [Action(Op.FORWARD, rank, k) for k in range(m)]
        backwards = [Action(Op.BACKWARD, rank, k) for k in range(m)]
        warmup = m if key == "gpipe" else min(p - 1 - rank, m)
    if forward_only:
        return forwards
    order = forwards[:warmup]
    for i in range(len(forwards) - warmup):  # steady state: one forward, one backward
        order += [forwards[warmup + i], backwards[i]]
    return order + backwards[len(forwards) - warmup :]


def _zbh1_order(p: int, m: int, rank: int, forward_only: bool) -> List[Action]:
    """ZB-H1's compute order on one rank (Qi et al. 2023, "Zero Bubble Pipeline Parallelism").

    1F1B with each backward split into ``I`` (input gradient, which the previous
    stage waits for) and ``W`` (weight gradients, which nothing waits for). Rank r
    warms up with 1F1B's ``min(p - 1 - r, m)`` forwards and then repeats
    ``F I W``, except that it holds back its first r ``W``: gradients then travel
    up the pipeline at the pace of ``I`` alone, and a rank that would wait for one
    in the drain runs an owed ``W`` instead. Draining, each ``I`` is followed by the
    oldest owed ``W``; the rest close the step. pp=4::

        rank 0 |F0 F1 F2 F3 I0 W0 F4 I1 W1 ...|   warm-up 3, no W held back
        rank 3 |F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 ...|   3 W held back

    Activations live from ``F`` to ``W``: after warm-up, F count minus W count is
    ``p - 1 - r + 1 + r = p`` on every rank, 1F1B's peak (on its rank 0). With
    ``F = I = W`` the step takes ``3m + p - 1`` ticks for ``m >= p``, against
    1F1B's ``3(m + p - 1)``: a third of the bubble, as in the paper.
    """
    forwards = [Action(Op.FORWARD, rank, k) for k in range(m)]
    if forward_only:
        return forwards
    warmup = min(p - 1 - rank, m)
    order = forwards[:warmup]
    owed: List[int] = []  # microbatches whose I ran and whose W did not, oldest first

    def input_grad(k: int) -> None:
        order.append(Action(Op.BACKWARD_INPUT, rank, k))
        owed.append(k)

    def weight_grad() -> None:
        order.append(Action(Op.BACKWARD_WEIGHT, rank, owed.pop(0)))

    for i in range(m - warmup):  # steady state: F, I and, once r W are held back, W
        order.append(forwards[warmup + i])
        input_grad(i)
        if i >= rank:
            weight_grad()
    for k in range(m - warmup, m):  # drain: each I, then the oldest owed W
        input_grad(k)
        weight_grad()
    return order + [Action(Op.BACKWARD_WEIGHT, rank, k) for k in owed]


def lower(schedule: Schedule, *, parity: bool = True) -> Schedule:
    """Returns ``schedule`` with communication (re)inserted around its compute actions.

    Existing comm actions are dropped first. Each compute action gets the receive
    it needs and owes a send (none between stages on one rank, ``pp_size == 1``).
    When sends wait for their receivers, the order of comm ops decides whether the
    step finishes at all, and "even ranks send first, odd ranks receive first" is
    not enough on its own: in GPipe at pp >= 3 rank 1 must run ``1SEND_F1`` before
    rank 2 can run ``2B0`` and answer ``1RECV_B0``, so receiving first hangs; and
    interleaved 1F1B needs some sends held back past the next compute. So:

    1. Time the compute order with buffered messages (F = 1 tick, B = 2, I = W = 1).
    2. Give each message one instant in that plan when neither rank computes:
       preferably in the receiver's last gap before the consumer, as early as
       possible (receive right before the consumer, send right after the
       producer); else anywhere between producer and consumer; else, when no such
       instant exists, the consumer's start (the sender finishes its current
       compute first; the only case that costs time).
    3. Each rank runs its comm ops in the gap holding their instant, sorted by
       (instant, sender parity, ...) -- the same key at both ends, so every rank
       meets its messages in one global order and no cycle of waiting ranks can
       form. At equal instants messages from even ranks go first: even ranks send
       first, odd ranks receive first, as in 1F1B's steady state::

           rank 0 (even) ... 0F1 | 0SEND_F1 0RECV_B0 | 0B0 ...
           rank 1 (odd)  ... 1B0 | 1RECV_F1 1SEND_B0 | 1F1 ...

    The result completes under blocking sends for every compute order that
    completes with buffered ones, and replays the buffered plan's timing exactly
    unless step 2 had to fall back.

    Args:
        schedule: Any schedule; only its compute order is used.
        parity: Order as above (the default). ``False`` puts each receive right
            before its consumer and each send right after its producer, sends
            first, as torch's ``Schedule1F1B`` does; tests use it to show that
            :func:`validate_schedule` catches the deadlock that follows.
    """
    p, last = schedule.pp_size, schedule.num_stages - 1
    computes = [[a for a in rank_actions if a.op.is_compute] for rank_actions in schedule.actions]
    plan = _buffered_plan(computes, last) if parity else None
    instant = _message_instants(computes, plan, p, last) if plan else {}
    lowered = []
    for rank, compute in enumerate(computes):
        starts = [plan[0][_key_of(c)] for c in compute] if plan else []
        slots: List[List[Tuple[Tuple[Any, ...], Action]]] = [[] for _ in range(len(compute) + 1)]
        for j, action in enumerate(compute):
            for comm in _comm_of(action, rank, p, last):
                message = _message_of(comm)
                if message not in instant:  # naive: right next to its compute, sends before receives
                    slots[j + comm.op.is_send].append(((comm.op.is_recv,), comm))
                    continue
                t = instant[message]
                # Both ends sort by the same key, so all ranks meet their messages in one
                # global order; at equal instants, messages from even ranks go first.
                sender = _sender(message, p)
                key = (t, sender % 2, sender, message)
                slot = bisect.bisect_left(starts, t)
                slots[min(slot, j) if comm.op.is_recv else max(slot, j + 1)].append((key, comm))
        out: List[Action] = []
        for j, slot_comms in enumerate(slots):
            out += [comm for _, comm in sorted(slot_comms, key=lambda item: item[0])]
            out += compute[j : j + 1]
        lowered.append(tuple(out))
    return dataclasses.replace(schedule, actions=tuple(lowered))


Key = Tuple[Op, int, int]


def _key_of(action: Action) -> Key:
    return (action.op, action.stage, action.microbatch)


def _message_of(comm: Action) -> Key:
    """Names a message by its send, so that both of its ends agree."""
    if comm.op is Op.RECV_ACT:
        return (Op.SEND_ACT, comm.stage - 1, comm.microbatch)
    if comm.op is Op.RECV_GRAD:
        return (Op.SEND_GRAD, comm.stage + 1, comm.microbatch)
    return _key_of(comm)


def _sender(message: Key, p: int) -> int:
    return message[1] % p


def _comm_of(action: Action, rank: int, p: int, last: int) -> List[Action]:
    """The receive ``action`` needs and the send it owes, when the other side is another rank."""
    s, k = action.stage, action.microbatch
    prev, nxt = (s - 1) % p, (s + 1) % p
    if action.op is Op.BACKWARD_WEIGHT:  # local: its input came with the I before it
        return []
    if action.op is Op.FORWARD:
        recv = [Action(Op.RECV_ACT, s, k, prev)] if s > 0 and prev != rank else []
        return recv + ([Action(Op.SEND_ACT, s, k, nxt)] if s < last and nxt != rank else [])
    recv = [Action(Op.RECV_GRAD, s, k, nxt)] if s < last and nxt != rank else []
    return recv + ([Action(Op.SEND_GRAD, s, k, prev)] if s > 0 and prev != rank else [])


def _consumer(message: Key, known: Dict[Key, int]) -> Key:
    """The compute action that needs ``message``: a forward, or a ``B`` (``I`` when the backward is split)."""
    op, s, k = message
    if op is Op.SEND_ACT:
        return (Op.FORWARD, s + 1, k)
    full = (Op.BACKWARD, s - 1, k)
    return full if full in known else (Op.BACKWARD_INPUT, s - 1, k)


#: Ticks of each compute op in the buffered plan that places messages.
_TICKS = {Op.FORWARD: 1.0, Op.BACKWARD: 2.0, Op.BACKWARD_INPUT: 1.0, Op.BACKWARD_WEIGHT: 1.0}


def _buffered_plan(computes: List[List[Action]], last: int) -> Optional[Tuple[Dict[Key, float], Dict[Key, float]]]:
    """Start and end of every compute action (F = 1, B = 2, I = W = 1) when messages never wait.

    ``None`` if the order cannot run even so; lowering then stays naive and the
    validator explains what is wrong.
    """
    start: Dict[Key, float] = {}
    end: Dict[Key, float] = {}
    pos, free = [0] * len(computes), [0.0] * len(computes)
    moved = True
    while moved:
        moved = False
        for rank, compute in enumerate(computes):
            while pos[rank] < len(compute):
                a = compute[pos[rank]]
                s, k = a.stage, a.microbatch
                dep: Optional[Key]
                if a.op is Op.FORWARD:
                    dep = (Op.FORWARD, s - 1, k) if s > 0 else None
                elif a.op is Op.BACKWARD_WEIGHT:
                    dep = (Op.BACKWARD_INPUT, s, k)
                elif s == last:
                    dep = (Op.FORWARD, s, k)
                else:  # the next stage's B, or its I where the backward is split
                    dep = (Op.BACKWARD, s + 1, k)
                    if dep not in end:
                        dep = (Op.BACKWARD_INPUT, s + 1, k)
                if dep is not None and dep not in end:
                    break
                start[_key_of(a)] = max(free[rank], end[dep] if dep else 0.0)
                free[rank] = end[_key_of(a)] = start[_key_of(a)] + _TICKS[a.op]
                pos[rank] += 1
                moved = True
    return (start, end) if all(pos[r] == len(c) for r, c in enumerate(computes)) else None


def _message_instants(
    computes: List[List[Action]], plan: Tuple[Dict[Key, float], Dict[Key, float]], p: int, last: int
) -> Dict[Key, float]:
    """When, on the buffered plan, each message should change hands.

    Preferably at an instant when neither rank computes, inside the receiver's
    last gap before the consumer (so the receive sits right before it), and as
    early as possible (so the send follows its producer); else anywhere between
    producer and consumer (the receive moves up); else when the consumer starts
    (the send waits behind the sender's current compute: the only case that
    costs time).
    """
    start, end = plan
    spans = [([start[_key_of(c)] for c in compute], [end[_key_of(c)] for c in compute]) for compute in computes]
    rank_of = {_key_of(c): r for r, compute in enumerate(computes) for c in compute}

    def free_from(rank: int, t: float) -> float:
        starts, ends = spans[rank]
        i = bisect.bisect_right(starts, t) - 1
        return ends[i] if i >= 0 and starts[i] < t < ends[i] else t

    def common_free(a: int, b: int, t: float, until: float) -> Optional[float]:
        while t <= until:
            t_b = free_from(b, t)
            t_a = free_from(a, t_b)
            if t_a == t_b:
                return t_a if t_a <= until else None
            t = t_a
        return None

    instants: Dict[Key, float] = {}
    for sender, compute in enumerate(computes):
        for producer in compute:
            for comm in _comm_of(producer, sender, p, last):
                consumer = _consumer(_key_of(comm), rank_of)
                if not comm.op.is_send or consumer not in rank_of:
                    continue
                receiver, ready, needed = rank_of[consumer], end[_key_of(producer)], start[consumer]
                index = bisect.bisect_left(spans[receiver][0], needed)
                gap_opens = spans[receiver][1][index - 1] if index else 0.0
                t = common_free(sender, receiver, max(ready, gap_opens), needed)
                if t is None:
                    t = common_free(sender, receiver, ready, needed)
                instants[_key_of(comm)] = needed if t is None else t
    return instants
