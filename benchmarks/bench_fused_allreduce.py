"""Fused vs unfused all-reduce + residual add + RMSNorm.

    python benchmarks/bench_fused_allreduce.py                 # CPU, 2 and 4 ranks
    python benchmarks/bench_fused_allreduce.py --device cuda   # FlashInfer kernel, if present

*Unfused* is what a model does without the fusion: ``all_reduce`` the row-parallel
output, add the residual, then a separate RMSNorm module (fp32 statistics, the
usual Llama implementation). *Fused* is ``lightning_pp.parallel.allreduce_add_rmsnorm``.
On CPU (and on any device without FlashInfer) the fused call is the exact
fallback, the same work in a slightly different order, so expect a ratio near 1:
the number is printed as measured. On CUDA with flashinfer-python and 2+ GPUs the
fused call runs FlashInfer's kernel after ``pre_initialize_allreduce_fusion``.

Each configuration alternates rounds of unfused and fused iterations (so drift on
a shared machine hits both alike) and reports the median round, per iteration,
taking the slowest rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.parallel import (
    allreduce_add_rmsnorm,
    destroy_allreduce_fusion_workspaces,
    pre_initialize_allreduce_fusion,
)
from lightning_pp.platform import current_platform, distributed_backend_for

from _ranks import collect


def unfused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, group, eps: float = 1e-6) -> tuple:
    y = x.clone()
    dist.all_reduce(y, group=group)
    residual = y + residual
    h = residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), residual


def _worker(rank: int, world_size: int, init_file: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    on_device = args.device != "cpu"
    platform = current_platform()
    backend = platform.dist_backend if on_device else distributed_backend_for("cpu")
    if on_device:
        platform.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    device = platform.device(rank) if on_device else torch.device("cpu")
    ranks = tuple(range(world_size))
    # Control messages (the kernel agreement, the timing summary) go over a CPU-backend group.
    cpu_group = dist.new_group(list(ranks), backend=distributed_backend_for("cpu")) if on_device else dist.group.WORLD
    group = ParallelGroup("world", ranks, device_group=dist.group.WORLD, cpu_group=cpu_group)
    sync = platform.synchronize if on_device else (lambda: None)
    rows = []
    for dtype in args.dtypes:
        dtype = getattr(torch, dtype)
        enabled = {}
        if on_device:
            enabled = pre_initialize_allreduce_fusion(
                [group], max_num_tokens=max(args.tokens), hidden_size=args.hidden, dtype=dtype
            )
        for num_tokens in args.tokens:
            gen = torch.Generator().manual_seed(rank)
            x = torch.randn(num_tokens, args.hidden, generator=gen).to(device=device, dtype=dtype)
            residual = torch.randn(num_tokens, args.hidden, generator=gen).to(device=device, dtype=dtype)
            weight = torch.ones(args.hidden, dtype=dtype, device=device)
            fns = {
                "unfused": lambda x=x, residual=residual, weight=weight: unfused(x, residual, weight, dist.group.WORLD),
                "fused": lambda x=x, residual=residual, weight=weight: allreduce_add_rmsnorm(
                    x, residual, weight, group=group
                ),
            }
            times = {name: [] for name in fns}
            with torch.no_grad():
                for fn in fns.values():
                    for _ in range(args.warmup):
                        fn()
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        dist.barrier()
                        sync()
                        start = time.perf_counter()
                        for _ in range(args.iters):
                            fn()
                        sync()
                        times[name].append((time.perf_counter() - start) / args.iters)
            medians = torch.tensor([statistics.median(times[k]) for k in ("unfused", "fused")], dtype=torch.float64)
            dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=cpu_group)  # the slowest rank sets the pace
            dtype_name = str(dtype).replace("torch.", "")
            rows.append((world_size, dtype_name, num_tokens, *medians.tolist(), enabled.get("world", False)))
        destroy_allreduce_fusion_workspaces()
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def run(world_size: int, args: argparse.Namespace) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store, args, queue)) for r in range(world_size)]
        for p in procs:
            p.start()
        [rows] = collect(queue, procs, 1, timeout=1800)
        for p in procs:
            p.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cuda":
        platform = current_platform()
        if platform.device_type != "cuda" or platform.device_count() < max(args.world_sizes):
            raise SystemExit(f"--device cuda needs {max(args.world_sizes)} CUDA devices; this machine has fewer.")
        if not platform.has_fused_allreduce:
            print("flashinfer-python is not installed: 'fused' below is the fallback, not the kernel.")

    print(f"hidden={args.hidden} device={args.device} threads/rank=1 iters={args.iters} rounds={args.rounds}")
    print(f"{'ranks':>5} {'dtype':>8} {'tokens':>6} {'unfused us':>11} {'fused us':>9} {'unfused/fused':>13} kernel")
    for world_size in args.world_sizes:
        for ws, dtype, tokens, t_unfused, t_fused, kernel in run(world_size, args):
            print(
                f"{ws:>5} {dtype:>8} {tokens:>6} {t_unfused * 1e6:>11.1f} {t_fused * 1e6:>9.1f} "
                f"{t_unfused / t_fused:>13.2f} {kernel}"
            )


if __name__ == "__main__":
    main()
