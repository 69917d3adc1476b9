"""PPStrategy(trace=...) and balance="time" on real ranks."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
from torch import nn

from lightning_pp.pipeline.executor import sends_first
from lightning_pp.pipeline.recorder import TraceEvent
from lightning_pp.pipeline.schedules import build_schedule
from lightning_pp.tracing.trace import events_to_timeline, measured_bubble

from lit_models import Block, LitLM, make_loader, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_MATPLOTLIB = False


def _traced_fit(rank, world_size, trace_dir, pp=None):
    from lightning_pp import PPStrategy
    from lightning_pp.tracing.trace import TraceOptions

    L.seed_everything(0)
    options = TraceOptions(trace_dir, steps=(1, 2), png=HAVE_MATPLOTLIB)
    strategy = PPStrategy(pipeline_parallel_size=pp, num_microbatches=4, trace=options)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, **trainer_kwargs())
    trainer.fit(LitLM(), make_loader(num_items=32, batch_size=8))
    return strategy._tracer.written


@pytest.mark.parametrize("world_size", [2, 3])
def test_trace_holds_every_executed_action_in_order(tmp_path, world_size):
    written = run_on_ranks(_traced_fit, world_size, str(tmp_path), init_process_group=False, timeout=180)
    assert written[0] == str(tmp_path / "trace.json") and written[1:] == [None] * (world_size - 1)
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["metadata"]["schedule"] == "1f1b" and data["metadata"]["num_microbatches"] == 4
    schedule = build_schedule("1f1b", world_size, 4)
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    for rank in range(world_size):
        for step in (1, 2):
            ours = [e for e in spans if e["pid"] == rank and e["args"]["step"] == step]
            waits = [e for e in ours if e["cat"] == "wait"]
            mine = sorted((e for e in ours if e["cat"] != "wait"), key=lambda e: e["ts"])
            # After the schedule, every stage waits for the last stage's loss and logs.
            assert len(waits) == 1 and waits[0]["ts"] >= mine[-1]["ts"] + mine[-1]["dur"] - 1
            executed = [(e["cat"], e["args"]["stage"], e["args"]["microbatch"]) for e in mine]
            # On gloo, posted sends block nothing, so between two computes they go before the receives.
            planned = [(a.op.value, a.stage, a.microbatch) for a in sends_first(schedule.actions[rank])]
            assert executed == planned, f"rank {rank} step {step}"
            assert all(a["ts"] + a["dur"] <= b["ts"] + 1 for a, b in zip(mine, mine[1:]))
    assert not [e for e in spans if e["args"]["step"] not in (1, 2)]
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_trace_with_data_parallelism_draws_one_whole_pipeline(tmp_path):
    # dp=2 x pp=2: the pipeline axis is outermost, so replica 0 is global ranks {0, 2}.
    written = run_on_ranks(_traced_fit, 4, str(tmp_path), 2, init_process_group=False, timeout=240)
    assert written[0] == str(tmp_path / "trace.json")
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["metadata"]["drawn_ranks"] == [0, 2]
    spans = [e for e in data["traceEvents"] if e["ph"] == "X" and e["args"]["step"] == 2]
    assert sorted({e["pid"] for e in spans}) == [0, 1, 2, 3], "the trace keeps a track for every rank"
    events = [
        TraceEvent(e["pid"], e["args"]["pp_rank"], 2, e["cat"], e["args"]["stage"], e["args"]["microbatch"],
                   e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e["args"]["peer"])
        for e in spans if e["pid"] in (0, 2)
    ]
    timeline = events_to_timeline(events, 2)
    # One track per stage, each holding its own stage's forwards and backwards only.
    assert [sorted({t.action.stage for t in track}) for track in timeline] == [[0], [1]]
    assert data["metadata"]["measured_bubble"] == pytest.approx(measured_bubble(events, 2), abs=1e-6)


class SlowBlock(Block):
    def forward(self, x):
        time.sleep(0.02)
        return super().forward(x)


class Unequal(LitLM):
    """Eight equal-sized blocks, the last two much slower: a parameter split halves it badly."""

    def __init__(self):
        super().__init__()
        head = list(self.layers)
        self.layers = nn.Sequential(head[0], *[Block() for _ in range(6)], SlowBlock(), SlowBlock(), *head[-2:])


def _time_balanced(rank, world_size):
    from lightning_pp import PPStrategy

    L.seed_everything(0)
    sample = next(iter(make_loader(num_items=8, batch_size=8)))
    strategy = PPStrategy(num_microbatches=2, balance="time", balance_sample=sample)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, **trainer_kwargs(max_steps=1))
    trainer.fit(Unequal(), make_loader(num_items=8, batch_size=8))
    return strategy.balance


def test_time_balance_moves_the_slow_layers_apart():
    counts = run_on_ranks(_time_balanced, 2, init_process_group=False, timeout=180)
    assert counts[0] == counts[1]
    # 11 layers; by parameters the split is near the middle, by time the second stage
    # holds little more than the two slow blocks.
    assert sum(counts[0]) == 11 and counts[0][1] <= 4, counts[0]
