"""Ctrl-C that works even while a rank is stuck inside a communication call.

Python turns SIGINT into ``KeyboardInterrupt`` only when the main thread next runs
Python code. A rank blocked in a C++ receive or collective waiting for a stalled
peer never does (until the process-group timeout), and neither do the ranks
waiting for *it*, so Ctrl-C on the launching process would do nothing. The
escalation here notices the signal anyway (the interpreter's C handler writes it
to a wakeup pipe, from whatever thread it lands on) and, if the main thread cannot
hear it, ends the process and the ranks it launched itself.

"Cannot hear it" is decided narrowly, because a program may catch the
``KeyboardInterrupt`` and carry on (a notebook, ``OnExceptionCheckpoint``, a
user's clean-up), and nothing here may end a process that did. Every place where
the main thread waits on a peer (the point-to-point transfers of
:mod:`~lightning_pp.distributed.p2p`, and every collective wrapped in
:func:`~lightning_pp.distributed.errors.named_failures`, which the object
broadcast and barrier of :mod:`~lightning_pp.distributed.objects` use) runs inside
:func:`blocking_region`. The escalation ends the process only when the main thread
was inside a blocking region when SIGINT arrived and is *still inside that same
region* ``grace_s`` seconds later::

    SIGINT   main thread                               escalation
    ------   ---------------------------------------   ---------------------------------
      |      in a receive (a blocking region) ......   still in it after grace_s: exit
      |      in a receive, which then completes:       left the region: the interrupt
      |        KeyboardInterrupt raised in Python      was delivered; never escalates
      |      running Python (no region):               nothing to do: Python raises
      |        KeyboardInterrupt raised at once        KeyboardInterrupt itself

Leaving the region means running Python code, which is where the interpreter
raises the pending ``KeyboardInterrupt``: from then on the program is in charge,
whatever it does with the interrupt (even if it later blocks again). A later
Ctrl-C is judged afresh.

No torch, no Lightning: it is handed a callback that stops the child ranks.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from types import TracebackType
from typing import Callable, Optional

__all__ = ["blocking_region", "install_interrupt_escalation"]

_installed: Optional["_Escalation"] = None
_MAIN_THREAD_ID = threading.main_thread().ident

#: ``(entries + exits so far, regions open)`` of the main thread's blocking regions.
#: Written only by the main thread, as one tuple, so a reader never sees half an update.
_main_regions: tuple[int, int] = (0, 0)


class _BlockingRegion:
    """Marks the main thread as waiting on a peer (see :func:`blocking_region`)."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _main_regions
        if threading.get_ident() == _MAIN_THREAD_ID:
            seen, depth = _main_regions
            _main_regions = (seen + 1, depth + 1)

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        global _main_regions
        if threading.get_ident() == _MAIN_THREAD_ID:
            seen, depth = _main_regions
            _main_regions = (seen + 1, depth - 1)


_REGION = _BlockingRegion()


def blocking_region() -> _BlockingRegion:
    """A context manager around a call that blocks until a peer takes part: a transfer or a collective.

    Ctrl-C escalates (see :func:`install_interrupt_escalation`) only while the main
    thread sits in one. Regions nest; on other threads (the streaming pipeline's
    communication thread) they mark nothing, since only the main thread receives
    ``KeyboardInterrupt``. Cheap enough for every transfer: one tuple store in and out.
    """
    return _REGION


class _Escalation(threading.Thread):
    def __init__(self, read_fd: int, forward_fd: int, grace_s: float) -> None:
        super().__init__(daemon=True, name="lightning_pp-interrupt-escalation")
        self.read_fd, self.forward_fd, self.grace_s = read_fd, forward_fd, grace_s
        self.stop_children: Callable[[], None] = lambda: None
        self.exit_code = 128 + signal.SIGINT

    def run(self) -> None:
        # The main thread's region count at the pending SIGINT, and when its grace ends.
        pending: Optional[tuple[int, float]] = None
        while True:
            wait = None if pending is None else max(0.0, pending[1] - time.monotonic())
            try:
                readable, _, _ = select.select([self.read_fd], [], [], wait)
            except (OSError, ValueError):
                return
            if readable:
                try:
                    data = os.read(self.read_fd, 64)
                except OSError:
                    return
                if not data:
                    return
                if self.forward_fd >= 0:
                    # Whoever owned the wakeup fd before us (an asyncio loop) still hears it.
                    try:
                        os.write(self.forward_fd, data)
                    except OSError:
                        pass
                if pending is None and signal.SIGINT in data:
                    seen, depth = _main_regions
                    if depth > 0:  # blocked on a peer: Python cannot raise KeyboardInterrupt yet
                        pending = (seen, time.monotonic() + self.grace_s)
            if pending is None:
                continue
            seen, _ = _main_regions
            if seen != pending[0]:
                pending = None  # the main thread ran Python code: the interrupt reached it
            elif time.monotonic() >= pending[1]:
                break
        # Still in the very region it was in at the signal: stuck on a peer.
        try:
            self.stop_children()
        finally:
            os._exit(self.exit_code)


def install_interrupt_escalation(stop_children: Callable[[], None], grace_s: float = 5.0) -> bool:
    """Makes Ctrl-C end this process within ``grace_s`` seconds while it is blocked on a peer.

    Only a main thread stuck in a :func:`blocking_region` is ended; a process that
    received the ``KeyboardInterrupt`` (and perhaps caught it) is left alone.
    Call from the main thread; later calls only replace ``stop_children``.

    Args:
        stop_children: called just before the forced exit, to stop processes this one
            launched (the other ranks under Lightning's own launcher).
        grace_s: how long the blocking call may still return (and the ordinary
            ``KeyboardInterrupt`` handling take over) first.

    Returns:
        Whether the escalation is active (it cannot be installed off the main thread,
        or when SIGINT is ignored or handled by C code).
    """
    global _installed
    if _installed is not None:
        _installed.stop_children = stop_children
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    if not callable(signal.getsignal(signal.SIGINT)):
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:
        os.close(read_fd)
        os.close(write_fd)
        return False
    thread = _Escalation(read_fd, previous, grace_s)
    thread.stop_children = stop_children
    thread.start()
    _installed = thread
    return True
