"""The last stage's loss and logs, taken while an earlier stage waits inside its schedule, equal one device.

At pp=4 with 1F1B the last stage finishes a step three backwards before the first
one. The earlier stages post their receive of its values before the schedule and,
once the values are there, log them while waiting for a peer anyway. A backward
that sleeps makes that wait certain, so the early path runs in every step (but the
first) on the first two stages; the logged values and the weights must still equal one device.
"""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_models import make_loader, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow

VOCAB, DIM = 32, 16


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.03)
        return grad


class SlowBackward(nn.Module):
    def forward(self, x):
        return _SlowBackward.apply(x)


class Logged(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM), SlowBackward(), nn.Linear(DIM, DIM), SlowBackward(),
            nn.Linear(DIM, DIM), SlowBackward(), nn.Linear(DIM, VOCAB),
        )
        self.logged: list[tuple[float, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layers(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        self.log("logit_mean", logits.mean())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        metrics = self.trainer.callback_metrics
        self.logged.append((float(metrics["train_loss"]), float(metrics["logit_mean"])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(rank: int, world_size: int) -> dict:
    from lightning_pp import PPStrategy

    L.seed_everything(0)
    model = Logged()
    strategy = "auto" if world_size == 1 else PPStrategy(pipeline_parallel_size=world_size, num_microbatches=4,
                                                         balance=[2, 2, 2, 2])
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, **trainer_kwargs(max_steps=3))
    trainer.fit(model, make_loader(num_items=24, batch_size=8))
    return {"logged": model.logged, "early": getattr(trainer.strategy, "_num_early_publishes", 0),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def test_values_logged_while_waiting_equal_one_device():
    reference = _fit(0, 1)
    results = run_on_ranks(_fit, 4, init_process_group=False, timeout=240)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["logged"], reference["logged"], rtol=1e-5, atol=1e-6)
        if rank < 2:
            # Every step but the first, whose values go pickled (no layout to post a receive for
            # yet). Stage 2's last wait starts before the last stage has sent anything.
            assert result["early"] == 2, (rank, result["early"])
    merged = {k: v for result in results for k, v in result["state"].items()}
    for name, value in reference["state"].items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)
