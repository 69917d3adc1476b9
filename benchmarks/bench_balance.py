"""Stage split by parameter count against split by measured time, on layers of unequal cost.

Eight layers with the same number of parameters, but layer cost (simulated: forward
and backward sleep) rising from 1 to 8 units. A parameter-count split cuts the model
in the middle, leaving the second stage with 26 of the 36 units; profiling each layer
(`lightning_pp.pipeline.balance.profile_layer_times`) and balancing the measured times puts the
cut near 18 | 18. Both splits run the same 1F1B schedule (pp=2, m=8) through the
engine; the script prints both splits and step times.

    python benchmarks/bench_balance.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.pipeline.balance import balance_by_time, profile_layer_times
from lightning_pp.pipeline.executor import PipelineExecutor
from lightning_pp.pipeline.schedules import build_schedule
from lightning_pp.pipeline.split import plan_stage_split
from lightning_pp.pipeline.stage import layer_weights

from _ranks import on_ranks
from bench_schedules import ROWS, SleepLayer

COSTS = [1, 2, 3, 4, 5, 6, 7, 8]


def _layers(unit_ms: float) -> nn.Sequential:
    # Backward twice the forward, as in a real network.
    return nn.Sequential(*[SleepLayer(c * unit_ms / 1000, 2 * c * unit_ms / 1000) for c in COSTS])


def _step_time(rank, world, layers, counts, m, steps):
    bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
    stage = nn.Sequential(*list(layers)[bounds[rank] : bounds[rank + 1]])
    comm = PipeComm(dist.group.WORLD, torch.device("cpu"))
    executor = PipelineExecutor({rank: stage}, build_schedule("1f1b", world, m), rank, comm)
    micro = list(torch.tensor_split(torch.randn(ROWS, 8), m))
    best = float("inf")
    for step in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        executor.run(lambda k, call: call(micro[k]).sum(), lambda k, out: out)
        dist.barrier()
        if step:
            best = min(best, time.perf_counter() - start)
    return best


def _rank(rank, world, args):
    layers = _layers(args.unit_ms)
    by_params = [len(r) for r in plan_stage_split(layer_weights(layers), world)]
    holder = [None]
    if rank == 0:
        times = profile_layer_times(layers, torch.randn(ROWS, 8), torch.device("cpu"), repeats=2)
        holder = [balance_by_time(times, world)]
    dist.broadcast_object_list(holder, 0)
    by_time = holder[0]
    result = {
        "params": (by_params, _step_time(rank, world, layers, by_params, args.m, args.steps)),
        "time": (by_time, _step_time(rank, world, layers, by_time, args.m, args.steps)),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--unit-ms", type=float, default=4.0, help="forward sleep of one cost unit for a whole batch")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = on_ranks(_rank, args.pp, args)
    print(f"layer costs {COSTS} (equal parameters), pp={args.pp}, m={args.m}, 1F1B")
    for key, label in (("params", "split by parameter count"), ("time", "split by measured time")):
        counts = results[0][key][0]
        step = max(results[r][key][1] for r in range(args.pp))
        print(f"{label:26} layers per stage {counts}: step {step * 1000:.0f} ms")
    ratio = max(results[r]["params"][1] for r in range(args.pp)) / max(results[r]["time"][1] for r in range(args.pp))
    print(f"time-balanced split is {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
