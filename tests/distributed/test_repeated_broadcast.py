"""The last stage's loss and logs reach every rank, in one small collective once the layout repeats.

Three gloo ranks, the last one the source, as in a pipeline. The sequence mixes
repeated layouts (new values each time), Python numbers, plain values, a changed
shape, a new key and ``None``: every rank must get exactly what the source sent,
and only the first call and the changes may go pickled.
"""

from __future__ import annotations

import torch

from lightning_pp.distributed.broadcasts import RepeatedBroadcast

from multirank import run_on_ranks


def _payloads() -> list:
    def step(i: int, extra: bool = False, shape=()) -> tuple:
        logs = {"loss": (torch.full(shape, 0.5 * i), {"prog_bar": True, "batch_size": 4 + i})}
        if extra:
            logs["acc"] = (torch.tensor(i, dtype=torch.int64), {"prog_bar": False, "batch_size": 4})
        return (torch.tensor(1.0 + i), logs)

    return [step(0), step(1), step(2), step(3, shape=(2,)), step(4, shape=(2,)), step(5, extra=True),
            step(6, extra=True), (None, {}), step(8), (torch.tensor([True, False]), {"x": 2.5})]


def _run(rank: int, world_size: int, post_ahead: bool = False) -> tuple:
    import time

    import torch.distributed as dist

    share = RepeatedBroadcast(dist.group.WORLD, world_size - 1, operation="share test values")
    got, posted = [], []
    for payload in _payloads():
        if post_ahead:
            posted.append(share.post())
            if rank == world_size - 1:
                time.sleep(0.02)  # the source comes late, as the last stage's values do at step end
        got.append(share(payload if rank == world_size - 1 else None))
    return got, share.num_pickled, posted


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_every_rank_gets_what_the_source_sent_pickling_only_changes():
    results = run_on_ranks(_run, 3)
    for got, num_pickled, _ in results:
        for sent, received in zip(_payloads(), got, strict=True):
            assert _same(sent, received), (sent, received)
        # pickled: the first, the new shape, the new key, None, back to one key, the bool tensor
        assert num_pickled == 6


def test_a_receive_posted_ahead_gets_the_same_values_also_when_the_layout_changes():
    results = run_on_ranks(_run, 3, True)
    for rank, (got, num_pickled, posted) in enumerate(results):
        for sent, received in zip(_payloads(), got, strict=True):
            assert _same(sent, received), (sent, received)
        assert num_pickled == 6
        if rank == 2:
            assert not any(posted)  # the source never posts
        else:
            # posted once a layout is known, i.e. after the first call, and after each change
            assert posted == [False] + [True] * (len(posted) - 1)
