"""One Trainer, many runs: the process groups are built once and reused, and the results stay one device's.

Lightning sets the strategy's environment up again for every ``fit``,
``validate`` and ``predict``; rebuilding the mesh each time added its groups again
(4, 7, 10, 13 over fit, validate, fit, predict at pp=2), and on GPUs each group
holds communicators in device memory.
"""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import pytest
import torch
import torch.distributed as dist

from lit_models import LitLM, make_loader, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow


class PredictingLM(LitLM):
    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self.layers(x)


def _num_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0


def _fit_validate_fit_predict(devices: int, strategy) -> dict:
    L.seed_everything(0)
    model = PredictingLM()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **trainer_kwargs())
    train = make_loader(num_items=22, batch_size=8, varying=True)
    val = make_loader(num_items=10, batch_size=4, varying=True)
    groups = []
    trainer.fit(model, train)
    groups.append(_num_groups())
    first_val = trainer.validate(model, val, verbose=False)
    groups.append(_num_groups())
    trainer.fit_loop.max_epochs = 2  # one more epoch on the same Trainer
    trainer.fit(model, train)
    groups.append(_num_groups())
    second_val = trainer.validate(model, val, verbose=False)
    groups.append(_num_groups())
    predictions = trainer.predict(model, make_loader(num_items=10, batch_size=4))
    groups.append(_num_groups())
    out = {"val": [first_val, second_val], "predictions": predictions, "groups": groups}
    if devices > 1:
        # A different layout (here: another timeout) replaces the groups: the old ones
        # are destroyed. Both pipeline ranks span the world, so the pipeline axis was
        # the default group itself; with a timeout of its own it becomes one more group.
        trainer.strategy._timeout = timedelta(minutes=29)
        relaid = [trainer.validate(model, val, verbose=False)]
        out["relaid_groups"] = [_num_groups()]
        relaid.append(trainer.validate(model, val, verbose=False))
        out["relaid_groups"].append(_num_groups())
        out["relaid_val"] = relaid
    return out


def _pp_rank(rank: int, world_size: int) -> dict:
    from lightning_pp import PPStrategy

    return _fit_validate_fit_predict(world_size, PPStrategy(pipeline_parallel_size=2, num_microbatches=2))


def test_runs_on_one_trainer_reuse_the_process_groups_and_match_one_device():
    results = run_on_ranks(_pp_rank, 2, init_process_group=False, timeout=240)
    reference = _fit_validate_fit_predict(1, "auto")
    for rank, result in enumerate(results):
        first, *later = result["groups"]
        assert first > 1, result["groups"]
        assert later == [first] * len(later), f"rank {rank}: process groups over the runs: {result['groups']}"
        for got, want in zip(result["val"], reference["val"]):
            assert got[0].keys() == want[0].keys()
            for key in want[0]:
                torch.testing.assert_close(got[0][key], want[0][key], rtol=1e-5, atol=1e-6)
        assert result["relaid_groups"] == [first + 1] * 2, result["relaid_groups"]
        for got in result["relaid_val"]:
            torch.testing.assert_close(got[0]["val_loss"], reference["val"][1][0]["val_loss"], rtol=1e-5, atol=1e-6)
    predictions = results[0]["predictions"]
    assert len(predictions) == len(reference["predictions"])
    for got, want in zip(predictions, reference["predictions"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
