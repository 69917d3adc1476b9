"""Callbacks that hold on to the model as it was before the split are refused under pipeline stages.

What each one does without the check, seen with 2 stages (``devices=2``):
``StochasticWeightAveraging`` and ``WeightAveraging`` ended the run at their first update
with "output with shape [16] doesn't match the broadcast shape [32, 16]" on one rank and a
lost connection on the other; ``ModelPruning``'s default global threshold trained a model
whose weights differed from one device's, and a ``trainer.validate`` after ``fit`` failed
with "Some provided `parameters_to_prune` don't exist in the model". The launched job that
refuses a callback coming from ``configure_callbacks`` is in ``test_bad_input.py``.
"""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_pp import PPStrategy
from lightning_pp.integration.callback_checks import check_callbacks, whole_model_callback_problem

from lit_models import LitLM

REFUSED = {
    "swa": (lambda: StochasticWeightAveraging(swa_lrs=0.05), "StochasticWeightAveraging keeps an averaged copy"),
    "ema": (lambda: WeightAveraging(), "WeightAveraging keeps an averaged copy"),
    "pruning-global": (lambda: ModelPruning("l1_unstructured", amount=0.3), "prune in your module instead"),
    "pruning-local": (
        lambda: ModelPruning("l1_unstructured", amount=0.3, use_global_unstructured=False),
        "a later trainer.validate or test fails",
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_whole_model_callback_is_refused_when_fitting_pipeline_stages(name):
    make, message = REFUSED[name]
    with pytest.raises(MisconfigurationException, match=message):
        check_callbacks([ModelCheckpoint(), make()], pp_size=2, fitting=True)


@pytest.mark.parametrize("name", REFUSED)
def test_the_same_callback_is_left_alone_with_one_stage_or_outside_fit(name):
    make, _ = REFUSED[name]
    check_callbacks([make()], pp_size=1, fitting=True)  # every rank holds the whole model, as under DDP
    check_callbacks([make()], pp_size=2, fitting=False)  # these callbacks act only during fit


def test_everyday_callbacks_pass():
    for callback in (ModelCheckpoint(), EarlyStopping(monitor="val_loss"), LearningRateMonitor()):
        assert whole_model_callback_problem(callback) is None


def _fitting_trainer(callbacks: list) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=PPStrategy(), callbacks=callbacks, logger=False,
        enable_progress_bar=False,
    )
    trainer.state.fn = TrainerFn.FITTING
    return trainer


def test_the_launcher_check_sees_the_trainers_callbacks():
    # What PipelineLauncher calls in the launching process before any other rank starts.
    trainer = _fitting_trainer([WeightAveraging()])
    with pytest.raises(MisconfigurationException, match="WeightAveraging keeps an averaged copy"):
        trainer.strategy._check_before_launch(trainer, (LitLM(),))
    trainer.state.fn = TrainerFn.PREDICTING
    trainer.strategy._check_before_launch(trainer, (LitLM(),))  # predict with the callback still configured
    everyday = _fitting_trainer([ModelCheckpoint(), EarlyStopping(monitor="val_loss")])
    everyday.strategy._check_before_launch(everyday, (LitLM(),))
