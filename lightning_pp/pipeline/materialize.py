"""Allocating and initialising only this rank's stage of a model built on the meta device.

A model too big for one process is built without memory (``torch.device("meta")``,
or ``trainer.init_module(empty_init=True)`` under ``PPStrategy``) and split first:
other stages' blocks and modules become placeholders with no tensors. What is left
on the meta device is this rank's part, which :func:`materialize_meta_tensors`
allocates on the device and initialises the way the model itself would:

* a Hugging Face model's modules with its own ``_init_weights`` (the nearest
  ``PreTrainedModel`` above each module, children before parents, as
  ``PreTrainedModel.initialize_weights`` does; it also recomputes rotary tables,
  buffers that no checkpoint holds);
* any other module with its ``reset_parameters()`` (every torch layer has one).

Tensors a checkpoint will fill (``loaded``) are allocated but not initialised, unless
the module they belong to must be initialised for another tensor (the checkpoint
overwrites them afterwards). Parameters shared by several modules stay shared.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
from torch import Tensor, nn

__all__ = ["has_meta_tensors", "materialize_meta_tensors"]


def has_meta_tensors(root: nn.Module) -> bool:
    """Whether any parameter or buffer of ``root`` is on the meta device."""
    return any(t.is_meta for t in (*root.parameters(), *root.buffers()))


def _hf_init_owner(path: str, owners: dict[str, nn.Module]) -> nn.Module | None:
    """The nearest module at or above ``path`` with ``_init_weights`` (a transformers ``PreTrainedModel``)."""
    parts = path.split(".") if path else []
    for cut in range(len(parts), -1, -1):
        owner = owners.get(".".join(parts[:cut]))
        if owner is not None:
            return owner
    return None


def materialize_meta_tensors(
    root: nn.Module, device: torch.device, *, loaded: Callable[[str], bool] = lambda name: False
) -> list[str]:
    """Allocates every meta parameter and buffer of ``root`` on ``device`` and initialises them.

    Args:
        root: the model, already split (other stages' parts hold no tensors).
        device: where to allocate.
        loaded: whether the tensor of a full ``state_dict`` name will be filled from a
            checkpoint afterwards (then it needs no initialisation).

    Returns:
        The full names of the tensors that were initialised (not left to a checkpoint).

    Raises:
        RuntimeError: a module holding a meta tensor has no way to initialise it
            (neither a Hugging Face ``_init_weights`` above it nor ``reset_parameters``).
    """
    memo: dict[int, Tensor] = {}
    needs_init: dict[str, nn.Module] = {}
    initialised: list[str] = []
    modules = dict(root.named_modules(remove_duplicate=False))
    for path, module in modules.items():
        for kind in ("_parameters", "_buffers"):
            tensors: dict[str, Tensor | None] = getattr(module, kind)
            for name, tensor in tensors.items():
                if tensor is None or not tensor.is_meta:
                    continue
                new = memo.get(id(tensor))
                if new is None:
                    new = torch.empty_like(tensor, device=device)
                    if isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    memo[id(tensor)] = new
                tensors[name] = new
                full = f"{path}.{name}" if path else name
                if not loaded(full):
                    needs_init.setdefault(path, module)
                    initialised.append(full)
    if not needs_init:
        return initialised
    hf_owners = {p: m for p, m in modules.items() if callable(getattr(m, "_init_weights", None))}
    stuck = [p for p, m in needs_init.items() if _hf_init_owner(p, hf_owners) is None and not _resettable(m)]
    if stuck:
        raise RuntimeError(
            f"PPStrategy cannot initialise the meta-device tensors of {', '.join(stuck[:5])}: their modules have no "
            "reset_parameters() and no Hugging Face _init_weights above them. Give those modules a "
            "reset_parameters() method, or load a checkpoint that holds their tensors."
        )
    # Children before parents (a Hugging Face parent's init may rescale a child's weight).
    with torch.no_grad():
        for path in sorted(_with_ancestors(needs_init), key=lambda p: -len(p.split(".")) if p else 0):
            module = modules[path]
            owner = _hf_init_owner(path, hf_owners)
            if owner is not None:
                cast(Callable[[nn.Module], None], owner._init_weights)(module)
            elif path in needs_init and _resettable(module):
                cast(Callable[[], None], module.reset_parameters)()
    return initialised


def _resettable(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None))


def _with_ancestors(paths: dict[str, nn.Module]) -> set[str]:
    """The paths and every ancestor path (a Hugging Face init of a parent may set its children's tensors)."""
    out: set[str] = set()
    for path in paths:
        parts = path.split(".") if path else []
        for cut in range(len(parts) + 1):
            out.add(".".join(parts[:cut]))
    return out
