"""Parameters that layers on different pipeline stages share (tied weights).

GPT-2 ties its output head to its token embedding, and so does any model built with
``tie_word_embeddings=True``. Split over a pipeline, the embedding lives on the first
stage and the head on the last: each of those stages keeps a copy of the one weight.
One device updates that weight with the sum of both uses' gradients, so the copies
must be updated with that sum too: every step, the holders add up their gradients
(Megatron-LM's "embedding group" does the same), and the copies stay equal to each
other and to the one-device weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Sequence

from torch import nn

__all__ = ["TiedParameter", "check_tied_copies", "find_cross_stage_ties", "find_module_ties"]


@dataclass(frozen=True)
class TiedParameter:
    """One parameter used by layers of several stages.

    Attributes:
        names: every name it has inside the pipelined Sequential (``"0.weight"``,
            ``"5.weight"``), in layer order.
        stages: the stages holding a layer that uses it, ascending.
    """

    names: tuple[str, ...]
    stages: tuple[int, ...]

    def local_name(self, local_layers: Sequence[int]) -> str:
        """The first of its names whose layer is among ``local_layers``."""
        for name in self.names:
            if int(name.split(".", 1)[0]) in local_layers:
                return name
        raise ValueError(f"none of {self.names} is in layers {list(local_layers)}")

    def held_name(self, present: Container[str]) -> str:
        """The first of its names among ``present`` (a rank's parameter names)."""
        for name in self.names:
            if name in present:
                return name
        raise ValueError(f"none of {self.names} is held here")


def check_tied_copies(name: str, copies: Sequence[tuple[int, tuple[int, ...], str]]) -> None:
    """Refuses a tie whose holders' copies cannot be summed element by element.

    Args:
        name: the tied weight's one-device name, for the message.
        copies: ``(global rank, shape, dtype)`` of every holder's copy.

    Raises:
        ValueError: the copies differ in shape or dtype (a holder's layer sharded for
            tensor parallelism, or converted to another dtype): summing their gradients
            would fail on some ranks or, worse, mix unrelated elements.
    """
    if len({(tuple(shape), dtype) for _, shape, dtype in copies}) > 1:
        held = ", ".join(f"rank {rank}: {tuple(shape)} {dtype}" for rank, shape, dtype in copies)
        raise ValueError(
            f"The weight {name} is tied across pipeline stages, but its copies differ ({held}), so their gradients "
            "cannot be summed to keep them equal. Give every use of the tied weight the same shape and dtype on its "
            "stage (do not shard one holder's layer for tensor parallelism, or convert only one), or untie it."
        )


def find_cross_stage_ties(sequential: nn.Module, slices: Sequence[range]) -> list[TiedParameter]:
    """The parameters that layers of more than one stage use, in order of first use.

    Args:
        sequential: the whole, unsplit Sequential.
        slices: each stage's layer indices (from the stage split).
    """
    stage_of = {index: stage for stage, indices in enumerate(slices) for index in indices}
    uses: dict[int, list[tuple[str, int]]] = {}
    for index, layer in enumerate(sequential.children()):
        for name, param in layer.named_parameters(remove_duplicate=False):
            uses.setdefault(id(param), []).append((f"{index}.{name}", stage_of[index]))
    ties = []
    for named in uses.values():  # dicts keep insertion order: the order of first use
        stages = tuple(sorted({stage for _, stage in named}))
        if len(stages) > 1:
            ties.append(TiedParameter(tuple(name for name, _ in named), stages))
    return ties


def find_module_ties(units: Sequence[tuple[str, nn.Module, int]]) -> list[TiedParameter]:
    """The parameters that modules placed on more than one stage use, in order of first use.

    Args:
        units: ``(dotted name, module, stage)`` for every block and every placed module
            of a model pipelined by its block list, before the split. Names in the
            result are full parameter names (``"lm_head.weight"``).
    """
    uses: dict[int, list[tuple[str, int]]] = {}
    for prefix, module, stage in units:
        for name, param in module.named_parameters(remove_duplicate=False):
            uses.setdefault(id(param), []).append((f"{prefix}.{name}", stage))
    ties = []
    for named in uses.values():
        stages = tuple(sorted({stage for _, stage in named}))
        if len(stages) > 1:
            ties.append(TiedParameter(tuple(name for name, _ in named), stages))
    return ties
