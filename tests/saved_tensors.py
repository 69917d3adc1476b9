"""Counting the tensors autograd graphs hold for backward (the split-backward memory tests)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch

__all__ = ["SavedTensors"]


class SavedTensors:
    """Counts the tensors saved for backward under :meth:`hooks` that are alive right now."""

    class _Held:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    def __init__(self) -> None:
        self.held: "weakref.WeakSet[SavedTensors._Held]" = weakref.WeakSet()

    def hooks(self) -> Any:
        def pack(tensor: torch.Tensor) -> Any:
            held = SavedTensors._Held(tensor.detach())  # not the tensor: an output would hold its own node
            self.held.add(held)
            return held

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor)

    def alive(self) -> int:
        gc.collect()
        return len(self.held)
