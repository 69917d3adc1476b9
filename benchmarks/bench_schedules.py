"""Pipeline schedule step time against the ideal, lightning_pp beside torch.distributed.pipelining.

Each of the 4 stages is one layer whose forward and backward sleep in proportion to
their rows (``F``/``B`` ms per microbatch), so the measurement is about the schedule,
the communication and the executor's own work, not about 2 CPU cores shared by 4
processes. The backward sleeps half its time for the input gradient and half for the
weight gradient, each only when that gradient is asked for, so ZB-H1's split backward
(``I`` then ``W``) is measured on the same work as the others. Interleaved schedules
hold two stages per rank, each half as costly. One run measures both grains
(``--grains 4/8,10/20``), and within a grain every schedule of both libraries takes
its turn step by step, so a burst of load elsewhere slows them alike.

    python benchmarks/bench_schedules.py                      # pp=4, m=8, 4/8 and 10/20 ms
    python benchmarks/bench_schedules.py --grains 4/8 --steps 20
    python benchmarks/bench_schedules.py --pp 2 --m 4 --steps 3

Prints, per grain and schedule: the best and the median step time, its ideal (the
schedule's own plan, from :func:`~lightning_pp.pipeline.schedules.simulate`),
efficiency (ideal / best step), the bubble (idle share of the best step:
``1 - m (F + B) / step``) against the planned one, the peak number of microbatches
whose activations a stage held, and, for lightning_pp, where a step's time went on the
slowest rank (compute, receives, posting sends, waiting for sends at the end, the
executor's own Python). The floor rows run the same layers in the same order with
bare ``isend``/``irecv`` and nothing else: what the machine allows any library, so a
library's own overhead reads as its distance from them. The load average is printed:
on a shared machine compare the ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.pipeline.backward_split import gradients_asked_for
from lightning_pp.pipeline.executor import PipelineExecutor, sends_first
from lightning_pp.pipeline.schedules import Op, bubble_fraction, build_schedule, simulate

from _ranks import on_ranks

ROWS = 16
OURS = ("gpipe", "1f1b", "interleaved1f1b", "zbh1")
TORCH = ("gpipe", "1f1b", "interleaved1f1b")  # torch has no ZB-H1 (its zero-bubble schedules need v >= 2)
FLOOR = ("gpipe", "1f1b")
PARTS = ("compute", "recv", "send", "drain")


class _Clock:
    """Accumulates seconds per part of a step (the benchmark's own instrumentation)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def add(self, part: str, start: float) -> None:
        self.seconds[part] += time.perf_counter() - start


class _Sleep(torch.autograd.Function):
    """``x * weight`` that sleeps: the forward time, half the backward time per gradient asked for."""

    @staticmethod
    def forward(ctx, x, weight, forward_s, backward_s, clock):
        start = time.perf_counter()
        ctx.save_for_backward(x, weight)
        ctx.backward_s, ctx.clock = backward_s, clock
        time.sleep(forward_s * x.shape[0] / ROWS)
        clock.add("compute", start)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        start = time.perf_counter()
        x, weight = ctx.saved_tensors
        # Not ctx.needs_input_grad alone: it is fixed at forward time, the same for I and W.
        wants_input, wants_weight = gradients_asked_for(ctx)[:2]
        time.sleep(ctx.backward_s / 2 * grad.shape[0] / ROWS * (wants_input + wants_weight))
        grad_x = grad * weight if wants_input else None
        grad_w = (grad * x).sum(0) if wants_weight else None
        ctx.clock.add("compute", start)
        return grad_x, grad_w, None, None, None


class SleepLayer(nn.Module):
    def __init__(self, forward_s: float, backward_s: float, clock: _Clock) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.forward_s, self.backward_s, self.clock = forward_s, backward_s, clock

    def forward(self, x):
        return _Sleep.apply(x, self.weight, self.forward_s, self.backward_s, self.clock)


class _TimedComm(PipeComm):
    """A ``PipeComm`` that adds the time of each call to a clock."""

    clock: _Clock

    def send(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().send(*args, **kwargs)
        self.clock.add("send", start)

    def recv(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = super().recv(*args, **kwargs)
        self.clock.add("recv", start)
        return out

    def wait_sends(self) -> None:
        start = time.perf_counter()
        super().wait_sends()
        self.clock.add("drain", start)


def _layers(name: str, rank: int, world: int, f_s: float, b_s: float, clock: _Clock) -> dict[int, nn.Module]:
    """The stages rank ``rank`` holds: one, or two of half the cost for an interleaved schedule."""
    if name == "interleaved1f1b":
        return {s: SleepLayer(f_s / 2, b_s / 2, clock) for s in (rank, rank + world)}
    return {rank: SleepLayer(f_s, b_s, clock)}


class _Floor:
    """What the machine allows a schedule: the same layers and action order, and nothing else.

    Each action is one bare call: the layer's forward, ``torch.autograd.backward``, or
    ``dist.isend``/``dist.irecv`` of one tensor of the known shape (no headers, no
    layouts, no bookkeeping, no deadlines). Communication is timed as lightning_pp
    times it: sends first between two computes, each rank's next receive posted
    before the compute that precedes it, sends waited for at the end of the step. A
    library can only add to this; the gap between the two is its own overhead.
    """

    def __init__(self, name: str, rank: int, world: int, m: int, layers: dict[int, nn.Module]) -> None:
        schedule = build_schedule(name, world, m)
        self.actions = sends_first(schedule.actions[rank])
        self.layers, self.last = layers, schedule.num_stages - 1

    def run(self, micro: list[torch.Tensor]) -> None:
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        sends = []
        receives = iter([i for i, a in enumerate(self.actions) if a.op.is_recv])
        upcoming = next(receives, None)  # the first receive not yet posted
        posted: Optional[tuple[torch.Tensor, Any]] = None  # the receive before `upcoming`, posted ahead
        for index, action in enumerate(self.actions):
            k, op = action.microbatch, action.op
            if op.is_compute and upcoming is not None and upcoming > index and posted is None:
                posted = self._post(self.actions[upcoming], micro)
                upcoming = next(receives, None)
            if op is Op.FORWARD:
                x = micro[k] if action.stage == 0 else inputs[k]
                out = self.layers[action.stage](x)
                outputs[k] = out.sum() if action.stage == self.last else out
            elif op is Op.BACKWARD:
                out = outputs.pop(k)
                torch.autograd.backward([out], grad_tensors=None if action.stage == self.last else [grads.pop(k)])
            elif op.is_send:
                payload = outputs[k] if op is Op.SEND_ACT else inputs.pop(k).grad
                sends.append(dist.isend(payload.detach(), action.peer))
            else:  # receives come in order: this one is the posted one, or `upcoming`
                if posted is None:
                    posted = self._post(action, micro)
                    upcoming = next(receives, None)
                (buffer, work), posted = posted, None
                work.wait()
                if op is Op.RECV_ACT:
                    inputs[k] = buffer.requires_grad_()
                else:
                    grads[k] = buffer
        for work in sends:
            work.wait()

    @staticmethod
    def _post(action: Any, micro: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        buffer = torch.empty_like(micro[action.microbatch], requires_grad=False)
        return buffer, dist.irecv(buffer, action.peer)


def _torch_schedule(name: str, rank: int, world: int, m: int, f_s: float, b_s: float, clock: _Clock) -> Any:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    layers = _layers(name, rank, world, f_s, b_s, clock)
    num_stages = world * (2 if name == "interleaved1f1b" else 1)
    example = torch.zeros(ROWS // m, 8)  # receive buffers take shape and requires_grad from the example
    stages = [
        PipelineStage(layer, s, num_stages, torch.device("cpu"), input_args=(example.requires_grad_(),),
                      output_args=(example,))
        for s, layer in layers.items()
    ]

    def loss_fn(output, target):
        return output.sum()

    if name == "interleaved1f1b":
        return ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn, scale_grads=False)
    kind = ScheduleGPipe if name == "gpipe" else Schedule1F1B
    return kind(stages[0], m, loss_fn=loss_fn, scale_grads=False)


def _rank(rank: int, world: int, args: argparse.Namespace, f_ms: float, b_ms: float) -> dict[str, Any]:
    f_s, b_s = f_ms * args.m / 1000, b_ms * args.m / 1000  # a whole batch's sleep
    clocks = {("ours", name): _Clock() for name in OURS}
    clocks.update({("torch", name): _Clock() for name in TORCH})
    clocks.update({("floor", name): _Clock() for name in FLOOR})
    runners: dict[tuple[str, str], Any] = {}
    comm = _TimedComm(dist.group.WORLD, torch.device("cpu"))
    for name in OURS:
        clock = clocks[("ours", name)]
        v = 2 if name == "interleaved1f1b" else 1
        layers = _layers(name, rank, world, f_s, b_s, clock)
        runners[("ours", name)] = PipelineExecutor(layers, build_schedule(name, world, args.m, virtual_stages=v), rank,
                                                   comm)
    for name in FLOOR:
        layers = _layers(name, rank, world, f_s, b_s, clocks[("floor", name)])
        runners[("floor", name)] = _Floor(name, rank, world, args.m, layers)
    if not args.no_torch:
        for name in TORCH:
            runners[("torch", name)] = _torch_schedule(name, rank, world, args.m, f_s, b_s, clocks[("torch", name)])
    # The first stage's input requires grad too, so every stage does the same work.
    batch = torch.randn(ROWS, 8)
    micro = [part.requires_grad_() for part in torch.tensor_split(batch, args.m)]

    def step_fn(k, call):
        return call(micro[k]).sum()

    def loss_fn(k, out):
        return out

    def run(key: tuple[str, str]) -> None:
        runner = runners[key]
        if key[0] == "ours":
            comm.clock = clocks[key]
            runner.run(step_fn, loss_fn)
        elif key[0] == "floor":
            runner.run(micro)
        elif rank == 0:
            runner.step(batch.clone().requires_grad_())
        elif rank == world - 1:
            runner.step(target=batch, losses=[])
        else:
            runner.step()

    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    parts: dict[tuple[str, str], dict[str, float]] = {}
    for step in range(args.steps + 1):
        for key in runners:
            clock = clocks[key]
            clock.seconds = dict.fromkeys(PARTS, 0.0)
            dist.barrier()
            start = time.perf_counter()
            run(key)
            elapsed = time.perf_counter() - start
            dist.barrier()
            if step:  # the first step warms up
                times[key].append(elapsed)
                if elapsed <= min(times[key]):
                    parts[key] = dict(clock.seconds, total=elapsed)
    peaks = {name: runners[("ours", name)].peak_live_activations for name in OURS}
    return {"times": times, "parts": parts, "peaks": peaks}


def _report(per_rank: dict[int, dict[str, Any]], args: argparse.Namespace, f_mb: float, b_mb: float) -> None:
    p, m = args.pp, args.m
    work = m * (f_mb + b_mb) / 1000  # each rank's compute per step
    print(f"\npp={p} m={m} F={f_mb:g}ms B={b_mb:g}ms (I=W={b_mb / 2:g}ms) per microbatch; "
          f"compute {work * 1000:.0f} ms per rank and step")
    print(f"{'library':8} {'schedule':16} {'best ms':>8} {'median':>8} {'ideal':>7} {'effic.':>7} {'bubble':>7} "
          f"{'planned':>8}  peak live  | lightning_pp slowest rank, ms: compute recv send drain python")
    libraries = (("lp", OURS), ("torch", () if args.no_torch else TORCH), ("floor", FLOOR))
    for library, names in libraries:
        for name in names:
            key = ("ours" if library == "lp" else library, name)
            v = 2 if name == "interleaved1f1b" else 1
            planned = simulate(build_schedule(name, p, m, virtual_stages=v), forward_time=f_mb / v / 1000,
                               backward_time=b_mb / v / 1000)
            ideal = max(e.end for events in planned for e in events)
            best = max(min(per_rank[r]["times"][key]) for r in range(p))
            median = max(statistics.median(per_rank[r]["times"][key]) for r in range(p))
            line = (f"{'lightning_pp' if library == 'lp' else library:8} {name:16} {best * 1000:8.1f} "
                    f"{median * 1000:8.1f} {ideal * 1000:7.0f} {ideal / best:7.3f} {1 - work / best:7.3f} "
                    f"{bubble_fraction(planned):8.3f}")
            if library == "lp":
                peaks = [per_rank[r]["peaks"][name] for r in range(p)]
                slow = max(range(p), key=lambda r: per_rank[r]["parts"][key]["total"])
                part = per_rank[slow]["parts"][key]
                python = part["total"] - sum(part[x] for x in PARTS)
                line += f"  {str(peaks):10} | rank {slow}: " + " ".join(f"{part[x] * 1000:5.1f}" for x in PARTS)
                line += f" {python * 1000:5.1f}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--grains", default="4/8,10/20", help="F/B ms per microbatch, comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per schedule (the best one counts)")
    parser.add_argument("--no-torch", action="store_true", help="leave torch.distributed.pipelining out")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    grains = [tuple(float(x) for x in grain.split("/")) for grain in args.grains.split(",")]
    results = [(f_mb, b_mb, on_ranks(_rank, args.pp, args, f_mb, b_mb)) for f_mb, b_mb in grains]
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)} "
          f"on {os.cpu_count()} cores (a loaded machine inflates both libraries' fixed costs)")
    for f_mb, b_mb, per_rank in results:
        _report(per_rank, args, f_mb, b_mb)


if __name__ == "__main__":
    sys.exit(main())
