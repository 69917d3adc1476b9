"""Run one function on N gloo ranks for a benchmark and collect what each returns."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_pp.platform import distributed_backend_for

__all__ = ["on_ranks"]


def _main(rank: int, world: int, fn: Callable[..., Any], args: tuple, init_file: str, queue: "mp.Queue") -> None:
    torch.set_num_threads(1)
    backend = distributed_backend_for("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def on_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600.0) -> dict[int, Any]:
    """Runs ``fn(rank, world, *args)`` on ``world`` spawned ranks; returns ``{rank: result}``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_main, args=(r, world, fn, args, init_file, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=timeout) for _ in procs)
        for p in procs:
            p.join()
    return results
