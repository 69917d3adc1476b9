"""A start-up allowance for the rendezvous, apart from the deadline of every later collective.

Creating the default process group waits for every rank to arrive: each one must
start, import torch and Lightning, and build its model first, which takes seconds to
minutes. The group's timeout bounds that wait, and afterwards every collective on the
group. A short timeout, chosen to catch a stalled stage quickly, would then also fail
a job whose ranks merely start slowly. So the group is created with
:func:`startup_timeout` and, once every rank is there, given the caller's deadline
with :func:`set_default_group_timeout`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Optional

import torch.distributed as dist

__all__ = ["STARTUP_ALLOWANCE", "set_default_group_timeout", "startup_timeout"]

#: The shortest wait for every rank to arrive at the rendezvous.
STARTUP_ALLOWANCE = timedelta(minutes=10)


def startup_timeout(timeout: Optional[timedelta]) -> Optional[timedelta]:
    """How long the rendezvous may wait: ``timeout``, or :data:`STARTUP_ALLOWANCE` if that is longer.

    ``None`` (the backend's own default) stays ``None``. Without the means to shorten
    the group's timeout afterwards the rendezvous keeps ``timeout``.
    """
    if timeout is None or _set_pg_timeout() is None:
        return timeout
    return max(timeout, STARTUP_ALLOWANCE)


def set_default_group_timeout(timeout: Optional[timedelta]) -> None:
    """Gives the default process group ``timeout`` for every collective from now on (``None``: leaves it)."""
    setter = _set_pg_timeout()
    if timeout is not None and setter is not None and dist.is_initialized():
        setter(timeout, None)


def _set_pg_timeout() -> Optional[Callable[..., Any]]:
    """torch's setter of a group's timeout (``torch.distributed.distributed_c10d._set_pg_timeout``), if present."""
    from torch.distributed import distributed_c10d

    return getattr(distributed_c10d, "_set_pg_timeout", None)
