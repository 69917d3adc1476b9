"""``trainer.predict`` under ``PPStrategy`` does what Lightning does on one device, on real gloo ranks.

* Batch hooks: ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
  ``on_after_batch_transfer`` run once per batch, in that order, on every stage,
  and ``predict_step`` and the batch callbacks get the batch they made.
* Non-tensor predictions (per-row lists of token ids, per-row strings) with data
  parallelism come back in dataset order, batched as one device batches them.
* Stages whose predict dataloaders differ in length fail at once, naming the ranks.

Each case compares with the same module predicted by ``strategy="auto"`` on one device.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from compare import assert_same
from lit_models import VOCAB, LitLM, TokenData, TokensOnly, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow


# -- batch hooks ---------------------------------------------------------------------------------
class IndexedTokens(Dataset):
    """``{"idx": i, "x": tokens}`` with float tokens: the embedding needs the cast a hook makes."""

    def __init__(self, num_items: int) -> None:
        self.data = TokenData(num_items)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return {"idx": torch.tensor(i), "x": self.data[i][0].float()}


def _first(batch) -> int:
    return int(batch["idx"][0])


class BeforeOnlyLM(LitLM):
    """Overrides only ``on_before_batch_transfer``: the pipeline keeps its deferred per-microbatch copy."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        assert "changed" not in batch, "on_before_batch_transfer ran twice on one batch"
        self.calls.append(("before", _first(batch)))
        return {**batch, "x": batch["x"].flip(1).long(), "changed": True}

    def predict_step(self, batch, batch_idx):
        return self.layers(batch["x"]).softmax(-1)

    def on_predict_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        # The batch Lightning hands to callbacks is the one the hooks made, as on one device.
        self.calls.append(("batch_end", batch_idx, _first(batch), int(batch["x"].sum()), str(batch["x"].dtype)))


class AllHooksLM(BeforeOnlyLM):
    """Overrides the three hooks: the user's transfer hook moves each whole batch."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        assert "changed" not in batch, "on_before_batch_transfer ran twice on one batch"
        self.calls.append(("before", _first(batch)))
        return {**batch, "x": batch["x"].flip(1), "changed": True}

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.calls.append(("transfer", _first(batch)))
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {**batch, "x": batch["x"].long()}

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("after", _first(batch)))
        return {**batch, "x": (batch["x"] + 1) % VOCAB}


HOOK_MODELS = {"all-hooks": AllHooksLM, "before-only": BeforeOnlyLM}


def _predict_with_hooks(name: str, devices: int, strategy) -> dict:
    L.seed_everything(0)
    model = HOOK_MODELS[name]()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **trainer_kwargs())
    # 10 rows in batches of 4: 4, 4, 2 (the short last batch uses fewer microbatches).
    predictions = trainer.predict(model, DataLoader(IndexedTokens(10), batch_size=4))
    return {"predictions": predictions, "calls": model.calls}


def _hooks_rank(rank: int, world_size: int) -> dict:
    from lightning_pp import PPStrategy

    return {name: _predict_with_hooks(name, world_size, PPStrategy(num_microbatches=3)) for name in HOOK_MODELS}


def test_batch_hooks_run_once_per_batch_in_order_as_on_one_device():
    results = run_on_ranks(_hooks_rank, 2, init_process_group=False, timeout=150)
    for name in HOOK_MODELS:
        reference = _predict_with_hooks(name, 1, "auto")
        assert_same(results[0][name]["predictions"], reference["predictions"])
        hooks = [c for c in reference["calls"] if c[0] != "batch_end"]
        ends = [c for c in reference["calls"] if c[0] == "batch_end"]
        assert len(hooks) == 3 * (3 if name == "all-hooks" else 1)
        for rank, result in enumerate(results):
            calls = result[name]["calls"]
            # Every stage runs each hook once per batch, in Lightning's order; the pipeline
            # reads batches ahead, so a batch's hooks may come before the previous batch ends.
            assert [c for c in calls if c[0] != "batch_end"] == hooks, (name, rank, calls)
            assert [c for c in calls if c[0] == "batch_end"] == ends, (name, rank, calls)


# -- non-tensor predictions with data parallelism -------------------------------------------------


WORDS = ["cat", "dog", "eel", "fox", "gnu"]


class ListLM(LitLM):
    """Returns per-row Python lists, as generation does: token-id lists of different lengths, or strings."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    def predict_step(self, batch, batch_idx):
        ids = self.layers(batch).argmax(-1)
        if self.output == "ids":
            return [row[: 1 + int(x[0]) % 5].tolist() for row, x in zip(ids, batch)]
        return [WORDS[int(row[0]) % len(WORDS)] + str(int(x[0])) for row, x in zip(ids, batch)]


def _predict_lists(output: str, devices: int, strategy, sampler: bool) -> list:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, **trainer_kwargs(use_distributed_sampler=sampler)
    )
    # 11 rows in batches of 4: one device makes 4, 4, 3; each of two replicas gets 6 rows
    # (one of them padding) as 4 + 2, each batch split into up to 3 microbatches.
    return trainer.predict(ListLM(output), DataLoader(TokensOnly(11), batch_size=4))


def _lists_rank(rank: int, world_size: int) -> dict:
    from lightning_pp import PPStrategy

    return {
        output: _predict_lists(output, world_size, PPStrategy(pipeline_parallel_size=2, num_microbatches=3), True)
        for output in ("ids", "strings")
    }


def test_per_row_lists_with_two_replicas_come_back_as_one_device_returns_them():
    results = run_on_ranks(_lists_rank, 4, init_process_group=False, timeout=180)
    for output in ("ids", "strings"):
        reference = _predict_lists(output, 1, "auto", sampler=False)
        assert [len(batch) for batch in reference] == [4, 4, 3]
        if output == "ids":
            assert len({len(row) for batch in reference for row in batch}) > 1, "rows should differ in length"
        assert results[0][output] == reference, output


# -- dataloaders of different lengths -------------------------------------------------------------
def _mismatched_rank(rank: int, world_size: int) -> str:
    from lightning_pp import PPStrategy

    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(), **trainer_kwargs())
    # Rank 1 sees 12 rows (3 batches), rank 0 sees 8 (2 batches).
    loader = DataLoader(TokensOnly(8 if rank == 0 else 12), batch_size=4)
    try:
        trainer.predict(ListLM("ids"), loader)
    except ValueError as error:
        return str(error)
    return "no error"


def test_stages_with_different_predict_lengths_fail_naming_the_ranks():
    for message in run_on_ranks(_mismatched_rank, 2, init_process_group=False, timeout=90):
        assert "different numbers of predict batches: [[2], [3]] by pipeline rank, at global ranks [0, 1]" in message
