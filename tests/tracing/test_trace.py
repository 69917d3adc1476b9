"""Traces, timelines and time-based balancing, without processes (multi-rank runs: test_strategy_trace.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from lightning_pp.pipeline.balance import balance_by_time, profile_layer_times
from lightning_pp.pipeline.recorder import TraceEvent, TraceRecorder
from lightning_pp.pipeline.schedules import build_schedule
from lightning_pp.pipeline.simulation import ideal_bubble_fraction, simulate
from lightning_pp.tracing.trace import (
    events_to_timeline,
    measured_bubble,
    write_chrome_trace,
)


def _events_from_simulation(schedule):
    events = []
    for rank, timed in enumerate(simulate(schedule)):
        for t in timed:
            a = t.action
            peer = -1 if a.peer is None else a.peer
            events.append(TraceEvent(rank, rank, 0, a.op.value, a.stage, a.microbatch, t.start, t.end, peer))
    return events


def test_recorder_keeps_only_the_window():
    recorder = TraceRecorder(rank=1, pp_rank=1, steps=[2])
    action = build_schedule("1f1b", 2, 2).actions[1][0]
    for step in range(4):
        recorder.begin_step(step)
        recorder.record(action, recorder.now(), recorder.now())
        recorder.add_span("wait", 0.0, 1.0)
        recorder.end_step()
    assert [(e.step, e.kind) for e in recorder.events] == [(2, "RECV_F"), (2, "wait")]
    assert recorder.done


def test_chrome_trace_has_one_track_per_rank_and_named_events(tmp_path):
    events = _events_from_simulation(build_schedule("1f1b", 3, 4))
    path = tmp_path / "trace.json"
    write_chrome_trace(events, str(path), metadata={"schedule": "1f1b"})
    data = json.loads(path.read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(events)
    assert {e["pid"] for e in spans} == {0, 1, 2}
    names = {e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"rank 0 (pp 0)", "rank 1 (pp 1)", "rank 2 (pp 2)"}
    assert {"F s0 mb0", "B s2 mb3", "SEND_F s1 mb2"} <= {e["name"] for e in spans}
    assert data["metadata"] == {"schedule": "1f1b"}


@pytest.mark.parametrize("name, p, m", [("1f1b", 4, 8), ("gpipe", 3, 5)])
def test_measured_bubble_of_an_ideal_run_is_the_ideal(name, p, m):
    events = _events_from_simulation(build_schedule(name, p, m))
    assert measured_bubble(events, step=0) == pytest.approx(ideal_bubble_fraction(p, m))
    assert [len(r) for r in events_to_timeline(events, 0)] == [
        sum(e.rank == r and e.kind in ("F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B") for e in events)
        for r in range(p)
    ]


def test_schedules_are_drawn_without_running_anything(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning_pp.tracing.timeline import draw_schedule

    for name, v in [("gpipe", 1), ("1f1b", 1), ("interleaved1f1b", 2)]:
        path = tmp_path / f"{name}.png"
        bubble = draw_schedule(build_schedule(name, 4, 8, virtual_stages=v), str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert 0 < bubble < 0.5
    # Interleaving shrinks the bubble it is drawn with.
    interleaved = draw_schedule(build_schedule("interleaved1f1b", 4, 8, virtual_stages=2), str(tmp_path / "i.png"))
    plain = draw_schedule(build_schedule("1f1b", 4, 8), str(tmp_path / "o.png"))
    assert interleaved < plain


class _Slow(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.linear(x)


def test_profiled_times_find_the_expensive_layers():
    layers = nn.Sequential(*[_Slow(s) for s in (0.001, 0.001, 0.001, 0.001, 0.02, 0.02)])
    times = profile_layer_times(layers, torch.randn(2, 4), torch.device("cpu"), repeats=2)
    assert len(times) == 6 and min(times[4:]) > 5 * max(times[:4])
    # Equal parameter counts would split 3 | 3; equal time puts the two slow layers apart.
    assert balance_by_time(times, 2) == [5, 1]
    assert all(p.grad is None for p in layers.parameters())
