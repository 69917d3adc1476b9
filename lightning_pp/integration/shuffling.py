"""Every stage of a pipeline reads the batches in the same shuffled order.

Each stage reads the batches itself, and the step pairs what the first stage computed
with what the last stage reads (its labels). A ``DataLoader(shuffle=True)`` draws its
order from the process's global random state, which differs from rank to rank unless
every rank was seeded alike, and even then drifts apart once stages use different
amounts of randomness (dropout on some stages only): the stages would then train on
mismatched batches, without an error.

:func:`agree_on_shuffling` gives each such sampler of a loader (one with a ``generator``
attribute left at ``None``: ``RandomSampler``, ``SubsetRandomSampler``,
``WeightedRandomSampler``) a generator every stage seeds alike:

* at once, from the first stage's initial seed (nothing is drawn from the global
  random state);
* at the start of each epoch (Lightning calls ``set_epoch``), from a seed every rank
  draws from its global random state as ``RandomSampler`` does at each pass, the first
  stage's being used: each epoch's order is the one the first stage would have drawn.

Like DDP's, the order is not one device's: Lightning reseeds every rank when the
process group starts, after the model was built.

A sampler given its own generator, and a distributed sampler, are left as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

__all__ = ["agree_on_shuffling"]

#: Marks a sampler already set up, so a loader processed twice is left alone.
_AGREED = "_lightning_pp_agreed_order"


def agree_on_shuffling(dataloader: Any, agree: Callable[[int], int]) -> int:
    """Makes the shuffling samplers of ``dataloader`` agree over the pipeline; returns how many it set up.

    Args:
        dataloader: a ``torch.utils.data.DataLoader`` (anything else is left alone).
        agree: a collective over the pipeline's ranks: returns the first stage's value of
            its argument. Called once here and once per epoch, on every rank alike.
    """
    count = 0
    for sampler in _samplers(dataloader):
        if getattr(sampler, "generator", False) is not None or getattr(sampler, _AGREED, False):
            continue
        # The initial seed is a 64-bit unsigned number; what travels is a signed one.
        sampler.generator = torch.Generator().manual_seed(agree(torch.initial_seed() % (1 << 63)))
        own_set_epoch = getattr(sampler, "set_epoch", None)

        def set_epoch(epoch: int, sampler: Any = sampler, own: Any = own_set_epoch) -> None:
            if callable(own):
                own(epoch)
            # What RandomSampler draws from the global random state at each pass, on every rank.
            drawn = int(torch.empty((), dtype=torch.int64).random_().item())
            sampler.generator = torch.Generator().manual_seed(agree(drawn))

        sampler.set_epoch = set_epoch
        setattr(sampler, _AGREED, True)
        count += 1
    return count


def _samplers(dataloader: Any) -> Iterator[Any]:
    """The loader's sampler and its batch sampler's, each once."""
    seen: set[int] = set()
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    for sampler in (getattr(dataloader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if sampler is not None and id(sampler) not in seen:
            seen.add(id(sampler))
            yield sampler
