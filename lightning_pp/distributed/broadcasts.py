"""A small tree of tensors and plain values from one rank to its group: one collective when its layout repeats.

After every training step the last pipeline stage shares the loss and the logged
values with every stage. ``broadcast_object_list`` pickles them and runs two
collectives (the size, then the bytes), every step, although only the numbers
change. :class:`RepeatedBroadcast` remembers the last *layout* (the tree's
structure, the tensors' shapes and dtypes, the plain values that are not numbers),
which every rank of the group knows alike, and sends one buffer::

    int64 flag   0: same layout, the values follow; 1: the layout changed
    bytes        each tensor's bytes, then each Python number as 8 bytes

When the flag says the layout changed, the payload follows pickled, as before, and
becomes the new layout. The first call has no layout yet anywhere, so it goes
pickled directly. Every rank must call in the same order with the same ``src``
(keep one instance per kind of message).

A receiving rank may :meth:`~RepeatedBroadcast.post` its part of the next call ahead
of time, once the layout is known: the source's buffer then lands while the rank
is still busy (the last pipeline stage finishes a training step well before the
first one), and the call that follows only collects it.
"""

from __future__ import annotations

import math
import weakref
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from lightning_pp.distributed.errors import named_failures
from lightning_pp.distributed.objects import broadcast_object
from lightning_pp.platform import distributed_backend_for
from lightning_pp.tree import tree_flatten, tree_unflatten

__all__ = ["RepeatedBroadcast"]

_NUMBER = "number"  # a Python int or float leaf: sent in the buffer, rebuilt as its type


def _layout_of(payload: Any) -> tuple[Any, list[Any], list[torch.Tensor]]:
    """(structure, leaf descriptions, the bytes-to-send of each tensor and number leaf in leaf order)."""
    structure, leaves = tree_flatten(payload)
    described: list[Any] = []
    values: list[torch.Tensor] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append(("tensor", tuple(leaf.shape), leaf.dtype))
            values.append(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
        elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            described.append((_NUMBER, type(leaf)))
            dtype = torch.float64 if isinstance(leaf, float) else torch.int64
            values.append(torch.tensor([leaf], dtype=dtype).view(torch.uint8))
        else:
            described.append(("value", leaf))
    return structure, described, values


def _nbytes(described: list[Any]) -> int:
    size = 0
    for d in described:
        if d[0] == "tensor":
            size += math.prod(d[1]) * torch.empty((), dtype=d[2]).element_size()
        elif d[0] == _NUMBER:
            size += 8
    return size


class RepeatedBroadcast:
    """Broadcasts payloads from global rank ``src`` over ``group``; a repeated layout costs one small collective.

    Args:
        group: a CPU (gloo) group, so the buffer never visits a device.
        src: the sender's global rank.
        operation: what is shared, completing "could not ...", for error messages.
        timeout: the group's timeout, for error messages.
    """

    def __init__(
        self, group: Optional[dist.ProcessGroup], src: int, *, operation: str, timeout: Optional[timedelta] = None
    ) -> None:
        # A weak reference: releasing the process groups at exit must not be held up by this.
        self._group = weakref.ref(group) if group is not None else None
        self.src, self.operation, self.timeout = src, operation, timeout
        self._layout: Optional[tuple[Any, list[Any]]] = None  # alike on every rank
        self._posted: Optional[tuple[torch.Tensor, Any]] = None  # (buffer, work) of a receive posted ahead
        #: Calls that went pickled (the first, and each change of layout).
        self.num_pickled = 0

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The group (``None``: the default group)."""
        if self._group is None:
            return None
        group = self._group()
        if group is None:
            raise RuntimeError(f"The process group to {self.operation} over was released; build a new broadcast.")
        return group

    def post(self) -> bool:
        """Starts this rank's part of the next call now, so the source's buffer lands meanwhile.

        Only on a receiving rank, once a layout is known (it sizes the buffer), and only
        over a host (gloo) group: a posted collective waits in one of gloo's worker threads,
        whereas on a device backend it would hold up the stream that later transfers
        queue on. The next call completes it; calling again first does nothing.

        Returns:
            whether a receive is now posted.
        """
        if self._posted is not None:
            return True
        on_host = dist.get_backend(self.group) == distributed_backend_for("cpu")
        if self._layout is None or dist.get_rank() == self.src or not on_host:
            return False
        buffer = torch.zeros(8 + _nbytes(self._layout[1]), dtype=torch.uint8)
        with named_failures(self.operation, self.group, timeout=self.timeout):
            work = dist.broadcast(buffer, src=self.src, group=self.group, async_op=True)
        self._posted = (buffer, work)
        return True

    def landed(self) -> bool:
        """Whether a receive posted by :meth:`post` has its buffer (the next call will not wait)."""
        return self._posted is not None and bool(self._posted[1].is_completed())

    def __call__(self, payload: Any = None) -> Any:
        """``payload`` of ``src``, on every rank (other ranks' arguments are ignored)."""
        is_src = dist.get_rank() == self.src
        if self._layout is not None:
            structure, described = self._layout
            posted, self._posted = self._posted, None
            buffer = posted[0] if posted is not None else torch.zeros(8 + _nbytes(described), dtype=torch.uint8)
            if is_src:
                mine = _layout_of(payload)
                if (mine[0], mine[1]) == (structure, described):
                    buffer = _pack(mine[2])
                else:
                    buffer[:8] = torch.tensor([1], dtype=torch.int64).view(torch.uint8)
            with named_failures(self.operation, self.group, timeout=self.timeout):
                if posted is not None:
                    posted[1].wait()
                else:
                    dist.broadcast(buffer, src=self.src, group=self.group)
            if int(buffer[:8].view(torch.int64)[0]) == 0:
                return _unpack(structure, described, buffer)
        self.num_pickled += 1
        payload = broadcast_object(payload, src=self.src, group=self.group, operation=self.operation,
                                   timeout=self.timeout)
        structure, described, _ = _layout_of(payload)
        self._layout = (structure, described)
        return payload


def _pack(values: list[torch.Tensor]) -> torch.Tensor:
    """The flag (0: same layout), then each tensor's bytes and each number as 8 bytes, in leaf order."""
    return torch.cat([torch.zeros(1, dtype=torch.int64).view(torch.uint8), *values])


def _unpack(structure: Any, described: list[Any], buffer: torch.Tensor) -> Any:
    offset = 8
    leaves: list[Any] = []
    for d in described:
        if d[0] == "tensor":
            _, shape, dtype = d
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            leaves.append(buffer[offset : offset + size].clone().view(dtype).view(shape))
            offset += size
        elif d[0] == _NUMBER:
            raw = buffer[offset : offset + 8].clone()
            leaves.append(float(raw.view(torch.float64)[0]) if d[1] is float else int(raw.view(torch.int64)[0]))
            offset += 8
        else:
            leaves.append(d[1])
    return tree_unflatten(structure, leaves)
