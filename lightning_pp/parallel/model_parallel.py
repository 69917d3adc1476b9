"""What a pipeline stage with tensor- or context-parallel layers needs from its strategy.

A stage built from :mod:`lightning_pp.parallel.layers` (for example
:class:`~lightning_pp.models.TPTransformerBlock`) holds *shards* of some
parameters and *copies* of others. Three things follow, all computed here from
the modules themselves, with no Lightning import:

* **Fused all-reduce workspaces.** Modules that call
  :func:`~lightning_pp.parallel.allreduce_add_rmsnorm` list their groups in
  ``allreduce_fusion_groups()``; :func:`pre_initialize_stage_fusion` creates the
  workspaces once, during setup (creating one runs collectives, so it must happen
  before any graph capture or compilation, and on every rank of the group).
* **Context-parallel gradient sums.** With context parallelism each cp rank's
  attention parameters see only its slice of the tokens; modules name them in
  ``cp_partial_parameters()`` and their gradients are summed over cp
  (:func:`cp_partial_parameter_ids`).
* **Counting each parameter once in a global norm.** A shard lives on the ranks
  of its layer's group; a copy lives on every rank of the stage. The norm of the
  whole model adds each distinct tensor once: :func:`counts_once` keeps a
  parameter on exactly one rank of the set holding identical values.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from lightning_pp.distributed.topology import (
    ParallelGroup,
    RankCoords,
    RankTopology,
    rank_of,
)
from lightning_pp.parallel.flashinfer_fusion import pre_initialize_allreduce_fusion
from lightning_pp.parallel.layers import ColumnParallelLinear, RowParallelLinear

__all__ = ["counts_once", "cp_partial_parameter_ids", "fusion_requests", "pre_initialize_stage_fusion"]


def fusion_requests(module: nn.Module) -> list[tuple[ParallelGroup, int]]:
    """Distinct ``(group, hidden_size)`` pairs the stage's fused all-reduces run over, in module order."""
    seen: set[tuple[tuple[int, ...], str, int]] = set()
    requests: list[tuple[ParallelGroup, int]] = []
    for sub in module.modules():
        lister = getattr(sub, "allreduce_fusion_groups", None)
        if not callable(lister):
            continue
        for group, hidden in lister():
            key = (group.ranks, group.name, int(hidden))
            if group.size > 1 and key not in seen:
                seen.add(key)
                requests.append((group, int(hidden)))
    return requests


def pre_initialize_stage_fusion(module: nn.Module, *, max_num_tokens: int, dtype: torch.dtype) -> dict[str, bool]:
    """Creates the FlashInfer workspaces for every fused all-reduce of ``module`` (or agrees on the fallback).

    Every rank of a stage holds the same layer types, so all members of each
    group make the same calls in the same order.

    Returns:
        ``{"<group name> <ranks> h=<hidden>": kernel_enabled}`` for each request.
    """
    enabled: dict[str, bool] = {}
    for group, hidden in fusion_requests(module):
        result = pre_initialize_allreduce_fusion(
            [group], max_num_tokens=max_num_tokens, hidden_size=hidden, dtype=dtype
        )
        enabled[f"{group.name} {list(group.ranks)} h={hidden}"] = result[group.name]
    return enabled


def cp_partial_parameter_ids(module: nn.Module) -> frozenset[int]:
    """Ids of the parameters whose gradients must still be summed over the cp group."""
    ids: set[int] = set()
    for sub in module.modules():
        lister = getattr(sub, "cp_partial_parameters", None)
        if callable(lister):
            params = dict(sub.named_parameters())
            ids.update(id(params[name]) for name in lister())
    return frozenset(ids)


def _shard_groups(module: nn.Module) -> dict[int, ParallelGroup]:
    """Parameter id -> the group its tensor is split over, for tensor-parallel linears."""
    groups: dict[int, ParallelGroup] = {}
    for sub in module.modules():
        if isinstance(sub, (ColumnParallelLinear, RowParallelLinear)) and isinstance(sub.group, ParallelGroup):
            for p in sub.parameters(recurse=False):
                groups[id(p)] = sub.group
    return groups


def counts_once(
    module: nn.Module,
    topology: RankTopology,
    *,
    replicated_over_pipeline: Callable[[torch.Tensor], bool],
    counted_elsewhere: Callable[[torch.Tensor], bool] = lambda p: False,
) -> Callable[[torch.Tensor], bool]:
    """A predicate: does this rank's copy of a parameter enter the norm of the whole model?

    Within one pipeline stage of one replica (its ``cp x tp`` ranks), a shard over
    group ``G`` has identical twins on the other cosets of ``G``; only the coset
    holding the stage's first rank counts it. Everything else is a copy on every
    rank of the stage and counts on the first rank only. Parameters every stage
    holds (``replicated_over_pipeline``) count on the first stage only; copies that
    another stage counts (``counted_elsewhere``: a weight tied across stages) not here.
    """
    shape, me = topology.shape, topology.coords
    stage_first = rank_of(RankCoords(pp=me.pp, dp=me.dp, cp=0, tp=0), shape)
    first_in_stage = me.cp == 0 and me.tp == 0
    shard_groups = _shard_groups(module)

    def counted(p: torch.Tensor) -> bool:
        if (replicated_over_pipeline(p) and me.pp != 0) or counted_elsewhere(p):
            return False
        group: Optional[ParallelGroup] = shard_groups.get(id(p))
        if group is None or group.size == 1:
            return first_in_stage
        return min(group.ranks) == stage_first

    return counted
