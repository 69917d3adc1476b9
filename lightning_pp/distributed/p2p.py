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
             one from me" (each side keeps the last layout per peer and channel)
    layout   only when it changed
    tensors  one message per dtype: the tensors of that dtype packed into one flat
             buffer (a lone tensor goes as it is); empty ones send nothing

The receiver unpacks a flat buffer into disjoint views, each a leaf of its own
(gradients stay per tensor). Whether the layout changed is decided by comparing the
structure and leaf descriptions; the layout is pickled only when it did.

Once a layout repeated, the receiver bets on the next one being the same (a
training or decode step is) and posts the data buffers together with the header,
so both are in flight at once; on the CPU, where header and data share one group,
they then travel as *one* message (the header, then every dtype's bytes, 8-byte
aligned). Both ends track the bet alike; a sender whose layout changed after all
first fills what the receiver posted (the header says so), then sends as above.

Sends and receives run in the order the caller makes them, and that order is what
the schedules prove deadlock-free under the strictest model, in which a send does
not complete until the peer has posted the matching receive (Intel XCCL behaves
so, and so does gloo: its ``isend`` completes only once the receiver is there;
see ``lightning_pp.pipeline.schedules``). A send may be *posted* without waiting
for it (``send(..., wait=False)``): the caller goes on computing while the
receiver catches up, and :meth:`PipeComm.wait_sends` later waits for every posted
send. A send that does not wait never blocks its sender, so an order that
completes when sends block completes when they do not; the buffers of a posted
send are kept until it is done.

Each transfer has a deadline (``timeout``): a peer that stalls, or dies, surfaces
as a :class:`PipeCommError` naming this rank, the peer and the transfer, never as a
rank waiting forever in a receive. On gloo the host waits with that deadline. On
device backends whose ``wait()`` makes the current stream wait instead of the host
(NCCL), received data is waited for on the stream, so the host queues the next
kernels during the transfer, and a :class:`~lightning_pp.distributed.deadlines.Watchdog`
thread enforces the deadline of every transfer still in flight.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from lightning_pp.distributed.deadlines import Watchdog
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
    "PostedRecv",
    "TorchTransport",
    "Transport",
    "flatten_payload",
    "unflatten_payload",
]


class Transport(Protocol):
    """Blocking tensor send/receive between two global ranks of ``group``.

    A transport may also offer ``isend(tensor, dst, group)`` and ``irecv(tensor, src,
    group)`` returning a handle with ``wait(timeout=...)`` and ``is_completed()``
    (``torch.distributed``'s work objects); :class:`PipeComm` then posts sends
    without waiting for them. Without ``isend`` every send blocks, which is how the
    tests model a backend whose send waits for its receiver.
    """

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

    def isend(self, tensor: torch.Tensor, dst: int, group: Optional[dist.ProcessGroup]) -> Any:
        """Posts a send and returns its work handle (the caller keeps ``tensor`` alive until it is done)."""
        return dist.isend(tensor, dst=dst, group=group)

    def irecv(self, tensor: torch.Tensor, src: int, group: Optional[dist.ProcessGroup]) -> Any:
        """Posts a receive and returns its work handle."""
        return dist.irecv(tensor, src=src, group=group)


class PostedRecv:
    """A receive posted ahead of time by :meth:`PipeComm.post_recv` (its header, maybe its predicted data)."""

    def __init__(self, src: int, src_pp_rank: int, channel: Any, what: str) -> None:
        self.src, self.src_pp_rank, self.channel, self.what = src, src_pp_rank, channel, what
        self.header: Optional[torch.Tensor] = None  # its own buffer, unless fused
        self.header_work: Any = None
        self.data: list[tuple[torch.Tensor, Any]] = []
        self.fused: Optional[torch.Tensor] = None  # header and data in one byte buffer (CPU)

    def landed(self) -> bool:
        """Whether everything posted for this receive has arrived (``False`` when unsure)."""
        return self.header_work is not None and _is_completed(self.header_work) and all(
            _is_completed(work) for _, work in self.data
        )


@dataclass
class _InFlight:
    """A posted transfer: its handle, the buffers it reads or writes, and whom it is with."""

    work: Any
    buffers: tuple[torch.Tensor, ...]
    verb: str  # "send" or "receive"
    what: str
    peer_pp_rank: int
    peer: int
    posted_at: float


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
        stream_ordered: whether a transfer's ``wait()`` makes the current device stream
            wait rather than the host (NCCL); by default the platform's answer for
            ``group``'s backend. Then received tensors are waited for on the stream and
            a watchdog thread enforces ``timeout``.
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
        stream_ordered: Optional[bool] = None,
    ) -> None:
        self.group = group
        self.meta_group = meta_group if meta_group is not None else group
        self.device = device
        self.timeout = timeout
        self.transport: Transport = transport or TorchTransport(timeout)
        self.platform = platform or current_platform()
        self._meta_device = torch.device("cpu") if meta_group is not None else device
        has_group = group is not None and dist.is_initialized()
        backend = str(dist.get_backend(group)) if has_group else self.platform.dist_backend
        if stream_ordered is None:
            stream_ordered = self.platform.transfers_wait_on_stream(backend)
        self.stream_ordered = stream_ordered
        # One channel in host memory (gloo on the CPU): once the receiver predicts the
        # layout, header and data travel as one message (one post and one wait per side).
        self._fuses = meta_group is None and device.type == "cpu" and not stream_ordered
        #: A posted send blocks nothing, on the host or on a device stream: the transport
        #: can post sends, ``isend`` does not itself wait for the receiver (XCCL's does),
        #: and transfers are not stream-ordered (NCCL runs a pair's sends and receives in
        #: posting order on one stream, where a send waits for its receiver). Only then
        #: may a caller post sends, or receives, ahead of the proven order.
        self.sends_never_block = (
            getattr(self.transport, "isend", None) is not None
            and not self.platform.posting_a_send_blocks(backend)
            and not stream_ordered
        )
        # The last layout sent to / received from each peer (global rank): a repeat
        # costs one small header instead of two messages, and is never pickled.
        self._sent_layout: dict[tuple[int, Any], _Plan] = {}  # by (peer, channel)
        self._received_layout: dict[tuple[int, Any], _Plan] = {}
        # Whether the receiver posts data buffers for the last layout together with the
        # header (it does after a repeated layout); tracked alike at both ends.
        self._predicting: dict[tuple[int, Any], bool] = {}  # as receiver, by (source, channel)
        self._peer_predicts: dict[tuple[int, Any], bool] = {}  # as sender, by (destination, channel)
        self._in_flight: list[_InFlight] = []  # posted sends, oldest first
        self._watchdog: Optional[Watchdog] = None
        self._global_ranks: dict[int, int] = {}

    def global_rank(self, pp_rank: int) -> int:
        """The global rank of pipeline rank ``pp_rank`` (``dist`` APIs take global ranks)."""
        rank = self._global_ranks.get(pp_rank)
        if rank is None:
            rank = dist.get_global_rank(self.group, pp_rank) if self.group is not None else pp_rank
            self._global_ranks[pp_rank] = rank
        return rank

    @property
    def num_in_flight(self) -> int:
        """Sends posted and not yet known to be complete."""
        self._reap()
        return len(self._in_flight)

    def send(
        self, payload: Any, dst_pp_rank: int, *, where: str = "stage output", wait: bool = True, channel: Any = None
    ) -> None:
        """Sends ``payload`` to pipeline rank ``dst_pp_rank``.

        Args:
            wait: return only when the transfer completed. ``False`` posts it and returns
                (when the transport can post sends); :meth:`wait_sends` waits for it, and
                its buffers stay alive until then. The order of transfers is the same
                either way.
            channel: which stream of messages to this peer the payload belongs to (e.g.
                activations of one stage, gradients of another); the receiver names the
                same channel. Each channel remembers its own last layout, so two streams
                interleaved on one peer (activations one way, gradients the other, as in
                an interleaved schedule) still repeat their layouts.
        """
        self._raise_if_expired()
        structure, tensors = flatten_payload(payload, where=where)
        leaves = [None if t is None else _Leaf(tuple(t.shape), t.dtype, t.requires_grad) for t in tensors]
        dst = self.global_rank(dst_pp_rank)
        key = (dst, channel)
        post = getattr(self.transport, "isend", None) if not wait else None
        with self._failures("send", where, "to", dst_pp_rank, dst):
            previous = self._sent_layout.get(key)
            repeat = previous is not None and previous.structure == structure and previous.leaves == leaves
            predicts = previous is not None and self._peer_predicts.get(key, False)
            fused = predicts and self._fuses  # the receiver posted one buffer for header and data
            messages: list[tuple[torch.Tensor, Optional[dist.ProcessGroup]]] = []
            flats: list[torch.Tensor] = []
            if repeat and previous is not None and fused:
                messages.append((previous.fuse(_SAME_LAYOUT_BYTES, tensors), self.group))
            elif repeat and previous is not None:
                flats = previous.flats(tensors)
                messages.append((_same_layout_header(self._meta_device), self.meta_group))
            else:
                plan = _Plan(structure, leaves)
                flats = plan.flats(tensors)
                layout = pickle.dumps((structure, leaves))
                assert previous is not None or not predicts
                if fused:
                    # The receiver posted one buffer for the previous layout: the header goes in
                    # it (the rest unread), then the new layout and data as separate messages.
                    assert previous is not None
                    messages.append((previous.fuse(_header_bytes(len(layout)), None), self.group))
                else:
                    header = torch.tensor([len(layout)], dtype=torch.int64)
                    messages.append((header.to(self._meta_device), self.meta_group))
                    if predicts:
                        # The receiver posted buffers for the previous layout with its header:
                        # fill them (unread), then say what comes instead.
                        assert previous is not None
                        messages += [(flat, self.group) for flat in previous.empty_flats(self.device)]
                meta = torch.frombuffer(bytearray(layout), dtype=torch.uint8)
                messages.append((meta.to(self._meta_device), self.meta_group))
                self._sent_layout[key] = plan
            self._peer_predicts[key] = repeat and getattr(self.transport, "irecv", None) is not None
            messages += [(flat, self.group) for flat in flats]
            for tensor, group in messages:
                if post is None:
                    self.transport.send(tensor, dst, group)
                else:
                    work = post(tensor, dst, group)
                    self._track(_InFlight(work, (tensor,), "send", where, dst_pp_rank, dst, time.monotonic()))
        self._reap()

    def wait_sends(self) -> None:
        """Waits for every posted send, each within its deadline; raises the first failure, naming the peer."""
        self._raise_if_expired()
        while self._in_flight:
            item = self._in_flight[0]
            with self._failures(item.verb, item.what, "to", item.peer_pp_rank, item.peer):
                self._wait_in_flight(item)
            self._in_flight.pop(0)
            if self._watchdog is not None:
                self._watchdog.forget(item)
        self._raise_if_expired()

    def recv(
        self, src_pp_rank: int, *, what: str = "a payload", channel: Any = None, posted: Optional["PostedRecv"] = None
    ) -> Any:
        """Receives the next payload from pipeline rank ``src_pp_rank``, in fresh buffers.

        Floating-point tensors that required grad on the sender require grad here, so
        the receiving stage's backward produces the gradient to send back.
        ``channel`` names the sender's (see :meth:`send`). ``posted``: the handle
        :meth:`post_recv` returned for this very receive, which then completes it.
        """
        self._raise_if_expired()
        if posted is None:
            posted = self.post_recv(src_pp_rank, channel=channel, what=what)
        with self._failures("receive", posted.what, "from", posted.src_pp_rank, posted.src):
            return self._finish_recv(posted)

    def post_recv(self, src_pp_rank: int, *, channel: Any = None, what: str = "a payload") -> "PostedRecv":
        """Posts the next receive from ``src_pp_rank`` now; :meth:`recv` with ``posted=`` completes it.

        Posting early lets the sender's messages land while this rank computes (a
        receive that is posted never blocks anyone). Receives must be completed in
        the order they were posted, and the next one on a channel posted only after
        the previous one there completed (its header decides what comes next).
        """
        src = self.global_rank(src_pp_rank)
        key = (src, channel)
        irecv = getattr(self.transport, "irecv", None)
        handle = PostedRecv(src, src_pp_rank, channel, what)
        predicted = self._received_layout.get(key) if self._predicting.get(key, False) else None
        if irecv is None:
            return handle  # a blocking transport: everything happens in recv
        with self._failures("receive", what, "from", src_pp_rank, src):
            if predicted is not None and self._fuses:
                handle.fused = torch.empty(predicted.fused_nbytes, dtype=torch.uint8, device=self.device)
                handle.header_work = irecv(handle.fused, src, self.group)
                return handle
            handle.header = torch.empty(1, dtype=torch.int64, device=self._meta_device)
            handle.header_work = irecv(handle.header, src, self.meta_group)
            if predicted is not None:
                flats = predicted.empty_flats(self.device)
                handle.data = [(flat, irecv(flat, src, self.group)) for flat in flats]
        return handle

    def _finish_recv(self, handle: "PostedRecv") -> Any:
        """One payload: header, then (layout and) data.

        After a repeated layout the next one is likely the same (a training step, a
        decode step), so the data buffers for it are posted together with the header:
        both messages are in flight at once, one round of latency instead of two. The
        sender knows the receiver does so (both ends track whether the last layout
        repeated) and, when its layout changed after all, first fills those buffers.
        """
        src, src_pp_rank, what, key = handle.src, handle.src_pp_rank, handle.what, (handle.src, handle.channel)
        irecv = getattr(self.transport, "irecv", None)
        posted = handle.data
        if handle.fused is not None:
            self._wait_host(handle.header_work)
            size = int(handle.fused[:8].view(torch.int64).item())
        else:
            header = handle.header
            if header is None:  # a blocking transport: nothing was posted
                header = torch.empty(1, dtype=torch.int64, device=self._meta_device)
                self.transport.recv(header, src, self.meta_group)
            else:
                self._wait_host(handle.header_work)
            size = int(header.item())
        self._predicting[key] = size == _SAME_LAYOUT
        if size == _SAME_LAYOUT:
            plan = self._received_layout.get(key)
            if plan is None:
                raise RuntimeError(
                    f"global rank {src} repeated a layout it never sent (sender and receiver out of step)."
                )
            if handle.fused is not None:
                return plan.unpack_fused(handle.fused, self.device)
        else:
            for _, work in posted:  # filled by the sender, unread: its layout changed
                self._wait_host(work)
            posted = []
            meta = torch.empty(size, dtype=torch.uint8, device=self._meta_device)
            self.transport.recv(meta, src, self.meta_group)
            plan = self._received_layout[key] = _Plan(*pickle.loads(meta.cpu().numpy().tobytes()))
        flats: list[torch.Tensor] = []
        if not posted:
            flats = plan.empty_flats(self.device)
            if irecv is None:
                for flat in flats:
                    self.transport.recv(flat, src, self.group)
            else:
                posted = [(flat, irecv(flat, src, self.group)) for flat in flats]
        for flat, work in posted:
            if self.stream_ordered:
                # The current stream waits for the data; the host goes on queueing work. The
                # watchdog holds the work (and so the buffer) until it is done, and its deadline.
                work.wait()
                self._watch(_InFlight(work, (flat,), "receive", what, src_pp_rank, src, time.monotonic()))
            else:
                self._wait_host(work)
        return plan.unpack([flat for flat, _ in posted] if posted else flats, self.device)

    def _wait_host(self, work: Any) -> None:
        """Blocks the host until ``work`` is done, within the transfer deadline."""
        if self.timeout is None:
            work.wait()
        else:
            work.wait(timeout=self.timeout)

    # -- transfers in flight -------------------------------------------------------------
    def _track(self, item: _InFlight) -> None:
        self._in_flight.append(item)
        if self.stream_ordered:
            self._watch(item)

    def _watch(self, item: _InFlight) -> None:
        if self.timeout is None:
            return  # the process group's own timeout ends a stalled transfer
        if self._watchdog is None:
            self._watchdog = Watchdog(self.timeout.total_seconds())
        self._watchdog.watch(item, item.work, item.posted_at)

    def _reap(self) -> None:
        """Drops completed sends from the front of the queue (their buffers can go)."""
        while self._in_flight and _is_completed(self._in_flight[0].work):
            item = self._in_flight.pop(0)
            if self._watchdog is not None:
                self._watchdog.forget(item)

    def _wait_in_flight(self, item: _InFlight) -> None:
        if self.stream_ordered or self.timeout is None:
            item.work.wait()  # stream-ordered: the stream waits; the watchdog keeps the deadline
            return
        left = self.timeout.total_seconds() - (time.monotonic() - item.posted_at)
        item.work.wait(timeout=timedelta(seconds=max(left, 0.001)))

    def _raise_if_expired(self) -> None:
        """Raises, on the caller's thread, the error of a transfer the watchdog found past its deadline."""
        if self._watchdog is None:
            return
        expired = self._watchdog.expired()
        if expired is None:
            return
        item, waited = expired
        me = dist.get_rank() if dist.is_initialized() else 0
        raise PipeCommError(
            f"Pipeline rank {self._my_pp_rank()} (global rank {me}) could not {item.verb} {item.what} "
            f"{'to' if item.verb == 'send' else 'from'} pipeline rank {item.peer_pp_rank} (global rank {item.peer}): "
            f"the transfer was still not complete after {waited:.0f} s, past its deadline of "
            f"{self.timeout} (PPStrategy(timeout=...)). The peer stalled or died; look at its log.",
            rank=me,
            peer=item.peer,
            operation=f"{item.verb} {item.what}",
        )

    def _my_pp_rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None and dist.is_initialized() else 0

    def close(self) -> None:
        """Stops the watchdog thread (if one was started)."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _failures(self, verb: str, what: str, preposition: str, peer_pp_rank: int, peer: int) -> "_Failures":
        """Turns a backend error of one transfer into a :class:`PipeCommError` that names both ends.

        The transfer is a :func:`~lightning_pp.distributed.interrupts.blocking_region`
        (Ctrl-C escalates while the main thread is stuck in it).
        """
        return _Failures(self, verb, what, preposition, peer_pp_rank, peer)

    def _error(
        self, error: BaseException, verb: str, what: str, preposition: str, peer_pp_rank: int, peer: int
    ) -> PipeCommError:
        me = dist.get_rank() if dist.is_initialized() else 0
        cause, _ = describe_failure(
            error,
            who=f"pipeline rank {peer_pp_rank} (global rank {peer})",
            waiting_for=f"the matching {'receive' if verb == 'send' else 'send'}",
            timeout=self.timeout,
        )
        operation = f"{verb} {what}"
        return PipeCommError(
            f"Pipeline rank {self._my_pp_rank()} (global rank {me}) could not {operation} {preposition} pipeline rank "
            f"{peer_pp_rank} (global rank {peer}): {cause}.",
            rank=me,
            peer=peer,
            operation=operation,
        )


class _Failures:
    """:meth:`PipeComm._failures`: a class, not a generator, as it wraps every transfer."""

    __slots__ = ("comm", "args")

    def __init__(self, comm: PipeComm, *args: Any) -> None:
        self.comm, self.args = comm, args

    def __enter__(self) -> None:
        blocking_region().__enter__()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        error: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        blocking_region().__exit__(exc_type, error, traceback)
        if isinstance(error, RuntimeError) and not isinstance(error, PipeCommError):
            raise self.comm._error(error, *self.args) from error


_SAME_LAYOUT = -1


def _same_layout_header(device: torch.device) -> torch.Tensor:
    # A fresh tensor per send: a posted send reads its buffer until it completes.
    return torch.full((1,), _SAME_LAYOUT, dtype=torch.int64, device=device)


def _header_bytes(value: int) -> torch.Tensor:
    """The 8 bytes of an int64 header, for the front of a fused buffer."""
    return torch.tensor([value], dtype=torch.int64).view(torch.uint8)


#: Copied into every fused buffer that repeats a layout (never sent itself).
_SAME_LAYOUT_BYTES = _header_bytes(_SAME_LAYOUT)


def _is_completed(work: Any) -> bool:
    is_completed = getattr(work, "is_completed", None)
    return bool(is_completed()) if is_completed is not None else False


def _dtype_buckets(leaves: list[Optional[_Leaf]]) -> list[list[int]]:
    """Indices of the non-empty tensors grouped by dtype, in order of first appearance.

    Sender and receiver compute it from the same layout, so they agree on the messages.
    """
    buckets: dict[torch.dtype, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if leaf is not None and math.prod(leaf.shape) > 0:
            buckets.setdefault(leaf.dtype, []).append(i)
    return list(buckets.values())


def _padded(nbytes: int) -> int:
    return -(-nbytes // 8) * 8  # each part starts 8-byte aligned, so its bytes view as any dtype


class _Plan:
    """How one layout travels, worked out once and reused for as long as the layout repeats.

    The layout's non-empty tensors go in dtype buckets (:func:`_dtype_buckets`), one
    flat buffer each. A fused buffer (the CPU's one message per payload) is the
    8-byte header, then each bucket's bytes, each part starting 8-byte aligned.
    """

    __slots__ = ("structure", "leaves", "buckets", "fused_nbytes", "_dtypes", "_numels", "_offsets", "_parts")

    def __init__(self, structure: Any, leaves: list[Optional[_Leaf]]) -> None:
        self.structure, self.leaves = structure, leaves
        self.buckets = _dtype_buckets(leaves)
        self._dtypes: list[torch.dtype] = []
        self._numels: list[int] = []
        self._offsets: list[int] = []  # byte offset of each bucket in a fused buffer
        # (leaf index, bucket, element offset in the bucket's flat buffer, element count)
        self._parts: list[tuple[int, int, int, int]] = []
        offset = 8
        for b, bucket in enumerate(self.buckets):
            start = 0
            for i in bucket:
                leaf = leaves[i]
                assert leaf is not None
                dtype, numel = leaf.dtype, math.prod(leaf.shape)
                self._parts.append((i, b, start, numel))
                start += numel
            self._dtypes.append(dtype)
            self._numels.append(start)
            self._offsets.append(offset)
            offset += _padded(start * dtype.itemsize)
        self.fused_nbytes = offset

    def flats(self, tensors: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
        """Each bucket's flat buffer to send (a lone tensor as it is)."""
        flats = []
        for bucket in self.buckets:
            if len(bucket) == 1:
                flats.append(_bucketed_tensor(tensors, bucket[0]).detach().contiguous())
            else:
                flats.append(torch.cat([_bucketed_tensor(tensors, i).detach().reshape(-1) for i in bucket]))
        return flats

    def empty_flats(self, device: torch.device) -> list[torch.Tensor]:
        """One receive buffer per bucket."""
        return [torch.empty(n, dtype=d, device=device) for d, n in zip(self._dtypes, self._numels)]

    def fuse(self, header: torch.Tensor, tensors: Optional[list[Optional[torch.Tensor]]]) -> torch.Tensor:
        """A fused buffer: ``header`` (8 bytes), then the tensors' bytes (``None``: left unset, never read)."""
        if tensors is None:
            buffer = torch.empty(self.fused_nbytes, dtype=torch.uint8)
            buffer[:8] = header
            return buffer
        parts = [header]
        for flat in self.flats(tensors):
            raw = flat.reshape(-1).view(torch.uint8)
            parts.append(raw)
            if _padded(raw.numel()) != raw.numel():
                parts.append(torch.zeros(_padded(raw.numel()) - raw.numel(), dtype=torch.uint8))
        return torch.cat(parts)

    def unpack_fused(self, buffer: torch.Tensor, device: torch.device) -> Any:
        """The payload from a received fused buffer (its tensors view the buffer)."""
        tensors: list[Optional[torch.Tensor]] = [None] * len(self.leaves)
        for i, b, start, numel in self._parts:
            dtype = self._dtypes[b]
            first = self._offsets[b] + start * dtype.itemsize
            tensors[i] = buffer[first : first + numel * dtype.itemsize].view(dtype)
        return self._rebuild(tensors, device)

    def unpack(self, flats: list[torch.Tensor], device: torch.device) -> Any:
        """The payload from received per-bucket buffers (its tensors view them)."""
        tensors: list[Optional[torch.Tensor]] = [None] * len(self.leaves)
        for i, b, start, numel in self._parts:
            flat = flats[b]
            tensors[i] = flat if numel == flat.numel() else flat[start : start + numel]
        return self._rebuild(tensors, device)

    def _rebuild(self, flat_tensors: list[Optional[torch.Tensor]], device: torch.device) -> Any:
        tensors: list[Optional[torch.Tensor]] = [None] * len(self.leaves)
        for i, leaf in enumerate(self.leaves):
            if leaf is None:
                continue
            flat = flat_tensors[i]
            # An empty tensor: nothing was sent for it.
            tensor = torch.empty(leaf.shape, dtype=leaf.dtype, device=device) if flat is None else flat.view(leaf.shape)
            if leaf.requires_grad and (tensor.is_floating_point() or tensor.is_complex()):
                # A leaf of its own, even when it views a shared buffer.
                tensor = tensor.detach().requires_grad_(True)
            tensors[i] = tensor
        return unflatten_payload(self.structure, tensors)


def _bucketed_tensor(tensors: list[Optional[torch.Tensor]], i: int) -> torch.Tensor:
    """``tensors[i]``, an index from :func:`_dtype_buckets`, which lists only present tensors."""
    tensor = tensors[i]
    if tensor is None:
        raise RuntimeError(f"payload leaf {i} is None but was bucketed as a tensor to send.")
    return tensor

