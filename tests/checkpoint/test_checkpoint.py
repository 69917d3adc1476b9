"""PPStrategy checkpoints against an uninterrupted one-device run.

The reference trains ``AdamLM`` (Adam + a per-epoch StepLR, so optimizer state,
param-group hyperparameters and scheduler state all matter) for two epochs on one
device, saving a plain Lightning checkpoint after epoch 1. Pipelined runs train
epoch 1, save, and resume epoch 2 at the same or another pipeline size, on one
device from a consolidated file, or from the plain one-device file: epoch 2's
per-step losses and the final weights must equal the reference's.

Layouts a one-device run cannot stand in for (data parallelism over different
data, two stages per rank, fp16 loss scaling) resume against an uninterrupted run
of the same layout on the same ranks, so no test depends on which ranks the
strategy puts in one pipeline.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_models import LitLM, make_loader, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-6


class AdamLM(LitLM):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _fit(strategy, devices, ckpt_dir=None, resume=None, epochs=1, callbacks=()) -> tuple[AdamLM, Losses, L.Trainer]:
    L.seed_everything(0)
    model = AdamLM()
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        callbacks=[losses, *callbacks],
        **trainer_kwargs(max_epochs=epochs, enable_checkpointing=bool(callbacks)),
    )
    trainer.fit(model, make_loader(num_items=22, batch_size=8, varying=True), ckpt_path=resume)
    return model, losses, trainer


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pp(pp: int, **kw):
    from lightning_pp import PPStrategy

    return PPStrategy(pipeline_parallel_size=pp, num_microbatches=4, **kw)


def _save_epoch_one(rank, world, directory):
    """Epoch 1 at pp=2: ModelCheckpoint at epoch end, and trainer.save_checkpoint after fit."""
    callback = ModelCheckpoint(dirpath=directory, filename="epoch1")
    model, losses, trainer = _fit(_pp(2), world, callbacks=[callback])
    trainer.save_checkpoint(os.path.join(directory, "after_fit.ckpt"))
    return {"losses": losses.values, "state": _state(model), "best": callback.best_model_path}


def _resume(rank, world, pp, path):
    model, losses, _ = _fit(_pp(pp), world, resume=path, epochs=2)
    return {"losses": losses.values, "state": _state(model)}


def _interrupted_save(rank, world, directory):
    """Saves, changes the weights, then fails on rank 1 in the middle of overwriting the save."""
    from torch.distributed.checkpoint import FileSystemWriter

    path = os.path.join(directory, "last.ckpt")
    model, _, trainer = _fit(_pp(2), world)
    trainer.save_checkpoint(path)
    saved = _state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if rank == 1:

        def failing_write(self, plan, planner):
            raise OSError("No space left on device (simulated)")

        FileSystemWriter.write_data = failing_write
    try:
        trainer.save_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - the test asserts on it
        return {"saved": saved, "error": f"{type(error).__name__}: {error}"}
    return {"saved": saved, "error": None}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One device, two epochs uninterrupted; a plain Lightning checkpoint after epoch 1."""
    directory = tmp_path_factory.mktemp("reference")
    callback = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1)
    model, losses, trainer = _fit("auto", 1, epochs=2, callbacks=[callback])
    first = directory / "epoch=0.ckpt"
    plain = torch.load(first, weights_only=False)
    return {"losses": losses.values, "state": _state(model), "epoch1": plain, "file": str(first)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pp2")
    results = run_on_ranks(_save_epoch_one, 2, str(directory), init_process_group=False)
    return directory, results


def _merged(results) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for r in results:
        merged.update(r["state"])
    return merged


def _assert_states_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def test_save_holds_every_stage_and_consolidates_to_the_one_device_checkpoint(saved, reference):
    from lightning_pp import consolidate_checkpoint
    from lightning_pp.checkpoint.sharded import is_sharded_checkpoint

    directory, results = saved
    epoch1 = reference["epoch1"]
    torch.testing.assert_close(results[0]["losses"], reference["losses"][:3], rtol=RTOL, atol=ATOL)
    assert Path(results[0]["best"]) == directory / "epoch1.ckpt"
    for name in ("epoch1.ckpt", "after_fit.ckpt"):
        assert is_sharded_checkpoint(directory / name), name
        ckpt = consolidate_checkpoint(directory / name)
        # Every stage's weights, under the unchanged module's names.
        _assert_states_equal(ckpt["state_dict"], epoch1["state_dict"])
        # Adam moments and step indexed as one device indexes them, lr after the scheduler.
        ours, theirs = ckpt["optimizer_states"][0], epoch1["optimizer_states"][0]
        assert sorted(ours["state"]) == sorted(theirs["state"])
        for index, state in theirs["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(ours["state"][index][key], value, rtol=RTOL, atol=ATOL)
        assert ours["param_groups"][0]["lr"] == pytest.approx(theirs["param_groups"][0]["lr"])
        assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
        assert ckpt["lr_schedulers"] == epoch1["lr_schedulers"]
        assert ckpt["global_step"] == epoch1["global_step"] == 3
    assert not [p for p in directory.iterdir() if p.name.startswith(".")], "no staging directories left behind"


@pytest.mark.parametrize("pp", [2, 3], ids=["same-pp2", "other-pp3"])
def test_resume_equals_uninterrupted_run(saved, reference, pp):
    directory, _ = saved
    results = run_on_ranks(_resume, pp, pp, str(directory / "epoch1.ckpt"), init_process_group=False, timeout=180)
    for r in results:
        torch.testing.assert_close(r["losses"], reference["losses"][3:], rtol=RTOL, atol=ATOL)
    _assert_states_equal(_merged(results), reference["state"])


def test_consolidated_file_resumes_on_one_device_without_lightning_pp(saved, reference, tmp_path):
    from lightning_pp import consolidate_checkpoint

    directory, _ = saved
    single = tmp_path / "consolidated.ckpt"
    consolidate_checkpoint(directory / "epoch1.ckpt", single)
    model, losses, _ = _fit("auto", 1, resume=str(single), epochs=2)
    torch.testing.assert_close(losses.values, reference["losses"][3:], rtol=RTOL, atol=ATOL)
    _assert_states_equal(_state(model), reference["state"])
    fresh = AdamLM()
    fresh.load_state_dict(torch.load(single, weights_only=False)["state_dict"])  # strict


def test_pipeline_resumes_from_a_plain_one_device_checkpoint(reference):
    results = run_on_ranks(_resume, 2, 2, reference["file"], init_process_group=False)
    for r in results:
        torch.testing.assert_close(r["losses"], reference["losses"][3:], rtol=RTOL, atol=ATOL)
    _assert_states_equal(_merged(results), reference["state"])


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    from lightning_pp import consolidate_checkpoint

    results = run_on_ranks(_interrupted_save, 2, str(tmp_path), init_process_group=False)
    for r in results:
        assert r["error"] is not None and "No space left on device (simulated)" in r["error"], r["error"]
    expected = {**results[0]["saved"], **results[1]["saved"]}
    path = tmp_path / "last.ckpt"
    _assert_states_equal(consolidate_checkpoint(path)["state_dict"], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "the failed write was cleaned up"

    # A crash between moving the old checkpoint aside and moving the new one in.
    os.rename(path, tmp_path / ".last.ckpt.old-0123")
    with pytest.warns(UserWarning, match="interrupted"):
        _assert_states_equal(consolidate_checkpoint(path)["state_dict"], expected)
    # A crash before the commit leaves a directory without meta.pt: refused, with a reason.
    shutil.copytree(tmp_path / ".last.ckpt.old-0123", path)
    os.remove(path / "meta.pt")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        consolidate_checkpoint(path)


# -- data parallelism, the interleaved schedule, fp16 loss scaling --------------------------
class Progress(L.Callback):
    """Per step: the loss this rank's replica published, and the fp16 loss scale (if any)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))


def _precision_plugins(cfg: dict) -> list:
    if not cfg.get("fp16"):
        return []
    from lightning.pytorch.plugins.precision import MixedPrecision

    # Lightning turns "16-mixed" into bf16 on the CPU; this is fp16 autocast with a real
    # GradScaler. growth_interval=1 doubles the scale after every finite step, so the
    # scale a resumed run starts from differs from init_scale: a lost scaler state shows.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    return [MixedPrecision("16-mixed", "cpu", scaler=scaler)]


def _run(cfg: dict, world: int, epochs: int, resume=None, callbacks=()) -> tuple[Progress, AdamLM]:
    L.seed_everything(0)
    model = AdamLM()
    progress = Progress()
    plugins = _precision_plugins(cfg)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=_pp(cfg["pp"], schedule=cfg.get("schedule", "1F1B")),
        plugins=plugins,
        callbacks=[progress, *callbacks],
        **trainer_kwargs(
            max_epochs=epochs,
            enable_checkpointing=bool(callbacks),
            precision=None if plugins else "32-true",
            # Replicas read different halves of the data: their losses differ.
            use_distributed_sampler=cfg.get("dp_sampler", False),
        ),
    )
    trainer.fit(model, make_loader(num_items=22, batch_size=8, varying=True), ckpt_path=resume)
    return progress, model


def _uninterrupted_then_resumed(rank, world, cfg, directory):
    """Two epochs uninterrupted, saving after the first; then a fresh run resumed from that save.

    Both runs use the same ranks in the same layout, so each rank compares with itself,
    whichever ranks the strategy puts in one pipeline.
    """
    callback = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1)
    whole, whole_model = _run(cfg, world, epochs=2, callbacks=[callback])
    resumed, resumed_model = _run(cfg, world, epochs=2, resume=os.path.join(directory, "epoch=0.ckpt"))
    return {
        "whole": whole.losses,
        "whole_scales": whole.scales,
        "resumed": resumed.losses,
        "resumed_scales": resumed.scales,
        "whole_state": _state(whole_model),
        "resumed_state": _state(resumed_model),
    }


RESUME_CASES = {
    # 4 ranks: two pipelines of two stages, each replica reading its half of the data.
    "dp2xpp2": (4, dict(pp=2, dp_sampler=True)),
    # Two stages per rank (4 stages on 2 ranks): rank 0 holds layers of stages 0 and 2.
    "interleaved-pp2": (2, dict(pp=2, schedule="Interleaved1F1B")),
    # fp16 autocast with a loss scale that grows every step.
    "fp16-pp2": (2, dict(pp=2, fp16=True)),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_equals_the_uninterrupted_run(case, tmp_path):
    world, cfg = RESUME_CASES[case]
    results = run_on_ranks(
        _uninterrupted_then_resumed, world, cfg, str(tmp_path), init_process_group=False, timeout=240
    )
    steps_per_epoch = len(results[0]["whole"]) // 2
    assert steps_per_epoch > 0
    for rank, r in enumerate(results):
        assert len(r["resumed"]) == steps_per_epoch, (rank, r["resumed"])
        torch.testing.assert_close(r["resumed"], r["whole"][steps_per_epoch:], rtol=RTOL, atol=ATOL)
        _assert_states_equal(r["resumed_state"], r["whole_state"])
    if cfg.get("dp_sampler"):
        # The replicas really saw different data (otherwise data parallelism is not tested).
        assert len({tuple(r["whole"]) for r in results}) > 1
    if cfg.get("fp16"):
        for r in results:
            # The loss scale moved during epoch 1, so a resume that lost it would start elsewhere.
            assert r["whole_scales"][steps_per_epoch - 1] != 2.0**10
            assert r["resumed_scales"] == r["whole_scales"][steps_per_epoch:]
