"""SIGTERM on any rank stops every rank of a pipelined fit at the same batch, without a per-batch broadcast.

Lightning broadcasts rank 0's SIGTERM flag over the world at the start of every
training batch and otherwise stops each rank at the end of the batch in which it got
the signal. In a pipeline a rank that stops alone leaves its neighbours waiting in a
transfer until the timeout. PPStrategy agrees instead: every rank posts an
all-reduce of its flag at the start of a batch and reads it at the start of the
next, so all ranks stop at the same batch, whichever rank got the signal.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import lightning as L
import pytest

from lit_models import LitLM, make_loader, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow


class _Signal(L.Callback):
    """Sends SIGTERM to this process at the start of one batch; counts the batches that started."""

    def __init__(self, rank: int, signalled_rank: int, at_batch: int) -> None:
        self.fire = rank == signalled_rank
        self.at_batch = at_batch
        self.started: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started.append(batch_idx)
        if self.fire and batch_idx == self.at_batch:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(rank: int, world_size: int, signalled_rank: int) -> dict:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_pp import PPStrategy

    L.seed_everything(0)
    callback = _Signal(rank, signalled_rank, at_batch=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=PPStrategy(pipeline_parallel_size=world_size, num_microbatches=2, timeout=timedelta(seconds=60)),
        callbacks=[callback],
        **trainer_kwargs(max_epochs=3),
    )
    stopped = None
    try:
        trainer.fit(LitLM(num_blocks=2), make_loader(num_items=48, batch_size=4))
    except SIGTERMException:
        stopped = "SIGTERMException"
    return {"stopped": stopped, "started": callback.started, "global_step": trainer.global_step,
            "received_sigterm": trainer.received_sigterm}


@pytest.mark.parametrize("signalled_rank", [1, 0])
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_batch(signalled_rank):
    results = run_on_ranks(_fit, 2, signalled_rank, init_process_group=False, timeout=120)
    for result in results:
        assert result["stopped"] == "SIGTERMException", result
        assert result["received_sigterm"]
        # the signal lands in batch 2; the flag posted at the start of batch 3 is read at batch 4
        assert result["started"] == [0, 1, 2, 3], result
        assert result["global_step"] == 4, result
