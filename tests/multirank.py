"""Run a function on N real processes that talk over gloo, and bring back their results.

Every multi-rank test builds on :func:`run_on_ranks`. Each rank is a fresh process
with one intra-op thread (2-core CI machines), joined through a ``file://`` store.
Ranks are forked from a fork server that imported torch and Lightning once for the
whole session, so a job does not pay their import (seconds per rank on a 2-core
machine); nothing of this package is preloaded, so each rank still resolves its
platform and reads its environment as a fresh interpreter does. A rank that
raises, or a job that outlives its timeout, fails the test with each rank's
traceback and kills the rest: a hang is reported, never waited out.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankFailure", "free_port", "run_on_ranks"]


class RankFailure(AssertionError):
    """One or more ranks raised, or the job did not finish in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Imported once by the fork server; the heavy third-party part of every rank's start.
_PRELOAD = ["torch", "torch.distributed", "lightning", "lightning.pytorch"]
_context: Optional[Any] = None


def _rank_context() -> Any:
    """The fork-server context every job uses (started on first use, kept for the session)."""
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _context = ctx
    return _context


def _rank_main(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    args: tuple,
    results: "mp.Queue",
    init_file: Optional[str],
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    try:
        if init_file is not None:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # Plain pickle: tensors travel by value, not as shared-memory handles that
        # die with this process.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    init_process_group: bool = True,
    env: Optional[dict[str, str]] = None,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of ranks.
        timeout: seconds before the whole job is declared hung and killed.
        init_process_group: join a gloo group before calling ``fn``. Pass ``False``
            for code that creates its own (a Lightning ``Trainer`` under a
            torchrun-like environment: ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
            ``LOCAL_RANK``/``WORLD_SIZE`` are set for it).
        env: extra environment variables for every rank.

    Returns:
        Each rank's return value, in rank order (they must be picklable).
    """
    ctx = _rank_context()
    results = ctx.Queue()
    rank_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0", **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store") if init_process_group else None
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, fn, args, results, init_file, rank_env), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outcome: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcome) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    rank, status, value = results.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs) and _drained(procs, outcome):
                        break
                    continue
                outcome[rank] = (status, pickle.loads(value) if status == "ok" else value)
                if status == "error":
                    # Peers of a failed rank usually block in a collective: give them a
                    # moment to fail by themselves, then stop waiting.
                    deadline = min(deadline, time.monotonic() + 5.0)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
    errors = [f"rank {r} raised:\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcome]
    if errors or missing:
        parts = errors
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            parts = parts + [f"ranks {missing} did not finish within {timeout:.0f}s (exit codes {codes})"]
        raise RankFailure("\n".join(parts))
    return [outcome[r][1] for r in range(world_size)]


def _drained(procs: list, outcome: dict) -> bool:
    """True when some rank died without reporting anything (e.g. a segfault)."""
    return any(p.exitcode not in (None, 0) and i not in outcome for i, p in enumerate(procs))
