"""The rendezvous waits at least the start-up allowance; the default group then gets the strategy's deadline.

The launched job in ``tests/integration/test_failures.py`` (an 8 s deadline, a stalled stage)
is the end-to-end check: before this, its rendezvous failed with "Timed out after 9 seconds
waiting for clients" while the second rank was still importing Lightning.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from lightning_pp.distributed.startup import STARTUP_ALLOWANCE, set_default_group_timeout, startup_timeout
from lightning_pp.distributed.topology import process_group_timeout

from multirank import run_on_ranks


def test_the_rendezvous_gets_the_allowance_or_a_longer_timeout():
    assert startup_timeout(timedelta(seconds=8)) == STARTUP_ALLOWANCE == timedelta(minutes=10)
    assert startup_timeout(timedelta(hours=1)) == timedelta(hours=1)
    assert startup_timeout(None) is None  # the backend's default, unchanged
    set_default_group_timeout(timedelta(seconds=8))  # no process group: nothing to do


def _shortened(rank: int, world_size: int) -> tuple:
    before = process_group_timeout(dist.group.WORLD)
    set_default_group_timeout(timedelta(seconds=2))
    after = process_group_timeout(dist.group.WORLD)
    if rank == 1:
        time.sleep(8)  # alive, but not in the barrier
        return before, after, "stayed away"
    start = time.monotonic()
    try:
        dist.barrier()
    except RuntimeError:
        return before, after, time.monotonic() - start
    return before, after, "passed"


@pytest.mark.slow  # a rank sleeps 8 s
def test_after_start_up_the_default_group_waits_only_the_deadline():
    # The ranks' group starts with gloo's default (30 minutes); once shortened, a barrier that one
    # rank stays away from fails after about 2 s (without it, only once that rank exits at 8 s).
    (before, after, waited), _ = run_on_ranks(_shortened, 2, timeout=120)
    assert before == timedelta(minutes=30) and after == timedelta(seconds=2)
    assert isinstance(waited, float) and waited < 6, waited
