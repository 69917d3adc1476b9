"""Pipeline schedule step time against the ideal, with simulated compute.

Each of the 4 stages is one layer whose forward and backward sleep in proportion to
their rows (``--forward-ms``/``--backward-ms`` for a whole batch of 16 rows), so the
measurement is about the schedule and the communication, not about 2 CPU cores
shared by 4 processes. With ``F``, ``B`` the per-microbatch times, the ideal step
time of GPipe and 1F1B is ``(m + p - 1) * (F + B)``.

    python benchmarks/bench_schedules.py            # pp=4, m=8
    python benchmarks/bench_schedules.py --pp 2 --m 4 --steps 3

Prints, per schedule: measured step time, ideal, efficiency (ideal / measured) and the
peak number of microbatches whose activations a stage held (measured in the run).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.pipeline.executor import PipelineExecutor
from lightning_pp.pipeline.schedules import build_schedule

from _ranks import on_ranks

ROWS = 16


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s * x.shape[0] / ROWS)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s * grad.shape[0] / ROWS)
        return grad, None, None


class SleepLayer(nn.Module):
    def __init__(self, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x):
        return _Sleep.apply(x * self.weight, self.forward_s, self.backward_s)


def _rank(rank, world, args):
    results = {}
    for name in ("1f1b", "gpipe"):
        schedule = build_schedule(name, world, args.m)
        stage = SleepLayer(args.forward_ms / 1000, args.backward_ms / 1000)
        comm = PipeComm(dist.group.WORLD, torch.device("cpu"))
        executor = PipelineExecutor({rank: stage}, schedule, rank, comm)
        batch = torch.randn(ROWS, 8)
        micro = list(torch.tensor_split(batch, args.m))

        def step_fn(k, call, micro=micro):
            return call(micro[k]).sum()

        def loss_fn(k, out):
            return out

        times = []
        for step in range(args.steps + 1):
            dist.barrier()
            start = time.perf_counter()
            executor.run(step_fn, loss_fn)
            dist.barrier()
            if step:  # the first step warms up
                times.append(time.perf_counter() - start)
        results[name] = (min(times), executor.peak_live_activations)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--forward-ms", type=float, default=80.0, help="forward sleep for a whole batch")
    parser.add_argument("--backward-ms", type=float, default=160.0, help="backward sleep for a whole batch")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    per_rank = on_ranks(_rank, args.pp, args)
    p, m = args.pp, args.m
    f_mb, b_mb = args.forward_ms / m, args.backward_ms / m
    ideal = (m + p - 1) * (f_mb + b_mb) / 1000
    print(f"pp={p} m={m} F={f_mb:.1f}ms B={b_mb:.1f}ms per microbatch; ideal step {ideal * 1000:.0f} ms")
    print(f"{'schedule':10} {'step ms':>9} {'ideal ms':>9} {'efficiency':>10}  peak live activations per stage")
    for name in ("1f1b", "gpipe"):
        measured = max(per_rank[r][name][0] for r in range(p))
        peaks = [per_rank[r][name][1] for r in range(p)]
        print(f"{name:10} {measured * 1000:9.0f} {ideal * 1000:9.0f} {ideal / measured:10.3f}  {peaks}")


if __name__ == "__main__":
    sys.exit(main())
