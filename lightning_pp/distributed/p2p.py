"""Where tensors cross pipeline ranks: structured point-to-point send and receive.

A stage's output may be a tensor, or a tuple/list/dict of tensors (nested). The
receiver cannot know the structure, shapes or dtypes in advance (sequence length
may change every batch), so every transfer starts with its layout (a pickled
structure with each tensor's shape and dtype), followed by the tensors, and
every receive allocates fresh buffers: no stale buffer is ever reused. Metadata
travels over the CPU twin group when there is one, so device backends never pay
a device round trip for a few integers.

Each message costs a round of latency, which dominates small stages (a decode
step moves a few kilobytes). So a transfer is as few messages as its content
allows::

    header   one int64: the layout's byte length, or -1 = "same layout as your last
             one from me" (each side keeps the last layout per peer)
    layout   only when it changed
    tensors  one message per dtype: the tensors of that dtype packed into one flat
             buffer (a lone tensor goes as it is); empty ones send nothing

The receiver unpacks a flat buffer into disjoint views, each a leaf of its own
(gradients stay per tensor).

Every operation here is *blocking*. That is deliberate: the schedule that drives
this module is proven deadlock-free under the strictest model, in which a send
does not return until the peer has posted the matching receive (Intel XCCL
behaves so; see ``lightning_pp.pipeline.schedules``). Code that is safe under that model
is safe under every weaker one.

Each transfer has a deadline (``timeout``): a peer that stalls, or dies, surfaces
as a :class:`PipeCommError` naming this rank, the peer and the transfer, never as a
rank waiting forever in a receive.
"""

from __future__ import annotations

import math
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from lightning_pp.distributed.errors import (
    PayloadError,
    PipeCommError,
    describe_failure,
)
from lightning_pp.distributed.interrupts import blocking_region
from lightning_pp.platform import Platform, current_platform
from lightning_pp.tree import TreeSpec, leaf_paths, tree_flatten, tree_unflatten

__all__ = [
    "PayloadError",
    "PipeComm",
    "PipeCommError",
    "TorchTransport",
    "Transport",
    "flatten_payload",
    "unflatten_payload",
]


class Transport(Protocol):
    """Blocking tensor send/receive between two global ranks of ``group``."""

    def send(self, tensor: torch.Tensor, dst: int, group: Optional[dist.ProcessGroup]) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int, group: Optional[dist.ProcessGroup]) -> None: ...


class TorchTransport:
    """The real thing: ``torch.distributed`` send/receive with global ranks.

    Args:
        timeout: longest wait for one transfer; ``None`` uses the process group's.
            ``dist.send``/``dist.recv`` take no per-call timeout, so this posts the
            transfer and waits on its handle with one (the same work, no extra cost).
    """

    def __init__(self, timeout: Optional[timedelta] = None) -> None:
        self.timeout = timeout

    def _wait(self, work: Any) -> None:
        if self.timeout is None:
            work.wait()
        else:
            work.wait(timeout=self.timeout)

    def send(self, tensor: torch.Tensor, dst: int, group: Optional[dist.ProcessGroup]) -> None:
        self._wait(dist.isend(tensor, dst=dst, group=group))

    def recv(self, tensor: torch.Tensor, src: int, group: Optional[dist.ProcessGroup]) -> None:
        self._wait(dist.irecv(tensor, src=src, group=group))


@dataclass(frozen=True)
class _Leaf:
    """Where a tensor sits in a payload, and how to rebuild it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def flatten_payload(payload: Any, *, where: str = "stage output") -> tuple[TreeSpec, list[Optional[torch.Tensor]]]:
    """Splits a payload into a picklable structure and its tensors (``None`` leaves allowed).

    Raises:
        PayloadError: a leaf is neither a tensor nor ``None``.
    """
    structure, leaves = tree_flatten(payload)
    for i, leaf in enumerate(leaves):
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            path = leaf_paths(payload)[i]
            raise PayloadError(
                f"{where} contains {type(leaf).__name__} at {path or 'the top level'}; pipeline stages may only pass "
                "tensors, or tuples, lists and dicts of tensors, to the next stage. Move other values into the "
                "tensors (e.g. torch.tensor(value)) or compute them outside the pipelined nn.Sequential."
            )
    return structure, leaves


#: Inverse of :func:`flatten_payload`.
unflatten_payload = tree_unflatten


class PipeComm:
    """Sends and receives payloads between the ranks of one pipeline.

    Args:
        group: the pipeline's process group (device backend).
        device: this rank's device; received tensors land here.
        meta_group: group for metadata messages (the CPU twin of ``group``); defaults
            to ``group``, which is right on the CPU.
        transport: the tensor mover; tests substitute one whose sends block until the
            receiver has posted its receive.
        platform: device facts; the process platform by default.
        timeout: deadline of each transfer of the default transport (``None``: the
            process group's own timeout).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        device: torch.device,
        *,
        meta_group: Optional[dist.ProcessGroup] = None,
        transport: Optional[Transport] = None,
        platform: Optional[Platform] = None,
        timeout: Optional[timedelta] = None,
    ) -> None:
        self.group = group
        self.meta_group = meta_group if meta_group is not None else group
        self.device = device
        self.timeout = timeout
        self.transport: Transport = transport or TorchTransport(timeout)
        self.platform = platform or current_platform()
        self._meta_device = torch.device("cpu") if meta_group is not None else device
        # The last layout sent to / received from each peer (global rank): a repeat
        # costs one small header instead of two messages.
        self._sent_layout: dict[int, bytes] = {}
        self._received_layout: dict[int, tuple[Any, list[Optional[_Leaf]]]] = {}

    def global_rank(self, pp_rank: int) -> int:
        """The global rank of pipeline rank ``pp_rank`` (``dist`` APIs take global ranks)."""
        return dist.get_global_rank(self.group, pp_rank) if self.group is not None else pp_rank

    def send(self, payload: Any, dst_pp_rank: int, *, where: str = "stage output") -> None:
        """Sends ``payload`` to pipeline rank ``dst_pp_rank``; returns when the transfer completed."""
        structure, tensors = flatten_payload(payload, where=where)
        leaves = [None if t is None else _Leaf(tuple(t.shape), t.dtype, t.requires_grad) for t in tensors]
        layout = pickle.dumps((structure, leaves))
        dst = self.global_rank(dst_pp_rank)
        with self._failures("send", where, "to", dst_pp_rank, dst):
            repeat = self._sent_layout.get(dst) == layout
            header = torch.tensor([_SAME_LAYOUT if repeat else len(layout)], dtype=torch.int64)
            self.transport.send(header.to(self._meta_device), dst, self.meta_group)
            if not repeat:
                meta = torch.frombuffer(bytearray(layout), dtype=torch.uint8)
                self.transport.send(meta.to(self._meta_device), dst, self.meta_group)
                self._sent_layout[dst] = layout
            for bucket in _dtype_buckets(leaves):
                if len(bucket) == 1:
                    self.transport.send(_bucketed_tensor(tensors, bucket[0]).detach().contiguous(), dst, self.group)
                else:
                    flat = torch.cat([_bucketed_tensor(tensors, i).detach().reshape(-1) for i in bucket])
                    self.transport.send(flat, dst, self.group)

    def recv(self, src_pp_rank: int, *, what: str = "a payload") -> Any:
        """Receives the next payload from pipeline rank ``src_pp_rank``, in fresh buffers.

        Floating-point tensors that required grad on the sender require grad here, so
        the receiving stage's backward produces the gradient to send back.
        """
        src = self.global_rank(src_pp_rank)
        with self._failures("receive", what, "from", src_pp_rank, src):
            return self._recv(src)

    def _recv(self, src: int) -> Any:
        header = torch.empty(1, dtype=torch.int64, device=self._meta_device)
        self.transport.recv(header, src, self.meta_group)
        size = int(header.item())
        if size == _SAME_LAYOUT:
            if src not in self._received_layout:
                raise RuntimeError(
                    f"global rank {src} repeated a layout it never sent (sender and receiver out of step)."
                )
            structure, leaves = self._received_layout[src]
        else:
            meta = torch.empty(size, dtype=torch.uint8, device=self._meta_device)
            self.transport.recv(meta, src, self.meta_group)
            structure, leaves = pickle.loads(meta.cpu().numpy().tobytes())
            self._received_layout[src] = (structure, leaves)
        tensors: list[Optional[torch.Tensor]] = [None] * len(leaves)
        for bucket in _dtype_buckets(leaves):
            shapes = [leaves[i].shape for i in bucket]  # type: ignore[union-attr]
            numels = [math.prod(shape) for shape in shapes]
            flat = torch.empty(sum(numels), dtype=leaves[bucket[0]].dtype, device=self.device)  # type: ignore[union-attr]
            self.transport.recv(flat, src, self.group)
            for i, part, shape in zip(bucket, flat.split(numels), shapes):
                tensors[i] = part.view(shape)
        for i, leaf in enumerate(leaves):
            tensor = tensors[i]
            if leaf is None:
                continue
            if tensor is None:  # an empty tensor: nothing was sent for it
                tensor = torch.empty(leaf.shape, dtype=leaf.dtype, device=self.device)
            if leaf.requires_grad and (tensor.is_floating_point() or tensor.is_complex()):
                # A leaf of its own, even when it views a shared flat buffer.
                tensor = tensor.detach().requires_grad_(True)
            tensors[i] = tensor
        return unflatten_payload(structure, tensors)

    @contextmanager
    def _failures(self, verb: str, what: str, preposition: str, peer_pp_rank: int, peer: int) -> Iterator[None]:
        """Turns a backend error of one transfer into a :class:`PipeCommError` that names both ends.

        The transfer is a :func:`~lightning_pp.distributed.interrupts.blocking_region`
        (Ctrl-C escalates while the main thread is stuck in it).
        """
        try:
            with blocking_region():
                yield
        except RuntimeError as error:
            if isinstance(error, PipeCommError):
                raise
            me = dist.get_rank() if dist.is_initialized() else 0
            my_pp_rank = dist.get_rank(self.group) if self.group is not None else 0
            cause, _ = describe_failure(
                error,
                who=f"pipeline rank {peer_pp_rank} (global rank {peer})",
                waiting_for=f"the matching {'receive' if verb == 'send' else 'send'}",
                timeout=self.timeout,
            )
            operation = f"{verb} {what}"
            raise PipeCommError(
                f"Pipeline rank {my_pp_rank} (global rank {me}) could not {operation} {preposition} pipeline rank "
                f"{peer_pp_rank} (global rank {peer}): {cause}.",
                rank=me,
                peer=peer,
                operation=operation,
            ) from error


_SAME_LAYOUT = -1


def _dtype_buckets(leaves: list[Optional[_Leaf]]) -> list[list[int]]:
    """Indices of the non-empty tensors grouped by dtype, in order of first appearance.

    Sender and receiver compute it from the same layout, so they agree on the messages.
    """
    buckets: dict[torch.dtype, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if leaf is not None and math.prod(leaf.shape) > 0:
            buckets.setdefault(leaf.dtype, []).append(i)
    return list(buckets.values())


def _bucketed_tensor(tensors: list[Optional[torch.Tensor]], i: int) -> torch.Tensor:
    """``tensors[i]``, an index from :func:`_dtype_buckets`, which lists only present tensors."""
    tensor = tensors[i]
    if tensor is None:
        raise RuntimeError(f"payload leaf {i} is None but was bucketed as a tensor to send.")
    return tensor

