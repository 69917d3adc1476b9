"""Posted sends, stream-ordered receives and their deadlines, without processes.

Two ``PipeComm`` ends share an in-process loopback transport whose work handles
record how they were waited for. A device backend (faked: the platform says its
transfers wait on the stream) must wait for received data without a host timeout
and leave the deadline to the watchdog; the CPU must keep waiting on the host with
the deadline; a send that never completes must surface as a ``PipeCommError``
naming the peer, on the caller's thread.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from datetime import timedelta

import pytest
import torch

from lightning_pp.distributed.deadlines import Watchdog
from lightning_pp.distributed.p2p import PipeComm, PipeCommError
from lightning_pp.platform import make_platform

from fakes import FakeDeviceModule


class _Work:
    def __init__(self, done: bool = True) -> None:
        self.done = done
        self.waits: list = []

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout=None) -> bool:
        self.waits.append(timeout)
        return True


class _Loopback:
    """Messages between two ends in one process; a send completes when it is received."""

    def __init__(self) -> None:
        self.queues: dict = defaultdict(deque)
        self.works: list = []  # (kind, work)
        self.me = 0

    def end(self, rank: int) -> "_End":
        return _End(self, rank)


class _End:
    def __init__(self, loop: _Loopback, rank: int) -> None:
        self.loop, self.rank = loop, rank

    def send(self, tensor, dst, group):
        self.isend(tensor, dst, group).done = True

    def recv(self, tensor, src, group):
        self.irecv(tensor, src, group)

    def isend(self, tensor, dst, group):
        work = _Work(done=False)
        self.loop.queues[(self.rank, dst)].append((tensor, work))
        self.loop.works.append(("send", work))
        return work

    def irecv(self, tensor, src, group):
        sent, send_work = self.loop.queues[(src, self.rank)].popleft()  # the test sends before it receives
        assert sent.numel() == tensor.numel() and sent.dtype == tensor.dtype, "sender and receiver out of step"
        tensor.copy_(sent.view_as(tensor))
        send_work.done = True
        work = _Work()
        self.loop.works.append(("recv", work))
        return work


def _pair(stream_ordered: bool, timeout=timedelta(seconds=30)):
    loop = _Loopback()
    platform = make_platform("cuda", device_module=FakeDeviceModule("cuda"))
    ends = [
        PipeComm(None, torch.device("cpu"), transport=loop.end(r), platform=platform, timeout=timeout,
                 stream_ordered=stream_ordered)
        for r in range(2)
    ]
    return loop, ends


@pytest.mark.parametrize("stream_ordered", [True, False], ids=["device-stream", "host"])
def test_posted_sends_arrive_and_receives_wait_where_the_backend_wants(stream_ordered):
    loop, (a, b) = _pair(stream_ordered)
    payloads = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 3), torch.randn(4), (torch.ones(1), None)]
    for x in payloads:
        a.send(x, 1, wait=False)
        assert a.num_in_flight > 0  # posted, not received: its buffers are held
        got = b.recv(0)
        flat_sent = [x] if isinstance(x, torch.Tensor) else [t for t in x if t is not None]
        flat_got = [got] if isinstance(got, torch.Tensor) else [t for t in got if t is not None]
        for s, g in zip(flat_sent, flat_got, strict=True):
            torch.testing.assert_close(g, s.detach())
        assert a.num_in_flight == 0  # received: the sender dropped it without waiting
    a.wait_sends()
    data_waits = [w.waits for kind, w in loop.works if kind == "recv" and w.waits]
    if stream_ordered:
        # Data: the stream waits (no host timeout); headers still wait on the host, with the deadline.
        assert [None] in data_waits
        assert all(waits == [None] or waits == [timedelta(seconds=30)] for waits in data_waits)
        assert b._watchdog is not None
    else:
        assert data_waits and all(waits == [timedelta(seconds=30)] for waits in data_waits)
        assert b._watchdog is None  # gloo: the host wait keeps the deadline
    for comm in (a, b):
        comm.close()


def test_changed_layout_after_a_repeat_fills_the_predicted_buffers_first():
    loop, (a, b) = _pair(False)
    shapes = [(2, 3), (2, 3), (5,), (5,), (5,), (2, 3)]  # repeat -> the receiver predicts; then a change
    for shape in shapes:
        x = torch.randn(*shape)
        a.send(x, 1, wait=False)
        torch.testing.assert_close(b.recv(0), x)
    a.wait_sends()
    assert not any(loop.queues.values()), "every message was received"


def test_channels_keep_their_own_layouts():
    loop, (a, b) = _pair(False)
    for _ in range(3):
        a.send(torch.randn(2, 3, requires_grad=True), 1, channel="act", wait=False)
        a.send([torch.randn(2, 3)], 1, channel="grad", wait=False)
        b.recv(0, channel="act")
        b.recv(0, channel="grad")
    sends = sum(kind == "send" for kind, _ in loop.works)
    # First of each channel: header, layout, data (3 + 3); the second: header and data (2 + 2);
    # the third, now predicted by the receiver: header and data in one message (1 + 1).
    assert sends == 6 + 4 + 2


def test_a_send_past_its_deadline_is_raised_naming_the_peer():
    loop, (a, _) = _pair(True, timeout=timedelta(seconds=0.2))
    a.send(torch.ones(3), 1, wait=False, where="the output of pipeline stage 0")  # never received
    assert a._watchdog is not None
    a._watchdog.poll_s = 0.02
    deadline = time.monotonic() + 10
    while a._watchdog.expired() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(PipeCommError, match=r"pipeline rank 1 \(global rank 1\).*deadline"):
        a.send(torch.ones(3), 1, wait=False)
    a.close()


def test_watchdog_drops_completed_work_and_calls_back_once():
    expired = []
    dog = Watchdog(1.0, on_expired=expired.append, poll_s=3600)
    done, stuck, late = _Work(done=True), _Work(done=False), _Work(done=False)
    dog.watch("done", done, posted_at=0.0)
    dog.watch("stuck", stuck, posted_at=0.0)
    dog.watch("late", late, posted_at=100.0)
    dog.check(now=0.5)
    assert dog.num_watched == 3 - 1 and dog.expired() is None
    dog.check(now=2.0)
    assert dog.expired() == ("stuck", 2.0) and expired == ["stuck"]
    dog.check(now=200.0)  # only the first expiry is kept and reported
    assert expired == ["stuck"]
    dog.stop()


def test_one_message_per_repeated_transfer_keeps_every_dtype_aligned():
    loop, (a, b) = _pair(False)
    for i in range(4):
        payload = {"mask": torch.rand(3) > 0.5, "ids": torch.arange(5, dtype=torch.int8) + i,
                   "x": torch.randn(2, 3, dtype=torch.float64), "h": torch.randn(7, dtype=torch.float16)}
        before = len(loop.works)
        a.send(payload, 1, wait=False)
        sent = sum(kind == "send" for kind, _ in loop.works[before:])
        got = b.recv(0)
        for k, v in payload.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        if i >= 2:  # the receiver predicts the layout: header and all four dtypes in one message
            assert sent == 1
    a.wait_sends()


def test_the_watchdog_thread_ends_when_nothing_is_watched():
    dog = Watchdog(10.0, poll_s=0.01)
    work = _Work(done=False)
    dog.watch("x", work)
    assert dog._thread is not None
    work.done = True
    deadline = time.monotonic() + 10
    while dog._thread is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dog._thread is None and dog.num_watched == 0
    dog.watch("y", _Work(done=False))  # a new transfer starts a new thread
    assert dog._thread is not None
    dog.stop()
