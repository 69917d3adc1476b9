"""Streaming forward-only pipeline: microbatches flow through the stages without a per-batch drain.

Training runs one schedule per batch and pays the fill/drain bubble every step;
inference has no backward to wait for, so it can treat a whole prediction run as
one endless stream of microbatches (numbered ``g = 0, 1, 2, ...`` across batch
boundaries). At tick ``t`` pipeline rank ``s`` forwards microbatch ``t - s``; the
last stage's result goes back to the first stage, which is where the caller wants
it. Four stages, batches of two microbatches (``a0 a1 | b0 b1 | c0 c1``)::

    tick     0   1   2   3   4   5   6   7   8
    rank 0  a0  a1  b0  b1  c0  c1   .   .   .     launches b0 while a drains
    rank 1   .  a0  a1  b0  b1  c0  c1   .   .
    rank 2   .   .  a0  a1  b0  b1  c0  c1   .
    rank 3   .   .   .  a0  a1  b0  b1  c0  c1  -> result of g goes to rank 0
                          ^ a complete on rank 0 after tick 4

Only the start and the end of the run pay the ``p - 1`` tick bubble; a per-batch
schedule would pay it for every batch (efficiency ``m / (m + p - 1)``).

After each tick every rank takes part in one *ring exchange*: it sends its output
to the next rank (the last rank sends the result to rank 0) and receives the
next input from the previous rank (rank 0 receives a result from the last rank).
That ring is where a backend whose send waits for its receiver livelocks if every
rank sends first (SGLang's XPU pipeline, PR 23645). Here even ranks send first and
odd ranks receive first, so every edge of the ring has a waiting receiver or a
sender that is not itself waiting: with an odd ``pp_size`` the wrap-around edge
joins two even ranks, and rank 0 still completes because rank ``p - 1``'s send is
the second thing rank 0 does, after its own send to odd rank 1 went through.
:func:`replay_ring` checks this for any size without processes.

Communication overlaps compute. With ``lag=2`` (the default over several ranks)
rank ``s`` forwards microbatch ``g`` at tick ``g + 2 s``: an activation made at
tick ``t`` is needed only at tick ``t + 2``, so a communication thread runs the
exchange of tick ``t`` while the compute thread runs tick ``t + 1``. The period
of a tick is then the larger of compute and communication, not their sum; the
price is ``p - 1`` more ticks of fill, once per run. The exchange order is the
same parity order, walked by one thread per rank, so the deadlock argument holds.
Where posting a send cannot block (``PipeComm.sends_never_block``: gloo), every rank
sends first instead: no send waits for anything, so no cycle can form, and an odd
rank's output does not wait a tick for its next input before it goes.

Every wait has a deadline, the caller's: each transfer waits at most the
``PipeComm``'s ``timeout`` (the one given to ``PPStrategy``), and a failed transfer
on the communication thread is re-raised, as it is, on the compute thread, naming
the peer. The compute thread's own waits give up only once the communication thread
has made no progress for longer than a transfer may take.

This module knows nothing of Lightning: :class:`StreamingPipeline` takes the
rank's stage, a :class:`~lightning_pp.distributed.p2p.PipeComm` and three callbacks.
"""

from __future__ import annotations

import dataclasses
import pickle
import queue
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_pp.distributed.errors import PayloadError
from lightning_pp.distributed.p2p import PipeComm, flatten_payload
from lightning_pp.tree import map_tensors

__all__ = ["RingDeadlock", "StreamingPipeline", "Transfer", "replay_ring", "ring_exchange"]

Exists = Callable[[int], bool]


class RingDeadlock(RuntimeError):
    """A ring exchange order that cannot complete when every send waits for its receiver."""


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One send or receive of a ring exchange.

    Args:
        op: ``"send"`` or ``"recv"``.
        what: ``"activation"`` (stage ``s`` to ``s + 1``) or ``"result"`` (last stage to rank 0).
        peer: pipeline rank on the other side.
        microbatch: stream-wide microbatch index ``g``.
    """

    op: str
    what: str
    peer: int
    microbatch: int


def ring_exchange(
    pp_rank: int, pp_size: int, tick: int, exists: Exists, *, parity: bool = True, lag: int = 1
) -> tuple[Transfer, ...]:
    """The transfers rank ``pp_rank`` makes right after tick ``tick``, in the order it makes them.

    Args:
        pp_rank: this rank's position in the pipeline.
        pp_size: number of pipeline ranks.
        tick: the tick just computed.
        exists: whether stream microbatch ``g`` exists (the stream may end).
        parity: even ranks send first and odd ranks receive first (the default).
            ``False`` sends first everywhere: right where a posted send cannot block
            (:class:`StreamingPipeline` chooses it there), a deadlock under blocking
            sends (:func:`replay_ring` catches it).
        lag: ticks between a microbatch's forwards on neighbouring ranks: rank ``s``
            forwards microbatch ``g`` at tick ``g + lag * s``. With ``lag=2`` the
            activation received after tick ``t`` is used at tick ``t + 2``.
    """
    if pp_size == 1:
        return ()
    s, last = pp_rank, pp_size - 1

    def live(g: int) -> bool:
        return g >= 0 and exists(g)

    sends, recvs = [], []
    mine, previous = tick - lag * s, tick - lag * (s - 1)
    if live(mine):  # what this rank computed at this tick
        sends.append(Transfer("send", "activation", s + 1, mine) if s < last else Transfer("send", "result", 0, mine))
    if s > 0 and live(previous):  # what the previous rank computed at this tick
        recvs.append(Transfer("recv", "activation", s - 1, previous))
    if s == 0 and live(tick - lag * last):  # the result the last rank just produced
        recvs.append(Transfer("recv", "result", last, tick - lag * last))
    ordered = sends + recvs if (s % 2 == 0 or not parity) else recvs + sends
    return tuple(ordered)


def replay_ring(pp_size: int, num_microbatches: int, *, parity: bool = True, lag: int = 1) -> int:
    """Replays a whole stream of ``num_microbatches`` with blocking sends; returns the transfers made.

    Each rank walks its transfers in order; a send completes only together with
    the peer's matching receive (a rendezvous), as on XCCL.

    Raises:
        RingDeadlock: some ranks wait on each other forever, or a send meets a
            receive of a different message.
    """
    exists = lambda g: g < num_microbatches  # noqa: E731
    num_ticks = num_microbatches + lag * (pp_size - 1)
    queues = [
        [tr for t in range(num_ticks) for tr in ring_exchange(r, pp_size, t, exists, parity=parity, lag=lag)]
        for r in range(pp_size)
    ]
    heads = [0] * pp_size
    done = 0
    while any(heads[r] < len(queues[r]) for r in range(pp_size)):
        moved = False
        for r in range(pp_size):
            if heads[r] >= len(queues[r]):
                continue
            mine = queues[r][heads[r]]
            if mine.op != "send":
                continue
            peer = mine.peer
            if heads[peer] >= len(queues[peer]):
                continue
            theirs = queues[peer][heads[peer]]
            if theirs.op == "recv" and theirs.peer == r:
                if (theirs.what, theirs.microbatch) != (mine.what, mine.microbatch):
                    raise RingDeadlock(f"rank {r} sends {mine} but rank {peer} receives {theirs}")
                heads[r] += 1
                heads[peer] += 1
                done += 1
                moved = True
        if not moved:
            waiting = {r: str(queues[r][heads[r]]) for r in range(pp_size) if heads[r] < len(queues[r])}
            raise RingDeadlock(
                f"pp_size={pp_size}, m={num_microbatches}: no transfer can complete; ranks wait on {waiting}"
            )
    return done


def _encode_result(result: Any) -> Any:
    """Results are usually tensors; anything else travels pickled in a byte tensor."""
    try:
        flatten_payload(result)
        return (torch.tensor(0), result)
    except PayloadError:
        data = pickle.dumps(map_tensors(torch.Tensor.cpu, result))
        return (torch.tensor(1), torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _decode_result(payload: Any) -> Any:
    flag, body = payload
    if int(flag.item()) == 0:
        return body
    return pickle.loads(body.cpu().numpy().tobytes())


class StreamingPipeline:
    """One rank's part of a streaming forward-only pipeline.

    Args:
        stage: this rank's layers (``pp_size`` stages, one per rank).
        pp_rank: this rank's position in the pipeline.
        pp_size: number of pipeline ranks.
        comm: the point-to-point channel (``None`` only when ``pp_size == 1``).
        exists: whether stream microbatch ``g`` exists; asked on every rank in the
            same order (from the calling thread only), so all ranks must answer
            alike (they read the same data).
        launch: first rank only: runs microbatch ``g``'s step up to the pipelined
            call and returns the first stage's output (with ``pp_size == 1``:
            returns the step's result).
        finish: last rank only: ``finish(g, activation)`` runs microbatch ``g``'s
            whole step with the pipelined call answered by the last stage applied
            to ``activation``; returns the step's result.
        on_result: first rank only: receives ``(g, result)`` for every microbatch, in order.
        middle: middle ranks: ``middle(g, activation)`` returns the rank's output for
            microbatch ``g`` (default: ``stage(activation)``; a model pipelined by its
            block list reruns microbatch ``g``'s step as this stage instead).
        overlap: run the ring exchanges on a communication thread, one tick behind
            compute (``lag=2``); ``False`` runs them inline (``lag=1``).
        platform: records an event after each compute that the communication thread
            waits on before sending (device work is asynchronous).
        timeout: the caller's deadline for one transfer; ``None`` takes ``comm.timeout``
            (``PPStrategy`` builds its ``PipeComm`` with ``PPStrategy(timeout=...)``, so
            the streaming predict and generation use the strategy's deadline). The
            compute thread gives up waiting for the communication thread after this
            long without progress, plus a margin so that the transfer's own, named
            error arrives first. ``None`` everywhere: the transfers end at the process
            group's timeout, and that failure ends the wait.
    """

    def __init__(
        self,
        stage: nn.Module,
        pp_rank: int,
        pp_size: int,
        comm: Optional[PipeComm],
        *,
        exists: Exists,
        launch: Callable[[int], Any],
        finish: Callable[[int, Any], Any],
        on_result: Callable[[int, Any], None],
        middle: Optional[Callable[[int, Any], Any]] = None,
        overlap: bool = True,
        platform: Optional[Any] = None,
        timeout: Optional[timedelta] = None,
    ) -> None:
        if pp_size > 1 and comm is None:
            raise ValueError("A streaming pipeline over several ranks needs a PipeComm.")
        self.stage = stage
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.comm = comm
        self.exists = exists
        self.launch, self.finish, self.on_result = launch, finish, on_result
        self.middle = middle if middle is not None else lambda g, activation: self.stage(activation)
        self.overlap = overlap and pp_size > 1
        self.lag = 2 if self.overlap else 1
        # Where a posted send cannot block (gloo), every rank posts its send first: an odd
        # rank that received first would hold its output back until the previous rank's
        # next output arrived, a tick of latency per odd rank that the fill never gives back.
        self._parity = comm is None or not comm.sends_never_block
        self.platform = platform
        if timeout is None and comm is not None:
            timeout = comm.timeout
        self.timeout: Optional[timedelta] = timeout
        #: The next tick to run.
        self.tick = 0
        self._inputs: dict[int, Any] = {}
        #: Most activations (received inputs plus outputs waiting to go) held at once.
        self.peak_live_activations = 0
        self._cond = threading.Condition()
        self._exchanged = -1  # last tick whose exchange completed
        self._error: Optional[BaseException] = None
        self._error_raised = False  # the compute thread already re-raised `_error`
        self._progress_at = time.monotonic()  # the communication thread's last sign of life
        self._comm_done = False  # the communication thread has returned
        self._queue: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._in_flight = 0  # outputs handed to the communication thread, not yet sent

    def completion_tick(self, microbatch: int) -> int:
        """The last tick to run before rank 0 holds the result of ``microbatch``."""
        return microbatch + self.lag * (self.pp_size - 1)

    def run_until(self, last_tick: int, *, wait: bool = True) -> None:
        """Runs ticks ``self.tick .. last_tick``.

        Args:
            last_tick: the last tick to compute.
            wait: return only once the exchanges up to ``last_tick`` completed (rank 0
                needs that for its results); ``False`` leaves them to the
                communication thread, so the caller can go on computing.
        """
        s, last = self.pp_rank, self.pp_size - 1
        while self.tick <= last_tick:
            t, g = self.tick, self.tick - self.lag * self.pp_rank
            output = None
            if g >= 0 and self.exists(g):
                if s == 0 and s == last:
                    self.on_result(g, self.launch(g))
                elif s == 0:
                    output = self.launch(g)
                elif s == last:
                    output = self.finish(g, self._take_input(g))
                else:
                    output = self.middle(g, self._take_input(g))
            transfers = ring_exchange(s, self.pp_size, t, self.exists, parity=self._parity, lag=self.lag)
            if self.overlap:
                self._hand_over(t, transfers, output)
            else:
                self._note_peak(1 if output is not None else 0)
                self._exchange(t, transfers, output)
            self.tick += 1
        if wait:
            self.wait_for_exchange(last_tick)

    def wait_for_exchange(self, tick: int) -> None:
        """Returns once the exchanges up to ``tick`` completed (its results are then on rank 0)."""
        self._wait(lambda: self._exchanged >= tick or self.pp_size == 1, f"the exchange of tick {tick}")

    def close(self) -> None:
        """Stops the communication thread (after the exchanges handed to it).

        Raises the communication thread's failure, unless a wait already raised it.
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            if self._error is None:
                self._wait(lambda: self._comm_done, "the last exchanges to finish")
            thread.join()  # it has returned, or is returning after a failure
        if self._error is not None and not self._error_raised:
            self._raise_error()

    # -- inside ------------------------------------------------------------------------------
    def _note_peak(self, outputs: int) -> None:
        with self._cond:
            live = len(self._inputs) + outputs
        self.peak_live_activations = max(self.peak_live_activations, live)

    def _take_input(self, g: int) -> Any:
        self._wait(lambda: g in self._inputs, f"the input of microbatch {g}")
        with self._cond:
            return self._inputs.pop(g)

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Waits for the communication thread until ``ready()``; re-raises its failure.

        Every transfer is bounded by :attr:`timeout`, and a failed one wakes this wait
        with its own error. The deadline here is a backstop for a communication thread
        that stops making progress without failing: it counts from the thread's last
        sign of life (taking an item, starting a transfer), not from the start of
        the wait, since one wait may legitimately span several transfers.
        """
        transfer_s = None if self.timeout is None else self.timeout.total_seconds()
        # A margin, so that a stalled transfer's own (named) error arrives first.
        limit = None if transfer_s is None else transfer_s + max(1.0, 0.1 * transfer_s)
        with self._cond:
            start = time.monotonic()
            while self._error is None and not ready():
                if limit is None:
                    self._cond.wait()
                    continue
                idle = time.monotonic() - max(start, self._progress_at)
                if idle >= limit:
                    raise TimeoutError(
                        f"pipeline rank {self.pp_rank} waited {idle:.0f} s for {what}, and its communication thread "
                        f"made no progress in that time although each transfer may take at most "
                        f"{transfer_s:g} s (PPStrategy(timeout=...)). Find what the communication "
                        "thread 'lightning_pp-ring' is doing (py-spy dump --pid <pid>)."
                    )
                self._cond.wait(limit - idle)
            if self._error is not None:
                self._raise_error()

    def _raise_error(self) -> None:
        """Re-raises the communication thread's failure, unchanged, on the calling thread.

        A :class:`~lightning_pp.distributed.errors.PipeCommError` already names this
        rank, the peer and the deadline: wrapping it would bury that under a generic line.
        """
        error = self._error
        assert error is not None
        if not self._error_raised:
            self._error_raised = True
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"raised on pipeline rank {self.pp_rank}'s communication thread (lightning_pp-ring)")
        raise error

    def _hand_over(self, tick: int, transfers: tuple[Transfer, ...], output: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._communicate,
                args=(torch.is_inference_mode_enabled(),),
                name="lightning_pp-ring",
                daemon=True,
            )
            self._thread.start()
        event = None
        if output is not None and self.platform is not None:
            event = self.platform.event()
            self.platform.record(event)
        self._note_peak(self._queue.qsize() + (1 if output is not None else 0))
        self._queue.put((tick, transfers, output, event))

    def _communicate(self, inference: bool) -> None:
        try:
            with torch.inference_mode(inference):
                while True:
                    item = self._queue.get()
                    self._note_progress()
                    if item is None:
                        return
                    tick, transfers, output, event = item
                    try:
                        if event is not None:
                            event.synchronize()  # the compute that made `output` has finished
                        self._exchange(tick, transfers, output)
                    except BaseException as error:  # noqa: BLE001 - handed to the compute thread
                        with self._cond:
                            self._error = error
                            self._cond.notify_all()
                        return
        finally:
            with self._cond:
                self._comm_done = True
                self._cond.notify_all()

    def _note_progress(self) -> None:
        # A plain store: the waiting thread reads it under the condition's lock and
        # re-checks its deadline at least once per transfer timeout.
        self._progress_at = time.monotonic()

    def _exchange(self, tick: int, transfers: tuple[Transfer, ...], output: Any) -> None:
        comm = self.comm
        for transfer in transfers:
            self._note_progress()
            if comm is None:
                raise RuntimeError(
                    f"pipeline rank {self.pp_rank} has a ring transfer to run but no PipeComm "
                    "(comm may be None only when pp_size == 1)."
                )
            g = transfer.microbatch
            # Sends are posted, and waited for once the tick's receives are done: a send and
            # a receive of one exchange are in flight together (the order is the proven one).
            if transfer.op == "send" and transfer.what == "activation":
                comm.send(output, transfer.peer, where=f"the output of pipeline stage {self.pp_rank}", wait=False)
            elif transfer.op == "send":
                comm.send(_encode_result(output), transfer.peer, where="a prediction", wait=False)
            elif transfer.what == "activation":
                received = comm.recv(transfer.peer)
                with self._cond:
                    self._inputs[g] = received
                    self._cond.notify_all()
            else:
                self.on_result(g, _decode_result(comm.recv(transfer.peer)))
        if comm is not None and transfers:
            comm.wait_sends()
        with self._cond:
            self._exchanged = tick
            self._cond.notify_all()
