"""Lightning callbacks that need the whole model on every rank, refused before they go wrong.

Under ``PPStrategy`` with more than one pipeline stage, each rank's LightningModule holds
only its stages' layers. Most callbacks do not care (checkpointing, early stopping, LR
monitors). A few hold on to the model as it was before the split, and would crash
mid-training or, worse, train a different model than one device does without saying so:

========================================  =================================================
callback                                  why it cannot work on one stage
========================================  =================================================
``StochasticWeightAveraging``,            copy the module when fit starts, before the model
``WeightAveraging`` (EMA)                 is split, then pair the copy's parameters with
                                          the stage's by position: a shape error at the
                                          first update, or the wrong weights averaged
                                          where shapes happen to agree
``ModelPruning``                          picks its layers from the module before it is
                                          split and keeps them: each rank goes on pruning
                                          and holding every stage's layers, a later
                                          ``validate``/``test`` fails, and its default
                                          global threshold would be one per stage
========================================  =================================================

:func:`check_callbacks` raises a ``MisconfigurationException`` that says what to do
instead, in the launching process before any rank starts and again in each rank's
setup (callbacks from ``configure_callbacks``, or ranks started by ``torchrun``).
"""

from __future__ import annotations

from typing import Iterable, Optional

from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["check_callbacks", "whole_model_callback_problem"]


def whole_model_callback_problem(callback: object) -> Optional[str]:
    """Why ``callback`` cannot work when each rank holds one pipeline stage, and what to do; ``None`` if it can."""
    name = type(callback).__name__
    if isinstance(callback, (StochasticWeightAveraging, WeightAveraging)):
        return (
            f"{name} keeps an averaged copy of the whole model and pairs its parameters with the module's by "
            "position, but under PPStrategy each rank's module holds only its pipeline stage, so the pairs do not "
            "match (a shape error, or averaging the wrong weights where shapes agree). Weight averaging is not "
            f"supported with pipeline stages yet: remove {name}, or train with one stage (pipeline size 1)."
        )
    if isinstance(callback, ModelPruning):
        return (
            f"{name} picks the layers to prune from the whole model when fit starts, before the model is split, and "
            "keeps them: under PPStrategy each rank would go on pruning (and holding) the layers of every stage, a "
            "later trainer.validate or test fails because those layers are not in the rank's module, and "
            "use_global_unstructured=True (its default) would rank each stage's weights against its own threshold. "
            "Pruning callbacks are not supported with pipeline stages yet: prune in your module instead, e.g. "
            "torch.nn.utils.prune.l1_unstructured on each layer in on_train_epoch_end (each rank prunes the layers "
            "it holds, which per layer is what one device does), or prune on one device after training."
        )
    return None


def check_callbacks(callbacks: Iterable[object], *, pp_size: int, fitting: bool) -> None:
    """Raises for the first callback that needs the whole model on every rank, when fitting pipeline stages.

    These callbacks act only during ``fit``; ``validate``, ``test`` and ``predict`` with
    them in the trainer are left alone.

    Raises:
        MisconfigurationException: saying which callback, why, and what to do instead.
    """
    if pp_size <= 1 or not fitting:
        return  # every rank holds the whole model (as under DDP), or the callbacks stay idle
    for callback in callbacks:
        problem = whole_model_callback_problem(callback)
        if problem is not None:
            raise MisconfigurationException(problem)
