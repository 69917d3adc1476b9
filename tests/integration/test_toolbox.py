"""The ordinary Lightning toolbox under PPStrategy gives what one device gives.

One module and datamodule, trained with what Lightning users combine every day:
default Trainer options (the distributed sampler included), validation with
``ModelCheckpoint(monitor="val_loss", save_top_k=2)`` and ``EarlyStopping``, an LR
scheduler with ``LearningRateMonitor``, a ``CSVLogger``, epoch-level values reduced
with ``sync_dist=True`` (a mean, sums, counts and a max), ``self.all_gather``, then
``trainer.validate`` and ``trainer.test``; and ``LightningCLI`` choosing the strategy
from a YAML config. Each is compared with the same module on one device.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lit_models import DIM, VOCAB, Block, TokenData
from multirank import run_on_ranks

pytestmark = pytest.mark.slow


class ToolboxModule(L.LightningModule):
    def __init__(self, num_blocks: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.Sequential(
            nn.Embedding(VOCAB, DIM), *[Block() for _ in range(num_blocks)], nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)
        )
        self.gathered: list[list[float]] = []
        self.val_outputs: list[torch.Tensor] = []

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.layers(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layers(x)
        per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = per_token.mean()
        self.log("train_loss", loss)
        # Epoch-level reductions of a mean, a total, two counts (a Python int, an integer tensor) and
        # a largest value. Microbatch values combine as Lightning combines steps (reduce_fx), which
        # for each of these gives the whole batch's value; a sum over the steps counts each step once.
        epoch = dict(on_step=False, on_epoch=True, sync_dist=True)
        self.log("mean_loss", loss, **epoch)
        self.log("loss_total", per_token.sum(), reduce_fx="sum", **epoch)
        self.log("rows", len(x), reduce_fx="sum", **epoch)
        self.log("correct", (logits.argmax(-1) == y).sum(), reduce_fx="sum", **epoch)
        self.log("worst_token_loss", per_token.max(), reduce_fx="max", **epoch)
        return loss

    def on_train_epoch_end(self):
        self.gathered.append(self.all_gather(torch.tensor([float(self.current_epoch)])).flatten().tolist())

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss)
        return loss

    # The README's way to keep step values for the epoch's end: every rank gets the batch's value here.
    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_outputs.append(outputs)

    def on_validation_epoch_end(self):
        self.log("val_avg", torch.stack(self.val_outputs).mean())
        self.val_outputs.clear()

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class ToolboxData(L.LightningDataModule):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TokenData(22, 8, seed=0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TokenData(10, 8, seed=1), batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(TokenData(6, 8, seed=2), batch_size=self.batch_size)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fit_validate_test(devices: int, strategy, out: str) -> dict:
    L.seed_everything(0)
    model, data = ToolboxModule(), ToolboxData()
    checkpoint = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val_loss", save_top_k=2)
    # min_delta larger than any improvement: the third validation stops the run (patience 2),
    # and the third checkpoint pushes the first out of the top 2.
    stopping = EarlyStopping(monitor="val_loss", patience=2, min_delta=10.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=5,
        callbacks=[checkpoint, stopping, LearningRateMonitor(logging_interval="epoch")],
        logger=CSVLogger(out, name="run", version=0),
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=data)
    validated = trainer.validate(model, datamodule=data)
    tested = trainer.test(model, datamodule=data)
    if trainer.global_rank != 0:
        return {}
    return {
        "epochs": trainer.current_epoch,
        "stopped": stopping.stopped_epoch,
        "kept": sorted(Path(p).name for p in checkpoint.best_k_models),
        "best_score": float(checkpoint.best_model_score),
        "metrics": _read_csv(Path(out) / "run" / "version_0" / "metrics.csv"),
        "validated": validated,
        "tested": tested,
        "gathered": model.gathered,
    }


def _pp_rank(rank: int, world_size: int, out: str) -> dict:
    from lightning_pp import PPStrategy

    return _fit_validate_test(world_size, PPStrategy(), out)


def _close(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-6)
    except ValueError:
        return False


def test_the_toolbox_matches_one_device(tmp_path):
    ref = _fit_validate_test(1, "auto", str(tmp_path / "one"))
    results = run_on_ranks(_pp_rank, 2, str(tmp_path / "pp"), timeout=240, init_process_group=False)
    got = results[0]

    assert ref["stopped"] == 2 and ref["epochs"] == 3, "early stopping must end the reference run after 3 epochs"
    assert len(ref["kept"]) == 2
    for key in ("epochs", "stopped", "kept", "gathered"):
        assert got[key] == ref[key], key
    assert math.isclose(got["best_score"], ref["best_score"], rel_tol=1e-5)
    assert [sorted(m) for m in got["validated"]] == [sorted(m) for m in ref["validated"]]
    for name in ("validated", "tested"):
        for mine, theirs in zip(got[name], ref[name]):
            for key, value in theirs.items():
                assert math.isclose(mine[key], value, rel_tol=1e-5), (name, key)
    # The CSV logger's file, row by row: losses, learning rates, the epoch sums.
    assert len(got["metrics"]) == len(ref["metrics"])
    assert set(got["metrics"][0]) == set(ref["metrics"][0])
    for mine, theirs in zip(got["metrics"], ref["metrics"]):
        bad = {k: (mine[k], v) for k, v in theirs.items() if not _close(mine[k], v)}
        assert not bad, bad
    for name in ("loss_total", "rows", "correct", "worst_token_loss", "lr-SGD", "val_avg"):
        assert any(row.get(name) for row in ref["metrics"]), name
    assert float(next(row["rows"] for row in ref["metrics"] if row.get("rows"))) == 22, "every row counted once"


# -- LightningCLI ------------------------------------------------------------------------------
CONFIG = """\
trainer:
  accelerator: cpu
  devices: 2
  max_epochs: 1
  enable_progress_bar: false
  logger: false
  enable_checkpointing: false
  strategy:
    class_path: lightning_pp.PPStrategy
    init_args:
      num_microbatches: 2
model:
  num_blocks: 4
data:
  batch_size: 4
"""


def _cli_rank(rank: int, world_size: int, config: str, devices: int) -> dict:
    from lightning.pytorch.cli import LightningCLI

    L.seed_everything(0)
    args = ["fit", "--config", config, f"--trainer.devices={devices}"]
    if devices == 1:
        args.append("--trainer.strategy=auto")
    cli = LightningCLI(ToolboxModule, ToolboxData, args=args, save_config_callback=None)
    return {
        "strategy": type(cli.trainer.strategy).__name__,
        "microbatches": getattr(cli.trainer.strategy, "num_microbatches", None),
        "loss": float(cli.trainer.callback_metrics["train_loss"]),
    }


def test_lightning_cli_selects_pp_strategy_from_yaml(tmp_path):
    pytest.importorskip("jsonargparse")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    ref = run_on_ranks(_cli_rank, 1, str(config), 1, timeout=180, init_process_group=False)[0]
    results = run_on_ranks(_cli_rank, 2, str(config), 2, timeout=180, init_process_group=False)
    assert ref["strategy"] != "PPStrategy"
    assert [r["strategy"] for r in results] == ["PPStrategy", "PPStrategy"]
    assert results[0]["microbatches"] == 2
    assert math.isclose(results[0]["loss"], ref["loss"], rel_tol=1e-5)


# -- data parallelism: DDP's conventions, over the replicas --------------------------------------
def _replicas_fit(devices: int, strategy) -> dict:
    L.seed_everything(0)
    model = ToolboxModule()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=ToolboxData())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"metrics": metrics, "gathered": model.gathered}


def _replicas_pp_rank(rank: int, world_size: int) -> dict:
    from lightning_pp import PPStrategy

    return _replicas_fit(world_size, PPStrategy(pipeline_parallel_size=2))


def _replicas_ddp_rank(rank: int, world_size: int) -> dict:
    return _replicas_fit(world_size, "ddp")


def test_data_parallel_reductions_match_ddp():
    # dp=2 x pp=2 against DDP on 2 devices: the same shards of shuffled data (DDP's
    # convention), `sync_dist` sums and means over the 2 replicas, all_gather one entry each.
    ddp = run_on_ranks(_replicas_ddp_rank, 2, timeout=180, init_process_group=False)[0]
    pp = run_on_ranks(_replicas_pp_rank, 4, timeout=240, init_process_group=False)[0]
    assert pp["gathered"] == ddp["gathered"] == [[0.0, 0.0]]
    assert sorted(pp["metrics"]) == sorted(ddp["metrics"])
    for key, value in ddp["metrics"].items():
        assert math.isclose(pp["metrics"][key], value, rel_tol=1e-5), (key, pp["metrics"][key], value)
