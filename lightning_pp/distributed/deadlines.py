"""Deadlines for transfers the host does not wait for.

On NCCL, ``work.wait()`` makes the current stream wait for a transfer and returns
at once; ``work.wait(timeout=...)`` instead blocks the host until the transfer is
done, so the host cannot queue the next kernels meanwhile. A pipeline that wants
both -- the host running ahead and every transfer bounded -- waits on the stream
and leaves the deadline to a :class:`Watchdog`: a daemon thread that polls the
transfers in flight and notes the first one past its deadline. The caller asks
:meth:`Watchdog.expired` before each new transfer and raises a named error on its
own thread; ``on_expired`` may also abort the communicator, so that a stream (and
a host synchronising with it) stuck on the dead transfer is released.

Nothing here names a device or a backend: a watched item is anything with
``is_completed()``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

__all__ = ["Watchdog"]


class Watchdog:
    """Notes the first watched transfer still incomplete ``timeout_s`` after it was posted.

    Args:
        timeout_s: the deadline of each transfer, in seconds.
        on_expired: called once, on the watchdog thread, with the expired item.
        poll_s: how often to look; by default a tenth of the deadline, at most 1 s.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        on_expired: Optional[Callable[[Any], None]] = None,
        poll_s: Optional[float] = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.poll_s = poll_s if poll_s is not None else min(1.0, timeout_s / 10)
        self.on_expired = on_expired
        self._watched: dict[int, tuple[Any, Any, float]] = {}  # id(item) -> (item, work, posted_at)
        self._expired: Optional[tuple[Any, float]] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, item: Any, work: Any, posted_at: Optional[float] = None) -> None:
        """Starts watching ``work``; the thread runs while anything is watched, so none outlives its use."""
        with self._lock:
            self._watched[id(item)] = (item, work, time.monotonic() if posted_at is None else posted_at)
            thread = None
            if self._thread is None and not self._stop.is_set():
                thread = self._thread = threading.Thread(target=self._run, name="lightning_pp-deadlines", daemon=True)
        if thread is not None:
            thread.start()

    def forget(self, item: Any) -> None:
        """Stops watching ``item`` (its transfer was waited for)."""
        with self._lock:
            self._watched.pop(id(item), None)

    @property
    def num_watched(self) -> int:
        with self._lock:
            return len(self._watched)

    def expired(self) -> Optional[tuple[Any, float]]:
        """``(item, seconds it had waited)`` for the first transfer found past its deadline, else ``None``."""
        return self._expired

    def check(self, now: Optional[float] = None) -> None:
        """One look at the watched transfers: completed ones are dropped, the first overdue one noted."""
        now = time.monotonic() if now is None else now
        with self._lock:
            watched = list(self._watched.items())
        for key, (item, work, posted_at) in watched:
            if _done(work):
                with self._lock:
                    self._watched.pop(key, None)
            elif self._expired is None and now - posted_at > self.timeout_s:
                self._expired = (item, now - posted_at)
                if self.on_expired is not None:
                    self.on_expired(item)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()
            with self._lock:
                if not self._watched:  # idle: end; the next watch starts a new thread
                    self._thread = None
                    return


def _done(work: Any) -> bool:
    try:
        return bool(work.is_completed())
    except RuntimeError:  # a failed transfer: its own wait raises the backend's error
        return True
