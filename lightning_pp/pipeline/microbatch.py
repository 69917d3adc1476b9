"""Cutting a batch into microbatches, and weighing their results back together."""

from __future__ import annotations

from typing import Any

import torch

from lightning_pp.tree import tree_flatten, tree_leaves, tree_unflatten

__all__ = ["batch_rows", "split_microbatches"]


def batch_rows(batch: Any) -> int:
    """The batch size: the length of dim 0, which every tensor in the batch must share.

    Raises:
        ValueError: the batch holds no tensor, or tensors disagree on dim 0.
    """
    leaves = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves:
        raise ValueError(
            "A pipelined batch must contain at least one tensor with a batch dimension (dim 0) to split into "
            f"microbatches; got {type(batch).__name__}."
        )
    sizes = {t.shape[0] for t in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"Every tensor in a pipelined batch must have the same size in dim 0 (the batch dimension); got sizes "
            f"{sorted(sizes)}. Put per-batch values that are not per-row into a non-tensor field."
        )
    return sizes.pop()


def split_microbatches(batch: Any, num_microbatches: int) -> list[Any]:
    """Splits every tensor of ``batch`` along dim 0 into ``num_microbatches`` parts.

    Sizes differ by at most one row, larger parts first (``torch.tensor_split``), so
    a batch of 6 in 4 microbatches is 2, 2, 1, 1 rows: all six rows, each once.
    Non-tensor values and 0-d tensors are given whole to every microbatch.

    Raises:
        ValueError: ``num_microbatches`` is not between 1 and the number of rows.
    """
    rows = batch_rows(batch)
    if not 1 <= num_microbatches <= rows:
        raise ValueError(f"Cannot split a batch of {rows} rows into {num_microbatches} microbatches.")

    def split(leaf: Any) -> list[Any]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return list(torch.tensor_split(leaf, num_microbatches))
        return [leaf] * num_microbatches

    spec, leaves = tree_flatten(batch)
    parts = [split(leaf) for leaf in leaves]
    return [tree_unflatten(spec, [p[k] for p in parts]) for k in range(num_microbatches)]
