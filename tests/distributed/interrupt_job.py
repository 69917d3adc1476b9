"""A process that meets Ctrl-C in one of three ways, for ``test_interrupts.py``.

``python interrupt_job.py MODE RANK DIR``; every line of output is flushed, and
``ready`` means "send SIGINT now". Rank 0 installs the interrupt escalation (its
``stop_children`` writes ``DIR/stopped``); rank 1, where there is one, is its gloo
peer.

* ``catch`` (one process): catches the ``KeyboardInterrupt`` raised in plain Python
  and carries on for 7 s: 3 s of work, then 4 s inside a blocking region, as
  clean-up that runs a collective would.
* ``blocked``: rank 0 waits in a receive that rank 1 never matches.
* ``late``: as ``blocked``, but rank 1 sends 1 s after the test created
  ``DIR/signalled``; rank 0 catches the ``KeyboardInterrupt`` the returning
  receive raises and carries on for 7 s.

Rank 1 lives until ``DIR/release`` exists (at most a minute).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout under test

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightning_pp.distributed.interrupts import blocking_region, install_interrupt_escalation  # noqa: E402
from lightning_pp.distributed.p2p import PipeComm  # noqa: E402


def say(line: str) -> None:
    print(line, flush=True)


def wait_for(path: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def carry_on() -> None:
    """What a program that handled the interrupt does next: work, then a collective-like wait."""
    time.sleep(3)
    with blocking_region():
        time.sleep(4)
    say("alive")


def main() -> None:
    mode, rank, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    if rank == 0:
        installed = install_interrupt_escalation(lambda: (out / "stopped").write_text("stopped"))
        say(f"installed={installed}")
    if mode == "catch":
        say("ready")
        try:
            time.sleep(30)
        except KeyboardInterrupt:
            say("caught")
            carry_on()
        return
    dist.init_process_group(
        "gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2, timeout=timedelta(minutes=5)
    )
    comm = PipeComm(dist.group.WORLD, torch.device("cpu"), timeout=timedelta(minutes=5))
    if rank == 0:
        say("ready")
        try:
            comm.recv(1)
            say("received")
        except KeyboardInterrupt:
            say("caught")
            carry_on()
    else:
        if mode == "late":
            wait_for(out / "signalled")
            time.sleep(1.0)
            comm.send(torch.ones(3), 0)
            say("sent")
        wait_for(out / "release")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
