"""A shuffled training loader gives every pipeline stage the same batches, and training equals one device on them.

Each stage reads the batches itself. Before the stages agreed on the order, ranks whose
random states differed (no ``seed_everything``) read differently shuffled batches: the
last stage paired the first stage's activations with other rows' labels, and training
went on without an error (seen at pp=2: different batch sums from the first step on).
"""

from __future__ import annotations

import os
import random

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_models import LitLM, TokenData, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow


class Recording(LitLM):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _pp_rank(rank: int, world_size: int) -> dict:
    from lightning_pp import PPStrategy

    torch.manual_seed(0)
    model = Recording()
    torch.manual_seed(1000 + rank)  # as unseeded processes are: each rank's random state its own
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(), **trainer_kwargs(max_epochs=2))
    trainer.fit(model, DataLoader(TokenData(24), batch_size=4, shuffle=True))
    return {"batches": model.batches, "losses": model.losses}


def test_every_stage_reads_the_same_shuffled_batches_and_trains_as_one_device_on_them():
    results = run_on_ranks(_pp_rank, 2, init_process_group=False, timeout=240)
    first, second = results
    assert len(first["batches"]) == 12
    for mine, theirs in zip(first["batches"], second["batches"]):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    order = [int(x.sum()) for x, _ in first["batches"]]
    in_order = [int(x.sum()) for x, _ in DataLoader(TokenData(24), batch_size=4)]
    assert order[:6] != order[6:] and order[:6] != in_order, "shuffled, each epoch its own way"
    # One device, fed those batches in that order, from the same initial weights.
    torch.manual_seed(0)
    model = Recording()
    trainer = L.Trainer(accelerator="cpu", devices=1, **trainer_kwargs(max_epochs=1))
    trainer.fit(model, DataLoader(first["batches"], batch_size=None))
    torch.testing.assert_close(first["losses"], model.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second["losses"], model.losses, rtol=1e-5, atol=1e-6)


class ShuffledPerProcess(torch.utils.data.Sampler):
    """A sampler of a user's own that shuffles with each process's own random state."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        order = list(range(self.n))
        random.Random(os.getpid()).shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


def _own_sampler_rank(rank: int, world_size: int) -> str:
    from lightning_pp import PPStrategy

    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(), **trainer_kwargs(max_epochs=1))
    try:
        trainer.fit(LitLM(), DataLoader(TokenData(24), batch_size=4, sampler=ShuffledPerProcess(24)))
    except ValueError as error:
        return str(error)
    return "trained"


def test_stages_that_read_different_batches_stop_at_the_first_one():
    # No generator to give: the check at each epoch's first batch stops every stage, naming the cause.
    for message in run_on_ranks(_own_sampler_rank, 2, init_process_group=False, timeout=240):
        assert "The stages of one pipeline read different rows in the first batch of the epoch" in message, message
        assert "seed it alike on every rank" in message
