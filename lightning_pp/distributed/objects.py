"""Python objects across ranks: a broadcast, a gather of one integer and a barrier that name their failures.

Small control messages (a checkpoint path, a save's outcome, the last stage's loss
and logs, a FlashInfer handle) travel as pickled objects. Each call here wraps the
collective in :func:`~lightning_pp.distributed.errors.named_failures`, so a rank lost
during it surfaces as a :class:`~lightning_pp.distributed.errors.CollectiveError`
saying what was being shared, and takes its source as a *global* rank, which is
what ``torch.distributed`` expects even for a sub-group.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional, TypeVar

import torch
import torch.distributed as dist

from lightning_pp.distributed.errors import named_failures

__all__ = ["all_gather_int", "barrier", "broadcast_object"]

T = TypeVar("T")


def broadcast_object(
    obj: T,
    *,
    src: int,
    group: Optional[dist.ProcessGroup] = None,
    operation: str,
    timeout: Optional[timedelta] = None,
) -> T:
    """``obj`` from global rank ``src`` on every rank of ``group`` (the world when ``None``).

    Args:
        obj: the value to send (on ``src``); other ranks' values are ignored.
        src: the sender's *global* rank (convert a group rank with
            ``dist.get_global_rank(group, r)``).
        group: the process group; use a CPU (gloo) group where there is one, so no
            device round trip is paid for a pickle.
        operation: what is shared, completing "could not ...", for the error message.
        timeout: the group's timeout, for the error message.

    Without an initialised process group, ``obj`` is returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    with named_failures(operation, group, timeout=timeout):
        dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_int(
    value: int, group: Optional[dist.ProcessGroup] = None, *, operation: str, timeout: Optional[timedelta] = None
) -> list[int]:
    """Every rank's ``value`` (a signed 64-bit integer), by rank in ``group``: one host collective, nothing pickled.

    ``group`` must take CPU tensors (gloo, or a device group's CPU twin).
    """
    mine = torch.tensor([value], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    with named_failures(operation, group, timeout=timeout):
        dist.all_gather(everyone, mine, group=group)
    return [int(t.item()) for t in everyone]


def barrier(group: Optional[dist.ProcessGroup] = None, *, operation: str, timeout: Optional[timedelta] = None) -> None:
    """Waits for every rank of ``group``; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        with named_failures(operation, group, timeout=timeout):
            dist.barrier(group=group)
