"""The blocking-send test wrapper must itself be able to fail: prove it on a naive exchange."""

import pytest
import torch

from blocking import RendezvousTransport
from multirank import RankFailure, run_on_ranks


def _exchange(rank, world_size, send_first_everywhere):
    transport = RendezvousTransport(timeout=3.0)
    peer = 1 - rank
    out, into = torch.full((4,), float(rank)), torch.empty(4)
    if send_first_everywhere or rank % 2 == 0:
        transport.send(out, peer, None)
        transport.recv(into, peer, None)
    else:
        transport.recv(into, peer, None)
        transport.send(out, peer, None)
    return into.tolist()


def test_parity_ordered_exchange_completes():
    assert run_on_ranks(_exchange, 2, False, timeout=60) == [[1.0] * 4, [0.0] * 4]


def test_send_first_on_both_sides_deadlocks_under_the_wrapper():
    with pytest.raises(RankFailure, match="deadlock under blocking-send semantics"):
        run_on_ranks(_exchange, 2, True, timeout=60)
