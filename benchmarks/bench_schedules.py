"""Pipeline schedule step time against the ideal, with simulated compute.

Each of the 4 stages is one layer whose forward and backward sleep in proportion to
their rows (``--forward-ms``/``--backward-ms`` for a whole batch of 16 rows), so the
measurement is about the schedule and the communication, not about 2 CPU cores
shared by 4 processes. The backward sleeps half its time for the input gradient and
half for the weight gradient, each only when that gradient is asked for, so ZB-H1's
split backward (``I`` then ``W``) is measured on the same work as the others. With
``F``, ``B`` the per-microbatch times, the ideal step time of GPipe and 1F1B is
``(m + p - 1)(F + B)``, ZB-H1's ``m (F + B) + (p - 1)(F + I - W)`` = ``m (F + B) + (p - 1) F``
(``I = W = B / 2``; for ``m >= p``).

    python benchmarks/bench_schedules.py                                   # pp=4, m=8, 10/20 ms
    python benchmarks/bench_schedules.py --forward-ms 32 --backward-ms 64  # 4/8 ms per microbatch
    python benchmarks/bench_schedules.py --pp 2 --m 4 --steps 3

Prints, per schedule: measured step time, its own ideal, efficiency (ideal / measured),
the bubble (idle share of the step: ``1 - m (F + B) / measured``) against the planned
one, and the peak number of microbatches whose activations a stage held (measured).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.pipeline.backward_split import gradients_asked_for
from lightning_pp.pipeline.executor import PipelineExecutor
from lightning_pp.pipeline.schedules import bubble_fraction, build_schedule, simulate

from _ranks import on_ranks

ROWS = 16
SCHEDULES = ("gpipe", "1f1b", "zbh1")


class _Sleep(torch.autograd.Function):
    """``x * weight`` that sleeps: the forward time, half the backward time per gradient asked for."""

    @staticmethod
    def forward(ctx, x, weight, forward_s, backward_s):
        ctx.save_for_backward(x, weight)
        ctx.backward_s = backward_s
        time.sleep(forward_s * x.shape[0] / ROWS)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # Not ctx.needs_input_grad alone: it is fixed at forward time, the same for I and W.
        wants_input, wants_weight = gradients_asked_for(ctx)[:2]
        time.sleep(ctx.backward_s / 2 * grad.shape[0] / ROWS * (wants_input + wants_weight))
        grad_x = grad * weight if wants_input else None
        grad_w = (grad * x).sum(0) if wants_weight else None
        return grad_x, grad_w, None, None


class SleepLayer(nn.Module):
    def __init__(self, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x):
        return _Sleep.apply(x, self.weight, self.forward_s, self.backward_s)


def _rank(rank, world, args):
    stage = SleepLayer(args.forward_ms / 1000, args.backward_ms / 1000)
    comm = PipeComm(dist.group.WORLD, torch.device("cpu"))
    executors = {
        name: PipelineExecutor({rank: stage}, build_schedule(name, world, args.m), rank, comm) for name in SCHEDULES
    }
    # The first stage's input requires grad too, so every stage does the same work.
    batch = torch.randn(ROWS, 8)
    micro = [part.requires_grad_() for part in torch.tensor_split(batch, args.m)]

    def step_fn(k, call):
        return call(micro[k]).sum()

    def loss_fn(k, out):
        return out

    times = {name: [] for name in SCHEDULES}
    # Schedules take turns step by step, so a burst of load elsewhere slows them alike.
    for step in range(args.steps + 1):
        for name, executor in executors.items():
            dist.barrier()
            start = time.perf_counter()
            executor.run(step_fn, loss_fn)
            dist.barrier()
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), executors[name].peak_live_activations) for name in SCHEDULES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--forward-ms", type=float, default=80.0, help="forward sleep for a whole batch")
    parser.add_argument("--backward-ms", type=float, default=160.0, help="backward sleep for a whole batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per schedule (the best one counts)")
    args = parser.parse_args()
    per_rank = on_ranks(_rank, args.pp, args)
    p, m = args.pp, args.m
    f_mb, b_mb = args.forward_ms / m, args.backward_ms / m
    work = m * (f_mb + b_mb) / 1000  # each rank's compute per step
    print(
        f"pp={p} m={m} F={f_mb:.1f}ms B={b_mb:.1f}ms (I=W={b_mb / 2:.1f}ms) per microbatch; "
        f"compute {work * 1000:.0f} ms per rank and step"
    )
    print(
        f"{'schedule':10} {'step ms':>9} {'ideal ms':>9} {'efficiency':>10} {'bubble':>8} {'planned':>8}"
        "  peak live activations per stage"
    )
    for name in SCHEDULES:
        planned = simulate(build_schedule(name, p, m), forward_time=f_mb / 1000, backward_time=b_mb / 1000)
        ideal = max(e.end for events in planned for e in events)
        measured = max(per_rank[r][name][0] for r in range(p))
        peaks = [per_rank[r][name][1] for r in range(p)]
        print(
            f"{name:10} {measured * 1000:9.0f} {ideal * 1000:9.0f} {ideal / measured:10.3f} "
            f"{1 - work / measured:8.3f} {bubble_fraction(planned):8.3f}  {peaks}"
        )


if __name__ == "__main__":
    sys.exit(main())
