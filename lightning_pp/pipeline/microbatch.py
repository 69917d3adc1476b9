"""Cutting a batch into microbatches, and weighing their results back together."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch

from lightning_pp.tree import tree_flatten, tree_leaves, tree_unflatten

__all__ = [
    "MICROBATCH_WEIGHTS",
    "MicrobatchWeight",
    "batch_rows",
    "label_tokens",
    "microbatch_shares",
    "resolve_microbatch_weight",
    "split_microbatches",
]

#: How much a microbatch counts in the batch's loss and logged means: its rows (``None``),
#: a named rule, or a function of the microbatch.
MicrobatchWeight = Union[None, str, Callable[[Any], Any]]

#: The label that Hugging Face (and ``torch.nn.functional.cross_entropy``) leave out of a loss.
IGNORE_INDEX = -100


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


def label_tokens(microbatch: Any) -> int:
    """The tokens a Hugging Face causal LM's loss averages over: labels other than -100, after each row's first.

    The model predicts token ``t + 1`` from the tokens up to ``t``, so a row's first label
    is never a target.

    Raises:
        ValueError: the microbatch is not a mapping with an integer ``"labels"`` tensor of 2 or more dims.
    """
    labels = microbatch.get("labels") if isinstance(microbatch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.is_floating_point():
        found = f"{type(microbatch).__name__} " + (
            f"whose 'labels' is {type(labels).__name__}" if isinstance(microbatch, Mapping) else "(not a mapping)"
        )
        raise ValueError(
            "microbatch_weight='label_tokens' counts the tokens of batch['labels'] (integer token ids, -100 for "
            f"tokens left out of the loss), but the batch is {found}. Pass microbatch_weight=<a function of the "
            "microbatch> that counts what your loss averages over."
        )
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


#: The named rules of ``PPStrategy(microbatch_weight=...)``.
MICROBATCH_WEIGHTS: dict[str, Callable[[Any], int]] = {"label_tokens": label_tokens}


def resolve_microbatch_weight(weight: MicrobatchWeight) -> Optional[Callable[[Any], Any]]:
    """The function behind ``PPStrategy(microbatch_weight=...)``; ``None`` for rows.

    Raises:
        ValueError: an unknown name, or neither a name, a function nor ``None``.
    """
    if weight is None or callable(weight):
        return weight
    if isinstance(weight, str) and weight in MICROBATCH_WEIGHTS:
        return MICROBATCH_WEIGHTS[weight]
    raise ValueError(
        f"microbatch_weight={weight!r}: pass None (each microbatch counts by its rows, right for a per-row mean), "
        f"one of {sorted(MICROBATCH_WEIGHTS)}, or a function of a microbatch that returns how much it counts "
        "(the number of items its loss averages over)."
    )


def microbatch_shares(microbatches: list[Any], weight: Optional[Callable[[Any], Any]] = None) -> list[float]:
    """Each microbatch's share of the batch: of its rows, or of ``weight(microbatch)`` summed over them.

    A mean over the batch's items is then the shares' weighted sum of the microbatches'
    means over their own items. With weights that add up to 0 (nothing to average over
    in the whole batch) the shares fall back to rows.

    Raises:
        ValueError: a weight that is negative, or not a number.
    """
    rows = [batch_rows(mb) for mb in microbatches]
    by_rows = [n / sum(rows) for n in rows]
    if weight is None:
        return by_rows
    weights = []
    for k, mb in enumerate(microbatches):
        value = weight(mb)
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if not value >= 0:
            raise ValueError(
                f"microbatch_weight gave {value} for microbatch {k}; a weight is how many items the microbatch's loss "
                "averages over (a number >= 0)."
            )
        weights.append(value)
    total = sum(weights)
    return [w / total for w in weights] if total else by_rows
