"""Putting per-microbatch step results back together as one step's result.

A step that returns (or logs) a per-row mean over its batch -- a loss, an accuracy
-- is reproduced exactly by weighting each microbatch's value by its share of the
batch's rows. Predictions are concatenated in microbatch order instead.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lightning_pp.tree import tree_map

__all__ = ["LogRecorder", "concat_outputs", "extract_loss", "weighted_mean"]


def weighted_mean(values: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum(w * v)`` at every leaf: tensors (kept in their dtype and device) and numbers, nested in dicts or sequences.

    Values that cannot be averaged (strings, integer tensors, ...) are taken from the
    last microbatch, as Lightning itself keeps the last value logged in a step.
    """

    def mean(first: Any, *rest: Any) -> Any:
        leaves = (first, *rest)
        if isinstance(first, torch.Tensor) and (first.is_floating_point() or first.is_complex()):
            total = sum(v.detach().double() * w for v, w in zip(leaves, weights))
            return total.to(first.dtype)
        if isinstance(first, (float, int)) and not isinstance(first, bool):
            return float(sum(float(v) * w for v, w in zip(leaves, weights)))
        return leaves[-1]

    return tree_map(mean, values[0], *values[1:])


def concat_outputs(outputs: Sequence[Any]) -> Any:
    """Concatenates microbatch outputs along dim 0, through tuples, lists and dicts."""

    def concat(first: Any, *rest: Any) -> Any:
        if isinstance(first, torch.Tensor):
            return torch.cat([first, *rest], dim=0) if first.dim() > 0 else first
        return [first, *rest]

    return tree_map(concat, outputs[0], *outputs[1:])


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
        """Each logged name's weighted mean over the microbatches that logged it."""
        names = dict.fromkeys(name for record in self.records for name in record)
        result = {}
        for name in names:
            pairs = [(record[name], w) for record, w in zip(self.records, weights) if name in record]
            total = sum(w for _, w in pairs)
            values = [value for (value, _), _ in pairs]
            result[name] = (weighted_mean(values, [w / total for _, w in pairs]), pairs[-1][0][1])
        return result
