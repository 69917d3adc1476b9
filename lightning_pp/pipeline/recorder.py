"""Recording what a rank ran and when: the executor's side of tracing.

A :class:`TraceRecorder` lives on every rank. The executor hands it each action it
ran with start and end times; other code may add spans (``"wait"`` for time spent
blocked outside a send or receive). Recording is off outside the chosen window of
steps, and then costs one attribute test per action. Gathering the events of all
ranks and writing them out is :mod:`lightning_pp.tracing`'s job.

Clocks: each rank measures with ``time.perf_counter`` from an origin taken right
after a barrier, so ranks on one machine line up to within the barrier's exit skew.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from lightning_pp.pipeline.actions import Action

__all__ = ["TraceEvent", "TraceRecorder"]


@dataclass(frozen=True)
class TraceEvent:
    """One span of one rank's work, times in seconds from the rank's trace origin."""

    rank: int
    pp_rank: int
    step: int
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float
    peer: int = -1

    @property
    def name(self) -> str:
        if self.microbatch < 0:
            return self.kind
        return f"{self.kind} s{self.stage} mb{self.microbatch}"


class TraceRecorder:
    """Collects :class:`TraceEvent` s on one rank for the steps in ``steps``.

    Args:
        rank: this process's global rank.
        pp_rank: its position in the pipeline.
        steps: the step indices to record (e.g. ``range(2, 4)``); others are skipped.
    """

    def __init__(self, rank: int, pp_rank: int, steps: Iterable[int]) -> None:
        self.rank = rank
        self.pp_rank = pp_rank
        self.steps = frozenset(steps)
        self.events: list[TraceEvent] = []
        self.active = False
        self.step = -1
        self._origin = time.perf_counter()

    def reset_clock(self) -> None:
        """Takes the time origin; call right after a barrier on every rank."""
        self._origin = time.perf_counter()

    def begin_step(self, step: int) -> bool:
        """Starts recording if ``step`` is in the window; returns whether it is."""
        self.step = step
        self.active = step in self.steps
        return self.active

    def end_step(self) -> None:
        self.active = False

    @property
    def done(self) -> bool:
        """Whether the window has passed (nothing more will be recorded)."""
        return bool(self.steps) and self.step >= max(self.steps)

    def now(self) -> float:
        return time.perf_counter() - self._origin

    def record(self, action: Action, start: float, end: float) -> None:
        """Adds an executed schedule action (times from :meth:`now`)."""
        if self.active:
            self.events.append(
                TraceEvent(
                    self.rank, self.pp_rank, self.step, action.op.value, action.stage, action.microbatch, start, end,
                    -1 if action.peer is None else action.peer,
                )
            )

    def add_span(self, kind: str, start: float, end: float, stage: int = -1, microbatch: int = -1) -> None:
        """Adds a span that is not a schedule action (``"wait"``, ``"step"``)."""
        if self.active:
            self.events.append(TraceEvent(self.rank, self.pp_rank, self.step, kind, stage, microbatch, start, end))
