"""Pictures of pipeline schedules: planned (from action lists) or measured (from a trace).

Draws the classic pipeline diagram: one row per pipeline rank, time to the right,
a box per forward (light) and backward (dark; a split backward's input part dark,
its weight part green) labelled with its microbatch, and the idle gaps left
blank. The title gives the bubble fraction against the ideal
``(p - 1) / (v m + p - 1)`` (ZB-H1: ``(p - 1) / (3 m + p - 1)``). matplotlib is
optional (``pip install lightning_pp[plot]``) and imported only here, only when
drawing.

    from lightning_pp.pipeline.schedules import build_schedule
    from lightning_pp.tracing.timeline import draw_schedule
    draw_schedule(build_schedule("1f1b", 4, 8), "1f1b.png")   # nothing runs
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lightning_pp.pipeline.schedules import Op, Schedule
from lightning_pp.pipeline.simulation import (
    TimedAction,
    bubble_fraction,
    ideal_bubble_fraction,
    simulate,
)

__all__ = ["IDEAL_FORMULA", "ZERO_BUBBLE_FORMULA", "draw_schedule", "draw_timeline"]

_COLORS = {Op.FORWARD: "#8ecae6", Op.BACKWARD: "#219ebc", Op.BACKWARD_INPUT: "#219ebc", Op.BACKWARD_WEIGHT: "#2a9d8f"}
_LABELS = {
    Op.FORWARD: "forward",
    Op.BACKWARD: "backward",
    Op.BACKWARD_INPUT: "backward, input (I)",
    Op.BACKWARD_WEIGHT: "backward, weights (W)",
}
_COMM_COLOR = "#ffb703"
#: The textbook bubble each kind of schedule is drawn against.
IDEAL_FORMULA = "(p-1)/(vm+p-1)"
ZERO_BUBBLE_FORMULA = "(p-1)/(3m+p-1), F=I=W"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Drawing timelines needs matplotlib: pip install 'lightning_pp[plot]' (or pip install matplotlib)."
        ) from error
    return plt


def draw_timeline(
    timeline: Sequence[Sequence[TimedAction]],
    path: str,
    *,
    title: str,
    ideal_bubble: Optional[float] = None,
    ideal_formula: str = IDEAL_FORMULA,
    show_comm: bool = False,
    time_unit: str = "ticks",
) -> float:
    """Draws per-rank timed actions to ``path`` (PNG) and returns the bubble fraction shown.

    Args:
        timeline: ``timeline[r]`` is rank ``r``'s executed actions.
        title: first line of the title.
        ideal_bubble: the schedule's textbook bubble, printed beside the measured one.
        ideal_formula: how ``ideal_bubble`` was computed, for the title.
        show_comm: also draw sends/receives (thin boxes), e.g. for measured traces.
        time_unit: axis label.
    """
    plt = _pyplot()
    bubble = bubble_fraction(timeline)
    events = [e for rank_events in timeline for e in rank_events]
    origin = min((e.start for e in events), default=0.0)
    span = max((e.end for e in events), default=1.0) - origin
    width = max(8.0, min(24.0, 0.25 * len(events) / max(len(timeline), 1) + 6))
    fig, ax = plt.subplots(figsize=(width, 0.7 * len(timeline) + 1.6))
    for rank, rank_events in enumerate(timeline):
        for e in rank_events:
            start, width = e.start - origin, max(e.end - e.start, span * 1e-4)
            if e.action.op.is_compute:
                ax.broken_barh([(start, width)], (rank - 0.4, 0.8), facecolors=_COLORS[e.action.op], edgecolors="white")
                if width > span / 80:
                    ax.text(start + width / 2, rank, str(e.action.microbatch), ha="center", va="center", fontsize=7,
                            color="black" if e.action.op is Op.FORWARD else "white")
            elif show_comm:
                ax.broken_barh([(start, width)], (rank + 0.3, 0.1), facecolors=_COMM_COLOR)
    ax.set_yticks(range(len(timeline)))
    ax.set_yticklabels([f"rank {r}" for r in range(len(timeline))])
    ax.invert_yaxis()
    ax.set_xlim(0, span)
    ax.set_xlabel(time_unit)
    subtitle = f"bubble {bubble:.1%}"
    if ideal_bubble is not None:
        subtitle += f" (ideal {ideal_formula} = {ideal_bubble:.1%})"
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    split = any(e.action.op is Op.BACKWARD_INPUT for e in events)
    shown = [Op.FORWARD] + ([Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT] if split else [Op.BACKWARD])
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS[op]) for op in shown]
    labels = [_LABELS[op] for op in shown]
    if show_comm:
        handles.append(plt.Rectangle((0, 0), 1, 1, color=_COMM_COLOR))
        labels.append("send/recv")
    ax.legend(
        handles, labels, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=len(labels), frameon=False
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return bubble


def draw_schedule(
    schedule: Schedule,
    path: str,
    *,
    forward_time: float = 1.0,
    backward_time: float = 2.0,
    weight_time: Optional[float] = None,
) -> float:
    """Draws ``schedule`` as planned, without running anything; returns its bubble fraction.

    Times as in :func:`~lightning_pp.pipeline.simulation.simulate`: ``backward_time``
    is a whole backward, of which a split one spends ``weight_time`` (default half)
    in ``W``.
    """
    timeline = simulate(schedule, forward_time=forward_time, backward_time=backward_time, weight_time=weight_time)
    split = schedule.splits_backward
    times = f"F={forward_time:g}, B={backward_time:g}"
    if split:
        weight = backward_time / 2 if weight_time is None else weight_time
        times = f"F={forward_time:g}, I={backward_time - weight:g}, W={weight:g}"
    title = (
        f"{schedule.name}: pp={schedule.pp_size}, m={schedule.num_microbatches}"
        + (f", v={schedule.virtual_stages}" if schedule.virtual_stages > 1 else "")
        + f" (planned, {times})"
    )
    ideal: Optional[float] = None
    if not split or schedule.virtual_stages == 1:  # no textbook figure for a split interleaved schedule
        ideal = ideal_bubble_fraction(
            schedule.pp_size, schedule.num_microbatches, schedule.virtual_stages, zero_bubble=split
        )
    return draw_timeline(
        timeline, path, title=title, ideal_bubble=ideal, ideal_formula=ZERO_BUBBLE_FORMULA if split else IDEAL_FORMULA
    )
