"""A transport whose sends block until the receiver has posted the matching receive.

That is how Intel XCCL behaves (its ``isend`` busy-polls for the peer's receive),
and the model under which a ring of ranks that all send first never completes. Each
receive announces itself in the process group's store before it starts; each send
waits for that announcement. A send that waits longer than ``timeout`` raises, so a
deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["RendezvousTransport"]


class RendezvousTransport:
    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timedelta(seconds=timeout)
        self._sent: dict[int, int] = defaultdict(int)
        self._received: dict[int, int] = defaultdict(int)
        self.num_sends = 0

    @staticmethod
    def _store():
        return dist.distributed_c10d._get_default_store()

    def send(self, tensor: torch.Tensor, dst: int, group: Optional[dist.ProcessGroup]) -> None:
        me = dist.get_rank()
        key = f"rendezvous/{me}->{dst}/{self._sent[dst]}"
        self._sent[dst] += 1
        try:
            self._store().wait([key], self.timeout)
        except Exception as error:  # noqa: BLE001 - the store raises a backend-specific error
            raise TimeoutError(
                f"rank {me}: send #{self._sent[dst] - 1} to rank {dst} waited {self.timeout} for a matching receive "
                "(deadlock under blocking-send semantics)"
            ) from error
        dist.send(tensor, dst=dst, group=group)
        self.num_sends += 1

    def recv(self, tensor: torch.Tensor, src: int, group: Optional[dist.ProcessGroup]) -> None:
        me = dist.get_rank()
        self._store().set(f"rendezvous/{src}->{me}/{self._received[src]}", "posted")
        self._received[src] += 1
        dist.recv(tensor, src=src, group=group)
