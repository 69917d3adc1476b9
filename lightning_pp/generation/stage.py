"""What one pipeline rank brings to generation: its position and channels, and its model pieces.

:class:`StageContext` is built by the strategy (or defaults to one device),
:class:`StageParts` by the module that owns the model; both the generation loop
(:mod:`lightning_pp.generation.engine`) and the chunk-latency profiler
(:mod:`lightning_pp.generation.profiler`) run a stage from them, so they live
below both. :func:`resolve_input_ids` is the one place a forward's token ids
cross from the host to the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.platform import Platform

__all__ = ["StageContext", "StageParts", "resolve_input_ids"]


@dataclass(frozen=True)
class StageContext:
    """What a pipeline rank needs to take part in generation (built by the strategy).

    Attributes:
        pp_rank: position in the pipeline.
        pp_size: number of stages.
        comm: point-to-point channel (``None`` with one stage).
        device: this rank's device.
        platform: its device facts.
        control_group: a CPU-backend group over the pipeline, for the predictor broadcast.
        first_stage_rank: global rank of pipeline rank 0.
        attn_dp_group: the attention-DP group (the mesh's ``cp`` group with
            ``attention_mode="data"``): the ranks of this stage that run their own
            sequences through layers sharing one MLP. ``None`` (or a group of one):
            no data-parallel attention.
        attn_tp_size: attention tensor-parallel size, for the row-count exchange.
        num_microbatches: the microbatches the strategy was asked for
            (``PPStrategy(num_microbatches=...)``), ``None`` when not set.
    """

    pp_rank: int = 0
    pp_size: int = 1
    comm: Optional[PipeComm] = None
    device: torch.device = torch.device("cpu")
    platform: Optional[Platform] = None
    control_group: Optional[dist.ProcessGroup] = None
    first_stage_rank: int = 0
    attn_dp_group: Optional[ParallelGroup] = None
    attn_tp_size: int = 1
    num_microbatches: Optional[int] = None

    @property
    def attn_dp_size(self) -> int:
        """Ranks of the attention-DP group (1 without data-parallel attention)."""
        return self.attn_dp_group.size if self.attn_dp_group is not None else 1


@dataclass
class StageParts:
    """The model pieces one stage runs: ``embed`` on the first, ``head`` on the last."""

    layers: list[nn.Module]
    embed: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    vocab_size: int = 0


def resolve_input_ids(host_ids: Optional[torch.Tensor], device: torch.device, platform: Platform) -> torch.Tensor:
    """Copies a launching forward's token ids from the host to ``device``.

    The one place ids cross to the device: real launches and the profiler both
    call it, so neither can run on ids a deferred copy has not produced yet.
    """
    if host_ids is None:
        raise RuntimeError("token ids of a launching forward are missing (deferred host-to-device copy not resolved).")
    return platform.to_device(host_ids, device)
