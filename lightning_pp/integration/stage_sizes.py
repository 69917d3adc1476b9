"""How many parameters each pipeline stage holds, said once where Lightning's model summary is printed.

Lightning's ``ModelSummary`` runs on global rank 0 and counts the parameters of that
rank's module: under ``PPStrategy`` its pipeline stage (and the copies every stage holds
of parameters outside the pipelined layers), not the model. :func:`stage_sizes_message`
turns every rank's count into one line that gives the model's size and each stage's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn

from lightning_pp.distributed.topology import MeshShape, RankCoords, rank_of

__all__ = ["counted_parameters", "prints_model_summary", "stage_sizes_message"]


def prints_model_summary(callbacks: Sequence[object]) -> bool:
    """Whether the trainer will print a model summary (its ``ModelSummary`` callback, rich or not)."""
    return any(isinstance(callback, ModelSummary) for callback in callbacks)


def counted_parameters(module: nn.Module, counted: Callable[[torch.Tensor], bool]) -> int:
    """Elements of this rank's parameters that count towards the model's size (each tensor on one rank only)."""
    return sum(p.numel() for p in module.parameters() if counted(p))


def stage_sizes_message(counts: Sequence[int], shape: MeshShape, *, shared_outside: bool = False) -> str:
    """One line for the log: the model's parameters in all and by pipeline stage (the first replica's ranks).

    ``shared_outside``: whether the module has parameters outside the pipelined layers
    (which every stage holds a copy of); the line then says where they are counted.
    """

    def stage_size(stage: int) -> int:
        coords = [RankCoords(pp=stage, dp=0, cp=cp, tp=tp) for cp in range(shape.cp) for tp in range(shape.tp)]
        return sum(counts[rank_of(c, shape)] for c in coords)

    by_stage = [stage_size(stage) for stage in range(shape.pp)]
    sizes = " | ".join(get_human_readable_count(n).strip() for n in by_stage)
    where = ""
    if shared_outside:
        where = " (those outside the pipelined layers, which every stage holds, count with stage 0)"
    return (
        f"PPStrategy: the model has {get_human_readable_count(sum(by_stage)).strip()} parameters; by pipeline stage "
        f"{sizes}{where}. The model summary counts global rank 0's share only."
    )
