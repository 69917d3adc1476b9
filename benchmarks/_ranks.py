"""Run one function on N gloo ranks for a benchmark and collect what each returns."""

from __future__ import annotations

import os
import queue as queue_module
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_pp.platform import distributed_backend_for

__all__ = ["collect", "on_ranks"]


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
        results = dict(collect(queue, procs, len(procs), timeout))
        for p in procs:
            p.join()
    return results


def collect(queue: "mp.Queue", procs: Sequence[Any], count: int, timeout: float) -> list[Any]:
    """Takes ``count`` items from ``queue`` that the spawned ``procs`` put there.

    Fails at once when a rank exits without its item (its traceback is above), rather
    than after ``timeout`` seconds: the other ranks would wait for it forever.
    """
    items: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(items) < count:
        try:
            items.append(queue.get(timeout=1.0))
            continue
        except queue_module.Empty:
            pass
        dead = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            why = f"rank {dead[0][0]} exited with code {dead[0][1]} (its traceback is above)" if dead else (
                f"no result within {timeout:.0f} s")
            raise RuntimeError(f"benchmark ranks failed: {why}")
    return items
