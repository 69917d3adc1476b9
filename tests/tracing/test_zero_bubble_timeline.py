"""ZB-H1 in traces and pictures: I and W actions are recorded, measured and drawn like the others."""

from __future__ import annotations

from typing import Any

import pytest

import lightning_pp.tracing.timeline as timeline_module
from lightning_pp.pipeline.actions import Op
from lightning_pp.pipeline.schedules import build_schedule
from lightning_pp.pipeline.simulation import ideal_bubble_fraction, simulate
from lightning_pp.tracing.trace import StepTracer, TraceOptions, events_to_timeline, measured_bubble


def _traced(name: str, p: int, m: int, tmp_path: Any, png: bool) -> StepTracer:
    """A tracer per rank fed with the simulated run, as the executor feeds it; rank 0's collects all."""
    schedule = build_schedule(name, p, m)
    tracer = StepTracer(TraceOptions(dir=str(tmp_path), steps=(0,), png=png), rank=0, pp_rank=0, drawn_ranks=range(p))
    describe = {"schedule": schedule.name, "pp_size": p, "num_microbatches": m, "virtual_stages": 1}
    with tracer.step(describe) as recorder:
        assert recorder is not None
        for rank, events in enumerate(simulate(schedule)):
            recorder.rank = recorder.pp_rank = rank  # one process stands in for every rank
            for e in events:
                recorder.record(e.action, e.start, e.end)
    return tracer


def test_a_zbh1_trace_measures_its_own_ideal_bubble(tmp_path):
    p, m = 4, 8
    tracer = _traced("zbh1", p, m, tmp_path, png=False)
    events = tracer.recorder.events
    assert {"I", "W"} <= {e.kind for e in events} and "B" not in {e.kind for e in events}
    timeline = events_to_timeline(events, 0)
    assert {e.action.op for rank in timeline for e in rank} >= {Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT}
    assert measured_bubble(events, 0) == pytest.approx(ideal_bubble_fraction(p, m, zero_bubble=True))
    assert measured_bubble(events, 0) < ideal_bubble_fraction(p, m) / 2


def test_the_trace_picture_of_zbh1_is_titled_with_zbh1s_ideal(tmp_path, monkeypatch):
    drawn: dict = {}
    monkeypatch.setattr(timeline_module, "draw_timeline", lambda timeline, path, **kwargs: drawn.update(kwargs))
    _traced("zbh1", 4, 8, tmp_path, png=True)
    assert drawn["ideal_bubble"] == pytest.approx(3 / 27)
    assert drawn["ideal_formula"] == timeline_module.ZERO_BUBBLE_FORMULA
    _traced("1f1b", 4, 8, tmp_path, png=True)
    assert drawn["ideal_bubble"] == pytest.approx(3 / 11)
    assert drawn["ideal_formula"] == timeline_module.IDEAL_FORMULA


def test_zbh1_is_drawn_without_running_anything(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "zbh1.png"
    bubble = timeline_module.draw_schedule(build_schedule("zbh1", 4, 8), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert bubble == pytest.approx(3 / 27)
    assert bubble < timeline_module.draw_schedule(build_schedule("1f1b", 4, 8), str(tmp_path / "1f1b.png"))
