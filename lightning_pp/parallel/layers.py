"""Tensor-parallel building blocks: column- and row-parallel linears, RMSNorm.

A column-parallel linear splits the *output* features over a group; each rank
holds ``out_features / size`` rows of the weight and produces that slice of the
output from the full input. A row-parallel linear splits the *input* features;
each rank multiplies its input slice by its weight columns and produces a partial
sum of the full output::

    x ──► ColumnParallel (W[rows of rank r]) ──► y_r ──► RowParallel (W[cols of rank r]) ──► partial_r
                                                                          sum over ranks ──► output

Pairing them needs one collective per pair. The row-parallel layer can do it
(``reduce_output=True``) or leave the partial sum to the caller, which then fuses
the all-reduce with what follows (``allreduce_add_rmsnorm``).

Each layer loads its shard from a full (unsharded) weight with
``load_full_weight_``, so tests and checkpoint converters can start from one
reference model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_pp.distributed.collectives import (
    GroupLike,
    all_reduce_sum,
    copy_to_group,
    group_rank,
    group_size,
)
from lightning_pp.parallel.fused_allreduce import rmsnorm_fp32

__all__ = ["ColumnParallelLinear", "RMSNorm", "RowParallelLinear", "shard_range"]


def shard_range(total: int, num_shards: int, shard: int) -> tuple[int, int]:
    """``[start, stop)`` of shard ``shard`` when ``total`` items split evenly into ``num_shards``."""
    if total % num_shards:
        raise ValueError(
            f"{total} features do not split evenly over {num_shards} ranks: choose a tensor-parallel size "
            f"that divides {total}."
        )
    width = total // num_shards
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside {num_shards} shards.")
    return shard * width, (shard + 1) * width


class ColumnParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with the output features split over ``group``.

    Input: the full ``[..., in_features]``, equal on all ranks. Output: this rank's
    ``[..., out_features / size]`` slice.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: GroupLike,
        *,
        bias: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.in_features = in_features
        self.out_features = out_features
        start, stop = shard_range(out_features, group_size(group), group_rank(group))
        self.shard = (start, stop)
        self.weight = nn.Parameter(torch.empty(stop - start, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(stop - start, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=in_features**-0.5)

    @torch.no_grad()
    def load_full_weight_(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Copies this rank's rows of a full ``[out_features, in_features]`` weight."""
        start, stop = self.shard
        self.weight.copy_(weight[start:stop])
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias[start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every rank's weight slice contributes to the input gradient: sum them.
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with the input features split over ``group``.

    Input: this rank's ``[..., in_features / size]`` slice (a column-parallel
    output). Output: the full ``[..., out_features]``, summed over ranks when
    ``reduce_output`` is true, else this rank's partial sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: GroupLike,
        *,
        reduce_output: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.in_features = in_features
        self.out_features = out_features
        self.reduce_output = reduce_output
        start, stop = shard_range(in_features, group_size(group), group_rank(group))
        self.shard = (start, stop)
        self.weight = nn.Parameter(torch.empty(out_features, stop - start, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=in_features**-0.5)

    @torch.no_grad()
    def load_full_weight_(self, weight: torch.Tensor) -> None:
        """Copies this rank's columns of a full ``[out_features, in_features]`` weight."""
        start, stop = self.shard
        self.weight.copy_(weight[:, start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        return all_reduce_sum(partial, self.group) if self.reduce_output else partial


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, statistics in fp32."""

    def __init__(
        self,
        hidden_size: int,
        *,
        eps: float = 1e-6,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_fp32(x.float(), self.weight, self.eps).to(x.dtype)
