"""Differentiable collectives for tensor- and context-parallel layers.

Gradients follow Megatron-LM's convention: a tensor that every rank of a group
holds identically is one logical value, and so is its gradient. Each forward
collective therefore has a matching backward:

=====================  ===========================  ====================================
function               forward                      backward
=====================  ===========================  ====================================
``all_reduce_sum``     sum over the group           identity (the sum is replicated)
``copy_to_group``      identity                     sum over the group (partial grads)
``gather_tokens``      concatenate every rank's     ``"slice"``: keep own rows, or
                       rows (uneven counts)         ``"sum"``: sum over group, then slice
``scatter_tokens``     keep own rows                gather every rank's rows
=====================  ===========================  ====================================

``gather_tokens`` needs to know what consumes its result: a consumer whose output
is again replicated (the MLP, whose partial sums are all-reduced) sends back equal
gradients, so each rank just keeps its own rows; a consumer whose output stays
per-rank (context-parallel attention reading all keys for its own queries) sends
back partial gradients, which must be summed first.

Every function takes a :class:`~lightning_pp.distributed.topology.ParallelGroup` (or a plain
``ProcessGroup``); a group of one issues no collective at all.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

from lightning_pp.distributed.topology import ParallelGroup

__all__ = [
    "GroupLike",
    "all_reduce_sum",
    "copy_to_group",
    "device_group_of",
    "gather_tokens",
    "group_rank",
    "group_size",
    "scatter_tokens",
    "split_token_counts",
    "token_offsets",
]

GroupLike = Union[ParallelGroup, "dist.ProcessGroup", None]


def device_group_of(group: GroupLike) -> Optional[Any]:
    """The ``ProcessGroup`` that carries tensors for ``group`` (``None`` = default group)."""
    if isinstance(group, ParallelGroup):
        if group.device_group is None and group.size > 1:
            # Passing None on would silently reduce over the whole world.
            raise ValueError(
                f"group {group.name!r} {group.ranks} has no device group: build it with "
                "lightning_pp.distributed.topology.build_topology, or pass device_group= explicitly."
            )
        return group.device_group
    return group


def group_size(group: GroupLike) -> int:
    """Members of ``group``; 1 for ``None`` when ``torch.distributed`` is not initialised."""
    if isinstance(group, ParallelGroup):
        return group.size
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: GroupLike) -> int:
    """This process's rank within ``group`` (0 for a group of one)."""
    if isinstance(group, ParallelGroup):
        return group.rank
    if group_size(group) == 1:
        return 0
    return dist.get_rank(group)


def split_token_counts(num_tokens: int, num_ranks: int) -> list[int]:
    """Row counts of ``num_tokens`` rows split into contiguous, balanced slices.

    The first ``num_tokens % num_ranks`` ranks get one extra row; a rank may get
    none when there are fewer rows than ranks.
    """
    if num_tokens < 0 or num_ranks < 1:
        raise ValueError(f"cannot split {num_tokens} rows over {num_ranks} ranks.")
    base, extra = divmod(num_tokens, num_ranks)
    return [base + (1 if r < extra else 0) for r in range(num_ranks)]


def token_offsets(counts: Sequence[int]) -> list[int]:
    """Start row of each rank's slice when slices of ``counts`` rows are concatenated."""
    offsets, total = [], 0
    for count in counts:
        offsets.append(total)
        total += int(count)
    return offsets


def _all_reduce(tensor: torch.Tensor, group: GroupLike) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=device_group_of(group))
    return tensor


def _all_gather_rows(x: torch.Tensor, group: GroupLike, counts: Sequence[int]) -> torch.Tensor:
    """Concatenates every rank's rows along dim 0; ranks may hold different counts.

    Collectives want equal sizes, so each rank pads to the largest count, and the
    padding is cut off afterwards. All ranks know ``counts``, so they agree on the
    padded size without another collective.
    """
    width = max(counts)
    if width == 0:
        return x.new_empty((0,) + tuple(x.shape[1:]))
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded.contiguous(), group=device_group_of(group))
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)], dim=0)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: GroupLike) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: GroupLike) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad.contiguous().clone(), ctx.group), None


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: GroupLike, counts: tuple, grad_mode: str) -> torch.Tensor:
        ctx.group, ctx.counts, ctx.grad_mode = group, counts, grad_mode
        return _all_gather_rows(x, group, counts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None]:
        grad = grad.contiguous()
        if ctx.grad_mode == "sum":
            grad = _all_reduce(grad.clone(), ctx.group)
        rank = group_rank(ctx.group)
        start = token_offsets(ctx.counts)[rank]
        return grad[start:start + ctx.counts[rank]], None, None, None


class _ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: GroupLike, counts: tuple) -> torch.Tensor:
        ctx.group, ctx.counts = group, counts
        rank = group_rank(group)
        start = token_offsets(counts)[rank]
        return x[start:start + counts[rank]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather_rows(grad.contiguous(), ctx.group, ctx.counts), None, None


def all_reduce_sum(x: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """Sum of ``x`` over ``group`` (out of place); gradient passes through unchanged."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def copy_to_group(x: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """``x`` unchanged; its gradient is summed over ``group``.

    Put in front of a column-parallel layer whose input is replicated: each rank's
    weight shard yields a partial input gradient.
    """
    if group_size(group) == 1 or not torch.is_grad_enabled():
        return x
    return _CopyToGroup.apply(x, group)


def _check_counts(x: torch.Tensor, group: GroupLike, counts: Sequence[int]) -> tuple[int, ...]:
    counts = tuple(int(c) for c in counts)
    if len(counts) != group_size(group):
        raise ValueError(f"counts has {len(counts)} entries but the group has {group_size(group)} ranks.")
    return counts


def gather_tokens(x: torch.Tensor, group: GroupLike, counts: Sequence[int], *, grad: str = "slice") -> torch.Tensor:
    """Concatenates each rank's rows (dim 0) in group-rank order.

    Args:
        x: this rank's rows; ``x.shape[0]`` must equal ``counts[group rank]``.
        group: the group to gather over.
        counts: every rank's row count, in group-rank order, known to all ranks.
        grad: ``"slice"`` when the consumer's output is replicated over the group,
            ``"sum"`` when it stays per-rank (see the module docstring).
    """
    counts = _check_counts(x, group, counts)
    if grad not in ("slice", "sum"):
        raise ValueError(f"grad must be 'slice' or 'sum', got {grad!r}.")
    if x.shape[0] != counts[group_rank(group)]:
        raise ValueError(
            f"this rank holds {x.shape[0]} rows but counts says {counts[group_rank(group)]}: "
            "pass every rank's row count, in group-rank order."
        )
    if len(counts) == 1:
        return x
    return _GatherTokens.apply(x, group, counts, grad)


def scatter_tokens(x: torch.Tensor, group: GroupLike, counts: Sequence[int]) -> torch.Tensor:
    """This rank's rows of ``x`` (the inverse of :func:`gather_tokens`)."""
    counts = _check_counts(x, group, counts)
    if x.shape[0] != sum(counts):
        raise ValueError(f"x has {x.shape[0]} rows but counts add up to {sum(counts)}.")
    if len(counts) == 1:
        return x
    return _ScatterTokens.apply(x, group, counts)
