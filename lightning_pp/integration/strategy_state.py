"""The pipeline state that ``PPStrategy`` sets up and its hook mixins read, declared once.

``PPStrategy`` is assembled from mixins, one job each (:mod:`.step_hooks`,
:mod:`.predict_hooks`, :mod:`.checkpoint_hooks`). Each of them reads state that the
strategy creates in ``__init__`` and ``setup``: the layout, the process groups, the
pipelined stages. :class:`PipelineStrategyState` declares all of it, typed, as the
mixins' common base, so a reader (and a type checker) finds in one place what a
mixin may rely on, and which hooks come from Lightning's ``ParallelStrategy``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies.parallel import ParallelStrategy
from torch import Tensor

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.distributed.topology import RankTopology
from lightning_pp.integration.sigterm import SigtermAgreement
from lightning_pp.pipeline.block_stage import BlockPipeline
from lightning_pp.pipeline.schedules import Schedule
from lightning_pp.pipeline.stage import PipelinedSequential
from lightning_pp.tracing.trace import StepTracer

__all__ = ["PipelineStrategyState"]


class PipelineStrategyState(ParallelStrategy):
    """Attributes shared by ``PPStrategy`` and its hook mixins (assigned by ``PPStrategy``).

    Layout (fixed by ``__init__``, sizes and ranks by ``_setup_distributed``):
        schedule_name, virtual_stages: the canonical schedule and stages per rank.
        pp_size, pp_rank, dp_size, dp_rank: pipeline and data-parallel sizes and
            this rank's position on each axis.
        tp_size, cp_size: tensor- and context-parallel sizes of a stage.
        attention_mode: ``"context"`` (cp splits tokens) or ``"data"`` (DP attention).
        topology: the whole (pp, dp, cp, tp) mesh with its groups, once set up.
        check_finite_loss: stop every rank on a non-finite loss.
        _microbatch_weight: what a microbatch's share of the batch is weighed by
            (``None``: its rows); see ``PPStrategy(microbatch_weight=...)``.

    Process groups (``None`` before setup and after teardown):
        _pp_group, _pp_cpu_group: this rank's pipeline (and its CPU twin, if the
            backend is not gloo already).
        _dp_group: this stage's data-parallel replicas.
        _replica_group: every rank of this replica (for the global gradient norm).
        _comm: point-to-point transfers between the pipeline's ranks.

    The split (made in ``setup``):
        _pipelined, _pipelined_attr: this rank's stages, and the module attribute
            that held the ``nn.Sequential`` (or the dotted path of the block list).
        _blocks: for a model pipelined by its block list (its own code loops over
            the blocks), what runs one stage of it; ``_pipelined`` is then ``None``.
        _pipelined_param_ids: ids of the parameters that live in the stages.
        _outside_param_ids: ids of the parameters the module uses outside the
            Sequential: every stage holds a copy, their gradients are summed over the pipeline.
        _tied_parameters: this rank's copies of weights that layers of several stages
            share, each with the group of its holders and whether this rank counts it
            in the global norm; ``_tie_groups`` holds those groups by global ranks.
        _tied_names: the one-device name of this rank's copy of each tied weight
            (``transformer.wte.weight`` for the last stage's ``lm_head.weight``), so its
            optimizer state is saved and found under one name on every holder.
        _cp_partial_ids: parameters whose gradients are summed over cp.
        _counted_in_norm: which gradients this rank counts in the global norm.

    Per-step state:
        _schedules: built schedules by ``(num_microbatches, forward_only)``.
        _pending_grads: gradients a training step stashed for ``backward``.
        _tracer: records a window of steps, when tracing.
        _timeout: the deadline of every wait on a peer.
        _sigterm: the ranks' batch-by-batch agreement on stopping at SIGTERM (world > 1).
        _num_early_publishes: steps whose loss and logs this stage took and logged while
            waiting for a peer inside the schedule, rather than after it.
    """

    schedule_name: str
    virtual_stages: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    tp_size: int
    cp_size: int
    attention_mode: str
    topology: Optional[RankTopology]
    check_finite_loss: bool
    _microbatch_weight: Optional[Callable[[Any], Any]]

    _pp_group: Optional[dist.ProcessGroup]
    _pp_cpu_group: Optional[dist.ProcessGroup]
    _dp_group: Optional[dist.ProcessGroup]
    _replica_group: Optional[dist.ProcessGroup]
    _comm: Optional[PipeComm]
    _sigterm: Optional[SigtermAgreement] = None
    _num_early_publishes: int = 0

    _pipelined: Optional[PipelinedSequential]
    _blocks: Optional[BlockPipeline]
    _pipelined_attr: str
    _pipelined_param_ids: frozenset[int]
    _outside_param_ids: frozenset[int]
    _tied_parameters: list[tuple[Tensor, dist.ProcessGroup, bool]]
    _tie_groups: dict[tuple[int, ...], dist.ProcessGroup]
    _tied_names: dict[int, str]
    _cp_partial_ids: frozenset[int]
    _counted_in_norm: Optional[Callable[[Tensor], bool]]

    _schedules: dict[tuple[int, bool], Schedule]
    _pending_grads: Optional[list[Optional[Tensor]]]
    _tracer: Optional[StepTracer]
    _timeout: Optional[timedelta]
    _requested_microbatches: Optional[int]

    @property
    def module(self) -> pl.LightningModule:
        """The LightningModule; Lightning attaches it before any hook here runs."""
        module = self.lightning_module
        if module is None:
            raise RuntimeError("PPStrategy has no LightningModule attached: Trainer.fit/predict attaches it first.")
        return module

    @property
    def num_microbatches(self) -> int:
        """Microbatches per batch: as requested, else twice the pipeline size."""
        return self._requested_microbatches or 2 * self.pp_size

    if TYPE_CHECKING:
        # Defined by StepsMixin, called by PredictMixin too.
        def _eval_step(self, hook: str, args: tuple, kwargs: dict, combine: str) -> Any: ...

        def _check_same_on_pipeline(self, what: str, value: Any) -> None: ...
