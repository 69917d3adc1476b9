"""Recording what each rank did and when, and writing it as a Chrome/Perfetto trace.

Every rank's :class:`~lightning_pp.pipeline.recorder.TraceRecorder` collects the
actions it ran during a window of steps. After the window, the ranks' events are gathered and
written as one JSON file that ``chrome://tracing`` and https://ui.perfetto.dev open: one track
per rank, events named like the schedule's actions (``F s1 mb3``, ``SEND_F s1 mb3``), with the
step, stage and microbatch in their arguments.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

import torch.distributed as dist

from lightning_pp.pipeline.actions import Action, Op
from lightning_pp.pipeline.recorder import TraceEvent, TraceRecorder
from lightning_pp.pipeline.simulation import TimedAction, bubble_fraction

__all__ = [
    "StepTracer",
    "TraceOptions",
    "events_to_timeline",
    "measured_bubble",
    "write_chrome_trace",
]


@dataclass(frozen=True)
class TraceOptions:
    """What ``PPStrategy(trace=...)`` records.

    Attributes:
        dir: folder for ``trace.json`` (all ranks) and ``timeline.png``.
        steps: training steps (0-based batch count) to record; keep it short.
        png: also draw the last recorded step (needs matplotlib).
    """

    dir: str
    steps: tuple[int, ...] = (2, 3)
    png: bool = True

    def __post_init__(self) -> None:
        if not self.steps or min(self.steps) < 0:
            raise ValueError(f"TraceOptions.steps must name at least one step >= 0, got {self.steps}.")


def write_chrome_trace(events: Sequence[TraceEvent], path: str, *, metadata: Optional[dict[str, Any]] = None) -> None:
    """Writes events of all ranks as Chrome trace-event JSON, one track per rank."""
    trace: list[dict[str, Any]] = []
    for rank in sorted({e.rank for e in events}):
        pp_rank = next(e.pp_rank for e in events if e.rank == rank)
        trace.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank} (pp {pp_rank})"}})
        trace.append({"ph": "M", "name": "process_sort_index", "pid": rank, "args": {"sort_index": rank}})
    for e in sorted(events, key=lambda e: (e.rank, e.start)):
        trace.append(
            {
                "name": e.name,
                "cat": e.kind,
                "ph": "X",
                "pid": e.rank,
                "tid": 0,
                "ts": e.start * 1e6,
                "dur": max(e.end - e.start, 0.0) * 1e6,
                "args": {k: v for k, v in asdict(e).items() if k in ("step", "stage", "microbatch", "pp_rank", "peer")},
            }
        )
    with open(path, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms", "metadata": metadata or {}}, f)


def events_to_timeline(events: Sequence[TraceEvent], step: int) -> list[list[TimedAction]]:
    """One step's schedule actions as :func:`~lightning_pp.pipeline.simulation.simulate`-style timelines."""
    ops = {op.value: op for op in Op}
    ranks = sorted({e.pp_rank for e in events if e.step == step})
    timeline: list[list[TimedAction]] = [[] for _ in ranks]
    for e in sorted(events, key=lambda e: e.start):
        if e.step == step and e.kind in ops:
            action = Action(ops[e.kind], e.stage, e.microbatch, peer=None if ops[e.kind].is_compute else e.peer)
            timeline[ranks.index(e.pp_rank)].append(TimedAction(e.start, e.end, action))
    return timeline


def measured_bubble(events: Sequence[TraceEvent], step: int) -> float:
    """Idle share of one traced step: ``1 - compute time / (ranks * step span)``."""
    return bubble_fraction(events_to_timeline(events, step))


class StepTracer:
    """Drives a :class:`TraceRecorder` through training steps and writes the result.

    Every rank calls :meth:`step` around each training step. The first recorded
    step starts with a barrier and a clock reset; after the last one the ranks'
    events are gathered and global rank 0 writes the trace (every rank, one track
    each) and the picture of one pipeline.

    Args:
        options: what to record, and where.
        rank, pp_rank: this process's global rank and pipeline rank.
        drawn_ranks: the global ranks of the pipeline to draw, in stage order (with
            data parallelism, replica 0's: they are not ranks ``0..pp-1`` when the
            pipeline axis is outermost).
    """

    def __init__(self, options: TraceOptions, rank: int, pp_rank: int, drawn_ranks: Sequence[int]) -> None:
        self.options = options
        self.recorder = TraceRecorder(rank, pp_rank, options.steps)
        self.drawn_ranks = tuple(drawn_ranks)
        self._count = 0
        self.written: Optional[str] = None

    @contextmanager
    def step(self, describe: dict[str, Any]) -> Iterator[Optional[TraceRecorder]]:
        """Yields the recorder while this step is in the window, else ``None``."""
        step, self._count = self._count, self._count + 1
        if step == min(self.options.steps) and dist.is_initialized():
            dist.barrier()
            self.recorder.reset_clock()
        active = self.recorder.begin_step(step)
        try:
            yield self.recorder if active else None
        finally:
            self.recorder.end_step()
        if step == max(self.options.steps):
            self._write(describe, step)

    def _write(self, describe: dict[str, Any], last_step: int) -> None:
        events: list[TraceEvent] = list(self.recorder.events)
        if dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, events)
            events = [e for rank_events in gathered for e in rank_events]
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        os.makedirs(self.options.dir, exist_ok=True)
        path = os.path.join(self.options.dir, "trace.json")
        drawn = [e for e in events if e.rank in self.drawn_ranks]
        bubble = measured_bubble(drawn, last_step)
        metadata = {**describe, "drawn_ranks": list(self.drawn_ranks), "measured_bubble": bubble}
        write_chrome_trace(events, path, metadata=metadata)
        self.written = path
        if self.options.png:
            from lightning_pp.pipeline.simulation import ideal_bubble_fraction
            from lightning_pp.tracing.timeline import IDEAL_FORMULA, ZERO_BUBBLE_FORMULA, draw_timeline

            zero_bubble = describe.get("schedule") == "zbh1"
            title = (
                f"{describe.get('schedule')}: pp={describe.get('pp_size')}, m={describe.get('num_microbatches')} "
                f"(measured, step {last_step}, replica 0)"
            )
            ideal = ideal_bubble_fraction(
                int(describe["pp_size"]),
                int(describe["num_microbatches"]),
                int(describe.get("virtual_stages", 1)),
                zero_bubble=zero_bubble,
            )
            draw_timeline(
                events_to_timeline(drawn, last_step),
                os.path.join(self.options.dir, "timeline.png"),
                title=title,
                ideal_bubble=ideal,
                ideal_formula=ZERO_BUBBLE_FORMULA if zero_bubble else IDEAL_FORMULA,
                show_comm=True,
                time_unit="seconds",
            )
