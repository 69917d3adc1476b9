"""Which sequences a slot's next forward carries: continuous batching within a batch of prompts.

The generator deals a batch's sequences into ``M`` slots (microbatches). Each
slot holds *lanes*, one sequence each; every forward of the slot advances the
sequence of every lane by one step (a prefill chunk or one decode token). With
``max_running=R`` at most ``R`` sequences are in flight, and the prompts are taken
longest ``max_new_tokens`` first (ties in dataset order): the first ``R`` are dealt
round-robin into the slots (slot ``j`` gets ``len(first_R[j::M])`` lanes), the
others wait. When a sequence finishes (EOS, a stop string, its
``max_new_tokens``), the next waiting prompt takes its lane in the slot's very
next forward: its first prefill chunk rides in the same forward as
the other lanes' decode tokens (the packed row layout mixes them), so a long
continuation holds back nobody but itself::

    R = 4, M = 2, equal max_new_tokens: slot 0 holds lanes for prompts 0 and 2, slot 1 for 1 and 3;
    4, 5, ... wait

    slot 0 step   0          1          2            3
    lane 0        p0 prefill p0 decode  p0 done
    lane 1        p2 prefill p2 decode  p2 decode    p2 decode
    lane 0'                                          p4 prefill   (admitted where p0 was)

Without a cap (``R = None``, the default) every prompt starts in step 0, as
before continuous batching existed. Slots refill only their own lanes, from the
one queue, so every slot keeps its share of the running sequences. Only the
first stage decides; the stages after it learn who came and who left from the
slot's next header (:class:`SlotMembers`), and the newcomer takes the leaver's
row of each layer's KV cache (:meth:`~lightning_pp.generation.kv_cache.KVCache.replace`),
so a full slot keeps reading its keys as a view of the slab.

Longest first is the classic rule for packing jobs of known lengths onto a fixed
number of machines: the short ones fill the gaps at the end, instead of a long
one admitted last running alone while the other lanes sit empty. With prompt
limits spread over 8..256 tokens and 16 lanes it takes the forwards from about 640 to
527 for 64 prompts (the ideal is the 526 that full lanes would take); with equal
limits it is dataset order. ``max_new_tokens`` is only a bound (EOS and stop
strings end sequences sooner), but the only one known up front.

A sequence's tokens do not depend on its lane, slot or forward: attention reads
its own keys only, and a sampled token's random number is a function of the
seed, the prompt's dataset index and the position. So the cap changes when a
prompt runs, never what it produces.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from lightning_pp.generation.chunking import ChunkPlanner

__all__ = ["ForwardPlan", "SequenceState", "SlotMembers", "SlotScheduler", "check_max_running", "plan_forward"]


@dataclass
class SequenceState:
    """One prompt (with, when scoring, its continuation) and what came back for it."""

    seq_id: int
    tokens: torch.Tensor  # host, pinned where useful: the prompt, then the continuation when scoring
    key: int  # its random stream: the prompt's dataset index
    max_new_tokens: int
    score_from: int = 0  # scoring: the continuation's first position (0: generating)
    stop: Optional[Callable[[list[int]], bool]] = None  # a stop-string test on the continuation so far
    consumed: int = 0
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False
    finish_reason: str = ""

    def scored_positions(self, start: int, num_new: int) -> tuple[int, int]:
        """Scoring: the rows ``[lo, hi)`` (positions) of a forward whose logits predict a continuation token.

        The logits at position ``p`` predict token ``p + 1``, so the continuation
        ``score_from .. total - 1`` is predicted by positions ``score_from - 1 .. total - 2``.
        """
        lo = max(start, self.score_from - 1)
        hi = min(start + num_new, self.tokens.numel() - 1)
        return lo, max(lo, hi)

    def take_token(self, token: int, eos: frozenset) -> None:
        """Records a generated token and decides whether the sequence ends with it (and why)."""
        self.generated.append(token)
        if token in eos:
            self.finish_reason = "eos"
        elif self.stop is not None and self.stop(self.generated):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        self.done = bool(self.finish_reason)

    def take_logprobs(self, values: Sequence[float]) -> None:
        """Scoring: records log-probabilities; the sequence ends once its whole text was prefilled."""
        self.logprobs.extend(values)
        self.done = self.consumed == self.tokens.numel()


@dataclass(frozen=True)
class ForwardPlan:
    """What the sequences of one forward contribute, in lane order (the header's order).

    Attributes:
        seqs: the sequences.
        host_ids: their new tokens, concatenated (host).
        num_new: new rows per sequence.
        start: cached tokens per sequence before the forward.
        sample: whether the last stage picks a token after the sequence's rows.
        scored: scoring: how many of its rows predict a continuation token.
    """

    seqs: list[SequenceState]
    host_ids: torch.Tensor
    num_new: tuple[int, ...]
    start: tuple[int, ...]
    sample: tuple[int, ...]
    scored: tuple[int, ...]


def plan_forward(live: Sequence[SequenceState], planner: Optional[ChunkPlanner], *, scoring: bool) -> ForwardPlan:
    """The rows of ``live``'s next forward: a prefill chunk where a prompt is not all cached, else a decode token.

    Advances each sequence's ``consumed`` by its prefill rows. Prefill and decode
    rows mix freely: a sequence admitted into a freed lane prefills beside the
    others' decode steps.
    """
    host_ids, num_new, start, sample, scored = [], [], [], [], []
    for s in live:
        total = s.tokens.numel()
        if s.consumed < total:  # prefill, maybe one chunk of it
            n = total - s.consumed
            if planner is not None:
                n = planner.next_chunk(s.consumed, n)
            host_ids.append(s.tokens[s.consumed : s.consumed + n])
            start.append(s.consumed)
            s.consumed += n
            sample.append(int(s.consumed == total and not scoring))
        else:  # decode the last sampled token
            host_ids.append(torch.tensor([s.generated[-1]], dtype=torch.long))
            start.append(total + len(s.generated) - 1)
            n = 1
            sample.append(1)
        num_new.append(n)
        lo, hi = s.scored_positions(start[-1], n) if scoring else (0, 0)
        scored.append(hi - lo)
    ids = torch.cat(host_ids) if host_ids else torch.zeros(0, dtype=torch.long)
    return ForwardPlan(list(live), ids, tuple(num_new), tuple(start), tuple(sample), tuple(scored))


def check_max_running(max_running: Optional[int], num_slots: int) -> None:
    """Refuses a cap that leaves a slot without a lane (or is not a positive integer)."""
    if max_running is None:
        return
    if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
        raise ValueError(f"max_running must be an integer >= 1 (None: no cap), got {max_running!r}.")
    if max_running < num_slots:
        raise ValueError(
            f"max_running={max_running} is fewer than the {num_slots} microbatch slots in flight: every slot needs "
            f"at least one running sequence. Pass max_running >= {num_slots} (or fewer microbatches)."
        )


class SlotScheduler:
    """First stage: the lanes of every slot, refilled from the waiting prompts as sequences finish.

    Args:
        seqs: the batch's sequences, in dataset order.
        num_slots: the slots (microbatches) in flight.
        max_running: the most sequences in flight at once (``None``: all of them
            from the start, in dataset order). Must leave every slot a lane: at least
            ``num_slots``. With a cap, prompts are admitted longest ``max_new_tokens`` first.
    """

    def __init__(self, seqs: Sequence[SequenceState], num_slots: int, max_running: Optional[int] = None) -> None:
        check_max_running(max_running, num_slots)
        running = len(seqs) if max_running is None else min(max_running, len(seqs))
        if max_running is not None:  # longest first (a stable sort: ties keep dataset order)
            seqs = sorted(seqs, key=lambda s: -s.max_new_tokens)
        # Round-robin, as without a cap: long and short prompts mix across the slots.
        self._lanes = [list(seqs[j:running:num_slots]) for j in range(num_slots)]
        self._waiting = collections.deque(seqs[running:])
        #: Prompts admitted into a freed lane so far (0 without a cap).
        self.num_admitted = 0
        #: The most sequences any forward of a slot carried (the lanes' high-water mark).
        self.max_lanes = max((len(lanes) for lanes in self._lanes), default=0)

    @property
    def num_waiting(self) -> int:
        """Prompts not admitted yet."""
        return len(self._waiting)

    def admit(self, slot: int) -> list[SequenceState]:
        """The live sequences of ``slot``'s next forward, in lane order, after refilling freed lanes.

        A waiting prompt takes the lane of a finished sequence (the lane keeps its
        place, so on every stage the newcomer inherits the leaver's cache row); lanes
        with nobody to admit are dropped. An empty result closes the slot: nothing
        waits any more (every slot has at least one lane, and a lane only empties
        when the queue has).
        """
        lanes = self._lanes[slot]
        for i, s in enumerate(lanes):
            if s.done and self._waiting:
                lanes[i] = self._waiting.popleft()
                self.num_admitted += 1
        lanes[:] = [s for s in lanes if not s.done]
        return list(lanes)


class SlotMembers:
    """Every stage: the sequences each slot's last forward carried, to tell from a header who left and who came.

    The first stage keeps a newcomer in its leaver's lane, so pairing the slot's
    leavers with its newcomers in order pairs each with the one whose lane it took.
    """

    def __init__(self) -> None:
        self._members: dict[int, tuple[int, ...]] = {}

    def update(self, slot: int, seq_ids: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Records ``slot``'s forward of ``seq_ids``.

        Returns:
            ``(handovers, freed)``: ``(leaver, newcomer)`` pairs whose cache row
            passes on, and the leavers nobody replaces (their rows are freed).
        """
        previous = self._members.get(slot, ())
        now, before = set(seq_ids), set(previous)
        gone = [i for i in previous if i not in now]
        new = [i for i in seq_ids if i not in before]
        self._members[slot] = tuple(seq_ids)
        handovers = list(zip(gone, new))
        return handovers, gone[len(handovers) :]
