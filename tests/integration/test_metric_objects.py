"""A torchmetrics object logged as itself is refused with the fix; its returned value logs (pure logic)."""

from __future__ import annotations

import types

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_pp.integration.step_hooks import StepsMixin


class _Module:
    def __init__(self, step) -> None:
        self.step = step

    def training_step(self, batch, batch_idx=0):
        return self.step(self, batch)


def _run(step, batches):
    """Runs ``step`` on each microbatch the way PPStrategy's step hooks do; returns the recorder."""
    host = types.SimpleNamespace(module=_Module(step), _pipelined=None)
    with StepsMixin._microbatch_steps(host, "training_step", batches, (), {}) as (step_fn, recorder):
        for k in range(len(batches)):
            step_fn(k, None)
    assert "log" not in vars(host.module), "the module's own log is back after the step"
    return recorder


def test_a_metric_object_is_refused_with_what_to_log_instead():
    torchmetrics = pytest.importorskip("torchmetrics")
    accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
    batches = [(torch.randn(4, 3), torch.randint(0, 3, (4,))) for _ in range(2)]

    def logs_the_object(self, batch):
        accuracy(*batch)
        self.log("acc", accuracy)

    def logs_a_collection(self, batch):
        self.log_dict({"loss": batch[0].mean(), "acc": accuracy})

    for step in (logs_the_object, logs_a_collection):
        with pytest.raises(
            MisconfigurationException,
            match=r"cannot log the torchmetrics object .* as 'acc'.*"
            r"self\.log\('acc', self\.metric\(preds, target\)\)",
        ):
            _run(step, batches)

    def logs_the_value(self, batch):
        self.log("acc", accuracy(*batch))

    recorder = _run(logs_the_value, batches)
    assert [list(record) for record in recorder.records] == [["acc"], ["acc"]]
