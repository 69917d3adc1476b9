"""Putting per-microbatch step results back together as one step's result.

A step that returns (or logs) a per-row mean over its batch -- a loss, an accuracy
-- is reproduced exactly by weighting each microbatch's value by its share of the
batch's rows. Predictions are joined row by row instead, in microbatch order.

What a row of a prediction is -- one rule for every place that cuts a prediction
into rows or joins rows back (the microbatches of one batch, :func:`concat_outputs`;
the batches of data-parallel replicas, :func:`split_rows` and :func:`join_rows`):

* a tensor with at least one dim holds its rows along dim 0;
* a ``list`` as long as the row count holds one value per row (token-id lists,
  strings, per-row tensors of any shape), unless every entry is itself a tensor
  with the rows in dim 0 (``[logits, probs]``): that is a group of outputs. When
  microbatches are joined, a list reads the same in all of them: per-row when it
  is as long as each microbatch's rows and not such a group in every microbatch;
* tuples (named tuples too), dicts, and lists of any other length are structure:
  each entry holds rows by these same rules;
* anything else (numbers, strings, ``None``, 0-d tensors) is a value of the whole batch.

Return a tuple, not a list, to group a fixed number of outputs: a list of ``k``
non-tensor values from a batch (or microbatch) of ``k`` rows reads as per-row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from lightning_pp.tree import TreeSpec, leaf_paths, tree_flatten, tree_map, tree_unflatten

__all__ = [
    "LogRecorder",
    "OutputRows",
    "concat_outputs",
    "extract_loss",
    "is_row_list",
    "join_rows",
    "split_rows",
    "weighted_mean",
]


def weighted_mean(values: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum(w * v)`` at every leaf: tensors (kept in their dtype and device) and numbers, nested in dicts or sequences.

    Values that cannot be averaged (strings, integer tensors, ...) are taken from the
    last microbatch, as Lightning itself keeps the last value logged in a step. A value
    of weight 0 is left out, not multiplied by 0: a mean over nothing (a microbatch with
    no token to average over) is NaN, and must not make the batch's NaN.
    """

    def mean(first: Any, *rest: Any) -> Any:
        leaves = (first, *rest)
        if isinstance(first, torch.Tensor) and (first.is_floating_point() or first.is_complex()):
            wide = torch.complex128 if first.is_complex() else torch.float64
            terms = (v.detach().to(wide) * w for v, w in zip(leaves, weights) if w)
            total = sum(terms, torch.zeros_like(first, dtype=wide))
            return total.to(first.dtype)
        if isinstance(first, (float, int)) and not isinstance(first, bool):
            return float(sum(float(v) * w for v, w in zip(leaves, weights) if w))
        return leaves[-1]

    return tree_map(mean, values[0], *values[1:])


def _groups_rows(node: list, num_rows: int) -> bool:
    """Every entry is a tensor with ``num_rows`` rows in dim 0: ``[logits, probs]``, a group of outputs."""
    return bool(node) and all(
        isinstance(entry, torch.Tensor) and entry.dim() > 0 and entry.shape[0] == num_rows for entry in node
    )


def _per_row(lists: Sequence[list], num_rows: Sequence[int]) -> bool:
    """Whether the lists at one place of several parts' outputs hold one value per row (module docstring).

    Per-row when each is as long as its part's rows, unless every one of them groups
    per-row tensors; a part where the reading is ambiguous (say one row, and one
    tensor of one row) follows the parts where it is not.
    """
    if any(len(node) != n for node, n in zip(lists, num_rows)):
        return False
    return not all(_groups_rows(node, n) for node, n in zip(lists, num_rows))


def is_row_list(node: Any, num_rows: int) -> bool:
    """Whether ``node``, in an output of ``num_rows`` rows, is a list with one value per row (module docstring)."""
    return isinstance(node, list) and _per_row([node], [num_rows])


def _is_list(node: Any) -> bool:
    return isinstance(node, list)


def _row_lists(outputs: Sequence[Any], num_rows: Sequence[int]) -> set[int]:
    """The ids of the per-row lists in ``outputs`` (parts of one or more batches), each place read alike in all."""
    # Lists are kept whole, so each one is read in every part at once.
    flat = [tree_flatten(output, is_leaf=_is_list) for output in outputs]
    if any(spec != flat[0][0] for spec, _ in flat):
        return set()  # the join reports the different structures
    found: set[int] = set()
    for j in range(len(flat[0][1])):
        values = [leaves[j] for _, leaves in flat]
        if not all(isinstance(v, list) for v in values):
            continue
        if _per_row(values, num_rows):
            found.update(id(v) for v in values)
        elif len({len(v) for v in values}) == 1:  # a group (or other structure): read each entry
            for entries in zip(*values):
                found |= _row_lists(entries, num_rows)
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays, whose == is element-wise: not one truth value
        return False


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


@dataclass(frozen=True)
class OutputRows:
    """One part's output (a microbatch's, a batch's) read by rows: :func:`split_rows` makes it, :func:`join_rows` joins.

    Attributes:
        spec: the output's structure, per-row lists counted as leaves.
        paths: each leaf's path in the output, for error messages.
        whole: for each leaf, whether it is a value of the whole part, not per row.
        leaves: the output's leaves.
        num_rows: the part's row count.
    """

    spec: TreeSpec
    paths: list[str]
    whole: tuple[bool, ...]
    leaves: list[Any]
    num_rows: int

    def take(self, start: int, stop: int) -> "OutputRows":
        """Rows ``start`` to ``stop`` (exclusive) alone; whole-part values are kept.

        Raises:
            ValueError: a tensor's dim 0 is not the part's row count (so its rows are unknown).
        """
        leaves = []
        for leaf, path, whole in zip(self.leaves, self.paths, self.whole):
            if isinstance(leaf, torch.Tensor) and not whole and leaf.shape[0] != self.num_rows:
                raise ValueError(
                    f"predict_step's output{path} is {_describe(leaf)} for a batch of {self.num_rows} rows, so "
                    f"PPStrategy cannot cut it into rows to regroup the data-parallel replicas' rows into the batches "
                    f"one device makes. {_PER_ROW_ONLY}"
                )
            leaves.append(leaf if whole else leaf[start:stop])
        return OutputRows(self.spec, self.paths, self.whole, leaves, stop - start)


_PER_ROW_ONLY = (
    "Return per-row values only (tensors with the rows in dim 0, lists with one entry per row, inside tuples/dicts), "
    "or write each replica's predictions with a BasePredictionWriter and call "
    "trainer.predict(..., return_predictions=False)."
)
_FEWER_PARTS = (
    "The pipeline runs predict_step on parts of a batch, so it cannot give what one device computes for the whole "
    "batch: return it per row (a tensor with the rows in dim 0, or a list with one entry per row), or use "
    "PPStrategy(num_microbatches=1)."
)


def split_rows(outputs: Sequence[Any], num_rows: Sequence[int]) -> list[OutputRows]:
    """Reads each of ``outputs`` (parts with ``num_rows`` rows each) by rows, every list read alike in all of them."""
    row_lists = _row_lists(outputs, num_rows)

    def is_leaf(node: Any) -> bool:
        return isinstance(node, list) and id(node) in row_lists

    parts = []
    for output, n in zip(outputs, num_rows):
        spec, leaves = tree_flatten(output, is_leaf=is_leaf)
        whole = tuple(not (is_leaf(leaf) or (isinstance(leaf, torch.Tensor) and leaf.dim() > 0)) for leaf in leaves)
        parts.append(OutputRows(spec, leaf_paths(output, is_leaf=is_leaf), whole, leaves, n))
    return parts


#: What to do when a whole-batch value is a model's key/value cache (a Hugging Face model's output with use_cache on).
_CACHE_HINT = (
    "It is the model's key/value cache (a Hugging Face model returns one when use_cache is on), and under PPStrategy "
    "each stage fills it for its own layers only, so no rank holds the one-device cache. Call the model with "
    "use_cache=False, or return only what you need from its output (e.g. out.logits)."
)


def _join(parts: Sequence[OutputRows], of: str, whole_hint: str) -> Any:
    first = parts[0]
    for part in parts[1:]:
        if (part.spec, part.whole) != (first.spec, first.whole):
            raise ValueError(
                f"predict_step's outputs for the {of} differ in structure (leaves {first.paths} vs {part.paths}). "
                "Return the same tuple/dict structure for every batch, with the same kind of value at each place: "
                "per-row values (a tensor with the rows in dim 0, a list with one entry per row) or whole-batch ones."
            )
    joined = []
    for j, path in enumerate(first.paths):
        values = [part.leaves[j] for part in parts]
        if first.whole[j]:
            different = next((v for v in values[1:] if not _same(values[0], v)), None)
            if different is not None:
                hint = _CACHE_HINT if type(values[0]).__name__.endswith("Cache") else whole_hint
                raise ValueError(
                    f"predict_step's output{path} is a value of the whole batch, not one per row, and it differs "
                    f"between the {of} ({_describe(values[0])} vs {_describe(different)}). {hint}"
                )
            joined.append(values[0])
        elif all(isinstance(v, list) for v in values):
            joined.append([entry for v in values for entry in v])
        else:
            try:
                joined.append(torch.cat(values, dim=0))
            except RuntimeError as error:
                raise ValueError(
                    f"predict_step's output{path} has shapes {[tuple(v.shape) for v in values]} in the {of}, which "
                    f"do not concatenate in dim 0 ({error}). Return tensors whose dims after the first match across "
                    "batches (pad them), or a list with one entry per row (e.g. a list of per-row tensors)."
                ) from error
    return tree_unflatten(first.spec, joined)


def concat_outputs(outputs: Sequence[Any], num_rows: Sequence[int]) -> Any:
    """Joins the outputs of a batch's microbatches into the output one device computes for the whole batch.

    Rows (see the module docstring) are joined in microbatch order: tensors are
    concatenated along dim 0 and per-row lists chained, through tuples, dicts and
    grouping lists. A value of the whole batch is kept when every microbatch
    returned the same one.

    Args:
        outputs: each microbatch's output, in order.
        num_rows: each microbatch's row count.

    Raises:
        ValueError: the outputs differ in structure, or return different values of
            the whole batch; the message says what output works.
    """
    if len(outputs) == 1:
        return outputs[0]
    if all(isinstance(output, torch.Tensor) and output.dim() > 0 for output in outputs):
        try:  # the usual output, one tensor of rows: what the general path computes, without walking trees
            return torch.cat(list(outputs), dim=0)
        except RuntimeError:
            pass  # the general path below says why they do not join
    return _join(split_rows(outputs, num_rows), "microbatches of one batch", _FEWER_PARTS)


def join_rows(parts: Sequence[OutputRows]) -> Any:
    """One batch's output made of ``parts`` (rows of other batches' outputs, from :meth:`OutputRows.take`), in order.

    A value of the whole batch is kept when every part has the same one.

    Raises:
        ValueError: the parts' outputs differ in structure, a whole-batch value
            differs between them, or their tensors differ in dims past the first.
    """
    return _join(parts, "batches that a one-device batch takes rows from", _PER_ROW_ONLY)


def extract_loss(step_output: Any) -> torch.Tensor:
    """The loss a training step returned: the tensor itself, or its ``"loss"`` entry."""
    loss = step_output.get("loss") if isinstance(step_output, Mapping) else step_output
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "Under PPStrategy, training_step must return the loss tensor, or a dict with a 'loss' tensor "
            f"(got {type(step_output).__name__}). Returning None to skip a step is not supported in pipelines."
        )
    return loss


class LogRecorder:
    """Records ``self.log``/``self.log_dict`` calls made during microbatch steps.

    While installed, the module's ``log`` and ``log_dict`` write here instead of to
    Lightning; :meth:`combined` then gives one value per name for the whole batch.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, tuple[Any, dict[str, Any]]]] = []

    def start_microbatch(self) -> None:
        self.records.append({})

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.records[-1][name] = (value, kwargs)

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    def combined(self, weights: Sequence[float]) -> dict[str, tuple[Any, dict[str, Any]]]:
        """Each logged name's value for the whole batch, from the microbatches that logged it.

        Combined as the log call asks Lightning to combine steps (``reduce_fx``): a mean
        (the default) weighted by the microbatches' shares of the batch (of its rows, or
        of ``PPStrategy(microbatch_weight=...)``), a sum summed, a max or
        min taken over them. For a per-row mean, a count or total, a largest or smallest
        value, that is exactly the value of the whole batch.
        """
        names = dict.fromkeys(name for record in self.records for name in record)
        result = {}
        for name in names:
            pairs = [(record[name], w) for record, w in zip(self.records, weights) if name in record]
            values = [value for (value, _), _ in pairs]
            kwargs = pairs[-1][0][1]
            reduction = _reduction(kwargs.get("reduce_fx", "mean"))
            if reduction == "mean":
                total = sum(w for _, w in pairs)
                # Only microbatches of weight 0 logged it: their plain mean.
                shares = [w / total for _, w in pairs] if total else [1 / len(pairs)] * len(pairs)
                value = weighted_mean(values, shares)
            else:
                value = _reduce(values, reduction)
            result[name] = (value, kwargs)
        return result


def _reduction(reduce_fx: Any) -> str:
    """``"mean"``, ``"sum"``, ``"max"`` or ``"min"``: what a ``self.log(..., reduce_fx=...)`` names.

    Anything else is left to Lightning to refuse (it takes only these); here it is a mean.
    """
    if isinstance(reduce_fx, str):
        return {"sum": "sum", "max": "max", "min": "min"}.get(reduce_fx.lower(), "mean")
    known = {torch.sum: "sum", sum: "sum", torch.max: "max", max: "max", torch.min: "min", min: "min"}
    return next((reduction for fn, reduction in known.items() if reduce_fx is fn), "mean")


def _reduce(values: Sequence[Any], reduction: str) -> Any:
    """The microbatches' values summed, or their largest or smallest, at every leaf.

    Tensors keep their dtype and device (integer counts stay integers); values that
    are neither tensors nor numbers are taken from the last microbatch.
    """

    def reduce(first: Any, *rest: Any) -> Any:
        leaves = (first, *rest)
        if isinstance(first, torch.Tensor):
            stacked = torch.stack([v.detach() for v in leaves])
            if reduction == "sum":  # floats summed in double, as the weighted mean is
                return (stacked.double() if stacked.is_floating_point() else stacked).sum(0).to(first.dtype)
            return stacked.amax(0) if reduction == "max" else stacked.amin(0)
        if isinstance(first, (float, int)) and not isinstance(first, bool):
            return sum(leaves) if reduction == "sum" else max(leaves) if reduction == "max" else min(leaves)
        return leaves[-1]

    return tree_map(reduce, values[0], *values[1:])
