"""Errors that say which transfer or collective failed, on which rank, with whom, and why.

A rank lost inside a collective (a barrier, a broadcast of Python objects, the
gradient all-reduce over data-parallel replicas, the loss broadcast over the
pipeline) surfaces from gloo as, e.g.::

    RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40123

which names no rank, no operation and no group. Wrapping the call site in
:func:`named_failures` turns that into a :class:`CollectiveError`::

    with named_failures("all-reduce the gradients over the data-parallel replicas", dp_group):
        dist.all_reduce(flat, group=dp_group)

    CollectiveError: Global rank 0 could not all-reduce the gradients over the data-parallel replicas
    (a collective over global ranks [0, 2]): lost the connection: a rank of that group died or closed its
    connection (gloo: Connection closed by peer [127.0.0.1]:40123). ...

A point-to-point transfer fails as a :class:`PipeCommError` naming its peer. A
collective cannot name *the* peer: any rank of the group may be the one that died or
stalled, and the backend does not say which, so the message lists the group's global
ranks and says how to find it. Both classify the backend's text the same way
(:func:`describe_failure`).

Nothing here imports Lightning or names a device: it takes a process group.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

from lightning_pp.distributed.interrupts import blocking_region

__all__ = [
    "CollectiveError",
    "PayloadError",
    "PipeCommError",
    "describe_collective_failure",
    "describe_failure",
    "group_global_ranks",
    "named_failures",
]

#: gloo: "Timed out waiting 10000ms for recv operation to complete".
_GLOO_WAITED = re.compile(r"waiting (\d+)\s*ms", re.IGNORECASE)
#: The source location gloo puts first: "[/path/to/gloo/transport/tcp/pair.cc:537] ".
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*:\d+\]\s*")


class PayloadError(TypeError):
    """A stage produced something that cannot be sent to the next stage."""


class PipeCommError(RuntimeError):
    """A point-to-point transfer failed: the peer stalled past the timeout, or died.

    Attributes:
        rank: this process's global rank.
        peer: the peer's global rank.
        operation: ``"send"`` or ``"receive"``, and what was being moved.
    """

    def __init__(self, message: str, *, rank: int, peer: int, operation: str) -> None:
        super().__init__(message)
        self.rank, self.peer, self.operation = rank, peer, operation


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a rank of its group died or stalled, or the backend failed.

    Attributes:
        rank: this process's global rank.
        operation: what the collective was doing, in words.
        group_ranks: the global ranks of the collective's group.
        cause: ``"lost"`` (a connection closed), ``"timeout"`` or ``"failed"`` (anything else).
    """

    def __init__(self, message: str, *, rank: int, operation: str, group_ranks: Sequence[int], cause: str) -> None:
        super().__init__(message)
        self.rank, self.operation, self.group_ranks, self.cause = rank, operation, tuple(group_ranks), cause


def group_global_ranks(group: Optional[dist.ProcessGroup] = None) -> list[int]:
    """The global ranks of ``group`` (the world when ``None``), or ``[]`` when that cannot be known."""
    try:
        if not dist.is_initialized():
            return []
        if group is None or group is dist.group.WORLD:
            return list(range(dist.get_world_size()))
        return list(dist.get_process_group_ranks(group))
    except (RuntimeError, ValueError, KeyError):
        # The group may be gone already (destroyed while the error travelled up).
        return []


def _failure_kind(text: str) -> str:
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if any(word in lowered for word in ("closed", "reset", "broken pipe", "refused", "eof")):
        return "lost"
    return "failed"


def _backend_line(text: str) -> str:
    """The backend's message without its source location and generic advice: "Connection closed by peer ..."."""
    lines = text.strip().splitlines()
    if not lines:
        return ""
    line = _SOURCE_LOCATION.sub("", lines[0].strip())
    return line.split(". This is typically", 1)[0].rstrip(".")


def _waited(timeout: Optional[timedelta], text: str) -> str:
    if timeout is not None:
        return f"{timeout.total_seconds():g}s"
    match = _GLOO_WAITED.search(text)
    if match:
        return f"{int(match.group(1)) / 1000:g}s"
    return "the process group's timeout"


def describe_failure(
    error: BaseException, *, who: str, waiting_for: str, timeout: Optional[timedelta] = None
) -> tuple[str, str]:
    """Classifies a backend error and says what it means: ``(cause, kind)``.

    Args:
        error: what the backend raised.
        who: the rank(s) at the other end, as the subject of a sentence
            ("pipeline rank 1 (global rank 3)", "a rank of that group").
        waiting_for: what that side has not reached ("the matching receive", "this collective").
        timeout: the deadline that applied, for the message (default: read from the
            backend's own message when it says how long it waited).

    Returns:
        The cause as a phrase, and its kind: ``"timeout"``, ``"lost"`` (a connection
        closed) or ``"failed"`` (anything else).
    """
    text = str(error)
    first = _backend_line(text) or type(error).__name__
    kind = _failure_kind(text)
    if kind == "timeout":
        cause = (
            f"timed out after {_waited(timeout, text)} ({first}): {who} is alive but has not reached "
            f"{waiting_for}: stalled, far behind, or on another code path (a different number of batches, an "
            "exception caught on one rank only). Find what it is doing (py-spy dump --pid <pid>), or raise "
            "PPStrategy(timeout=...) if its work is legitimately slow"
        )
    elif kind == "lost":
        cause = (
            f"lost the connection: {who} died or closed its connection ({first}). Its own log says "
            "why: look for the rank whose log stops first (a rank killed for memory leaves no traceback: check "
            "dmesg or the scheduler's log)"
        )
    else:
        cause = f"failed ({first})"
    return cause, kind


def describe_collective_failure(
    error: BaseException,
    operation: str,
    group_ranks: Sequence[int],
    *,
    rank: int,
    timeout: Optional[timedelta] = None,
) -> tuple[str, str]:
    """The message for a collective that raised ``error``, and its cause (see :class:`CollectiveError`)."""
    ranks = f"global ranks {list(group_ranks)}" if group_ranks else "its process group"
    cause, kind = describe_failure(error, who="a rank of that group", waiting_for="this collective", timeout=timeout)
    return f"Global rank {rank} could not {operation} (a collective over {ranks}): {cause}.", kind


@contextmanager
def named_failures(
    operation: str, group: Optional[dist.ProcessGroup] = None, *, timeout: Optional[timedelta] = None
) -> Iterator[None]:
    """Turns a backend error of the collective(s) inside into a :class:`CollectiveError`.

    Args:
        operation: what the collective does, as a verb phrase that completes
            "Global rank 3 could not ...", e.g. ``"all-reduce the gradients over the
            data-parallel replicas"``.
        group: the collective's process group (``None``: the world).
        timeout: the group's timeout, for the message (default: read from the
            backend's own message when it says how long it waited).

    Errors that already name their operation (:class:`CollectiveError`, and
    :class:`PipeCommError` from a transfer inside) keep their
    message, so call sites can nest; the outer ``operation`` is added as a note
    ("while trying to ...") that the traceback shows under it.

    The body is a :func:`~lightning_pp.distributed.interrupts.blocking_region`: Ctrl-C
    escalates while the main thread is stuck in it.
    """
    try:
        with blocking_region():
            yield
    except RuntimeError as error:
        if isinstance(error, (CollectiveError, PipeCommError)):
            if getattr(error, "operation", None) != operation and hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"while trying to {operation}")
            raise
        ranks = group_global_ranks(group)
        rank = dist.get_rank() if dist.is_initialized() else 0
        message, kind = describe_collective_failure(error, operation, ranks, rank=rank, timeout=timeout)
        raise CollectiveError(message, rank=rank, operation=operation, group_ranks=ranks, cause=kind) from error
