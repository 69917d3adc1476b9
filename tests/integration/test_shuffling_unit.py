"""Shuffling samplers get a generator the pipeline's stages seed alike (no process group: a fake agreement)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, WeightedRandomSampler

from lightning_pp.integration.shuffling import agree_on_shuffling


class FirstStage:
    """Stands in for the collective: answers what the first stage (value 7, then 8, ...) would."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, value: int) -> int:
        self.calls.append(value)
        return 7 + len(self.calls) - 1


def _order(loader: DataLoader) -> list[int]:
    return [int(i) for batch in loader for i in batch]


def test_a_shuffled_loader_follows_the_first_stages_seed_each_epoch():
    agree = FirstStage()
    loader = DataLoader(range(10), batch_size=3, shuffle=True)
    assert agree_on_shuffling(loader, agree) == 1
    assert agree_on_shuffling(loader, agree) == 0  # processed twice: left alone
    first = _order(loader)
    assert first == torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    loader.sampler.set_epoch(1)  # what Lightning calls at each epoch start
    assert _order(loader) == torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    assert len(agree.calls) == 2 and all(0 <= value < 2**63 for value in agree.calls)


def test_samplers_with_their_own_order_are_left_alone():
    agree = FirstStage()
    seeded = DataLoader(range(10), shuffle=True, generator=torch.Generator().manual_seed(3))
    in_order = DataLoader(range(10))
    weighted = DataLoader(range(4), sampler=WeightedRandomSampler([1.0] * 4, 4))
    assert agree_on_shuffling(seeded, agree) == agree_on_shuffling(in_order, agree) == 0
    assert agree_on_shuffling(weighted, agree) == 1  # it draws from the global random state too
    distributed = DistributedSampler(range(10), num_replicas=2, rank=0)
    assert agree_on_shuffling(DataLoader(range(10), sampler=distributed), agree) == 0
    assert isinstance(seeded.sampler, RandomSampler) and agree.calls == [agree.calls[0]]
