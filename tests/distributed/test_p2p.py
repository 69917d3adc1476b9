"""Structured point-to-point transfers between two gloo ranks.

Rank 0 sends a sequence of payloads, rank 1 receives them and sends back what
it got; the parent compares with what was sent. The sequence mixes repeated
layouts (sent as a one-integer header), changed shapes, several dtypes packed
per message, empty tensors, ``None`` leaves and nesting, so a receiver that
reuses a stale layout, mixes up a packed buffer or merges gradients of packed
tensors fails here.
"""

from __future__ import annotations

import pytest
import torch

from lightning_pp.distributed.p2p import PipeComm

from blocking import RendezvousTransport
from multirank import run_on_ranks


def _payloads() -> list:
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        t = torch.randn(*shape, generator=g)
        return t.to(dtype) if dtype.is_floating_point else (t * 100).to(dtype)

    header = {"slot": torch.tensor([1, 7, 0]), "ids": torch.tensor([3, 4]), "n": torch.tensor([1, 1])}
    return [
        r(4, 8),
        r(4, 8),  # same layout: header only, then the tensor
        r(5, 8),  # new shape: the layout again
        {**header, "hidden": r(2, 8), "residual": r(2, 8)},  # 2 messages: int64 pack, float pack
        {**header, "hidden": r(2, 8), "residual": r(2, 8)},  # repeated layout, new values
        {"slot": torch.tensor([2, 8, 1]), "ids": torch.zeros(0, dtype=torch.long), "hidden": r(0, 8)},  # empties
        (r(3, dtype=torch.bfloat16), None, [r(2, 2), r(1, dtype=torch.int32)], {"x": r(2, 3, dtype=torch.float16)}),
        r(4, 8),  # back to the first layout after others
    ]


def _flatten(payload) -> list:
    if isinstance(payload, torch.Tensor) or payload is None:
        return [payload]
    if isinstance(payload, dict):
        return [(k, x) for k, v in payload.items() for x in _flatten(v)]
    return [x for item in payload for x in _flatten(item)]


def _exchange(rank: int, world_size: int, blocking: bool) -> dict:
    import torch.distributed as dist

    transport = RendezvousTransport() if blocking else None
    comm = PipeComm(dist.group.WORLD, torch.device("cpu"), transport=transport)
    out: dict = {"received": [], "grads_separate": None}
    if rank == 0:
        for payload in _payloads():
            comm.send(payload, 1)
        # A payload that needs gradients: the receiver backpropagates through two packed tensors.
        a = torch.ones(2, 3, requires_grad=True)
        b = torch.ones(4, requires_grad=True)
        comm.send((a * 2, b * 3), 1)
        out["grads_separate"] = comm.recv(1)
    else:
        for _ in _payloads():
            out["received"].append(comm.recv(0))
        x, y = comm.recv(0)
        assert x.is_leaf and y.is_leaf and x.requires_grad and y.requires_grad
        (x.sum() * 5 + (y * y).sum()).backward()
        comm.send((x.grad, y.grad), 0)
    out["sends"] = transport.num_sends if blocking else None
    return out


@pytest.mark.parametrize("blocking", [False, True], ids=["gloo", "blocking-sends"])
def test_payloads_arrive_intact_in_few_messages(blocking):
    sender, receiver = run_on_ranks(_exchange, 2, blocking)
    for sent, got in zip(_payloads(), receiver["received"], strict=True):
        assert type(got) is type(sent)
        sent_leaves, got_leaves = _flatten(sent), _flatten(got)
        assert len(sent_leaves) == len(got_leaves)
        for s, g in zip(sent_leaves, got_leaves):
            if isinstance(s, tuple):
                assert s[0] == g[0]
                s, g = s[1], g[1]
            if s is None:
                assert g is None
                continue
            assert g.shape == s.shape and g.dtype == s.dtype
            torch.testing.assert_close(g, s, rtol=0, atol=0)
    x_grad, y_grad = sender["grads_separate"]
    torch.testing.assert_close(x_grad, torch.full((2, 3), 5.0))
    torch.testing.assert_close(y_grad, torch.full((4,), 6.0))  # d(y^2)/dy at y = 3
    if blocking:
        # Messages rank 0 sent for its 9 payloads: 9 headers; 7 layouts (payloads 2 and 5 repeat
        # the previous one); one message per dtype that has data (empty tensors send nothing).
        assert sender["sends"] == 9 + 7 + (1 + 1 + 1 + 2 + 2 + 1 + 4 + 1 + 1)
