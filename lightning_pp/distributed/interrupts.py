"""Ctrl-C that works even while a rank is stuck inside a communication call.

Python turns SIGINT into ``KeyboardInterrupt`` only when the main thread next runs
Python code. A rank blocked in a C++ receive or collective waiting for a stalled
peer never does (until the process-group timeout, 30 minutes by default), and
neither do the ranks waiting for *it*, so Ctrl-C on the launching process would
do nothing. The escalation here notices the signal anyway (the interpreter's C
handler writes it to a wakeup pipe, from whatever thread it lands on), gives the
normal ``KeyboardInterrupt`` path a few seconds, and then ends the process and
the ranks it launched itself.

No torch, no Lightning: it is handed a callback that stops the child ranks.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

__all__ = ["install_interrupt_escalation"]

_installed: Optional["_Escalation"] = None


class _Escalation(threading.Thread):
    def __init__(self, read_fd: int, forward_fd: int, grace_s: float) -> None:
        super().__init__(daemon=True, name="lightning_pp-interrupt-escalation")
        self.read_fd, self.forward_fd, self.grace_s = read_fd, forward_fd, grace_s
        self.stop_children: Callable[[], None] = lambda: None
        self.exit_code = 128 + signal.SIGINT

    def run(self) -> None:
        while True:
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
            if signal.SIGINT in data:
                break
        # The main thread gets the first chance: Lightning's KeyboardInterrupt path
        # stops the launched ranks and exits. A daemon thread dies with the process,
        # so reaching the line below means the main thread is stuck.
        time.sleep(self.grace_s)
        try:
            self.stop_children()
        finally:
            os._exit(self.exit_code)


def install_interrupt_escalation(stop_children: Callable[[], None], grace_s: float = 5.0) -> bool:
    """Makes Ctrl-C end this process within ``grace_s`` seconds, even if it is blocked in C++.

    Call from the main thread; later calls only replace ``stop_children``.

    Args:
        stop_children: called just before the forced exit, to stop processes this one
            launched (the other ranks under Lightning's own launcher).
        grace_s: how long the ordinary ``KeyboardInterrupt`` handling may take first.

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
