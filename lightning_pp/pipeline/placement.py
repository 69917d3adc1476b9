"""Modules outside a block list live only on the stage that runs them.

A model pipelined by its block list runs the user's whole step on every stage (see
:mod:`lightning_pp.pipeline.block_stage`). What comes before the first block
(embeddings) only matters on the first stage: elsewhere its output is replaced by
the activation received from the previous stage. What comes after the last block
(final norm, head) only runs on the last stage: every other stage stops after its
own last block. So each module outside the block list that holds parameters is
*placed*: kept on the first stage when it comes before the block list in the module
tree (registration order, which is the order of Hugging Face's
``base_model_pp_plan``: ``embed_tokens`` -> ``layers`` -> ``norm``), on the last stage
when it comes after, and replaced by an :class:`Unheld` placeholder elsewhere.

An embedding's output is still *looked at* on the other stages: Hugging Face models
take the attention mask's batch size, dtype and device and the rotary table's dtype
from ``inputs_embeds``. The placeholder runs a parameter-free meta-device copy of the
module, so its output has the right shape and dtype, and returns an expanded zero
scalar of that shape: no memory, no compute. That tensor is an :class:`UnheldTensor`,
a subclass every torch operation propagates (``h + pos``, ``sigmoid(h.mean())`` are
unheld too). Shapes, dtypes and devices read from it are exact; *values* derived
from it are not, so a stage whose output still contains an unheld tensor raises
:class:`UnheldValueError`, naming the module, instead of returning a wrong answer.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "Unheld",
    "UnheldTensor",
    "UnheldValueError",
    "check_no_unheld",
    "find_unheld",
    "outside_modules",
    "replace_module",
]


class UnheldValueError(RuntimeError):
    """A stage's result depends on the values of a module another stage holds."""


class UnheldTensor(Tensor):
    """A stand-in value of a module this stage does not hold.

    ``torch.Tensor.__torch_function__`` turns the result of every operation on a
    subclass instance into that subclass, so anything computed from it stays marked.
    """

    #: Dotted names of the modules whose outputs this value stands for.
    sources: tuple[str, ...] = ()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = super().__torch_function__(func, types, args, kwargs or {})
        sources = _sources_of(args, kwargs)
        if sources:
            for item in _tensors(result):
                if isinstance(item, UnheldTensor):
                    item.sources = sources
        return result


def _tensors(value: Any) -> Iterator[Any]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _sources_of(args: Any, kwargs: Any) -> tuple[str, ...]:
    found: list[str] = []
    for item in (*_tensors(args), *_tensors(kwargs or {})):
        if isinstance(item, UnheldTensor):
            found += [s for s in item.sources if s not in found]
    return tuple(found)


def _map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        try:
            return type(value)(**mapped) if type(value) is not dict else mapped
        except TypeError:
            return mapped
    return value


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device (no data copied)."""
    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


class Unheld(nn.Module):
    """Stands in for a module outside the block list that another stage holds: no parameters.

    Calling it returns zeros, expanded to the real module's output shape and dtype
    (found by running a meta-device copy), as :class:`UnheldTensor`. Its one buffer, a
    scalar, follows the model's ``.to(device/dtype)`` so the outputs do too.

    Args:
        module: the module it replaces (not kept).
        name: its dotted name in the model, for messages.
        holder: the stage that holds the real module.
    """

    def __init__(self, module: nn.Module, name: str, holder: int) -> None:
        super().__init__()
        self.name, self.holder = name, holder
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
        device = tensors[0].device if tensors and tensors[0].device.type != "meta" else torch.device("cpu")
        self.register_buffer("anchor", torch.zeros((), dtype=dtype, device=device), persistent=False)
        # Not a registered submodule: parameters(), state_dict() and .to() must not see it.
        self._meta: list[nn.Module] = [_meta_copy(module)]
        self._meta_dtype = dtype

    def extra_repr(self) -> str:
        return f"{self.name!r}, held by stage {self.holder}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        meta = self._meta[0]
        anchor = self.get_buffer("anchor")
        if anchor.dtype != self._meta_dtype:  # the model was converted (e.g. bf16-true): follow it, for free
            meta.to(anchor.dtype)
            self._meta_dtype = anchor.dtype

        def to_meta(t: Tensor) -> Tensor:
            plain = t.as_subclass(Tensor) if isinstance(t, UnheldTensor) else t
            return torch.empty_like(plain, device="meta")

        try:
            with torch.no_grad():
                out = meta(*_map_tensors(args, to_meta), **_map_tensors(kwargs, to_meta))
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise RuntimeError(
                f"{self.name} is held by pipeline stage {self.holder}; to stand in for it elsewhere PPStrategy runs it "
                f"on the meta device to learn its output's shape, which failed ({type(error).__name__}: {error}). "
                "Modules outside the block list must run on meta tensors (no .item() or data-dependent shapes)."
            ) from error

        def stand_in(t: Tensor) -> Tensor:
            value = torch.zeros((), dtype=t.dtype, device=anchor.device).expand(t.shape).as_subclass(UnheldTensor)
            value.sources = (self.name,)
            return value

        return _map_tensors(out, stand_in)


def outside_modules(root: nn.Module, block_path: str) -> list[tuple[str, nn.Module, bool]]:
    """The modules outside the block list that hold parameters: ``(name, module, before the blocks?)``.

    The largest such subtrees: a module that contains the block list is walked into,
    one inside the block list is skipped, any other one holding a parameter is taken
    whole. Parameters registered directly on an ancestor of the block list are not
    placed (every stage keeps them).
    """
    found: list[tuple[str, nn.Module, bool]] = []
    before = True

    def walk(module: nn.Module, path: str) -> None:
        nonlocal before
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if child_path == block_path:
                before = False
            elif block_path.startswith(child_path + "."):
                walk(child, child_path)
            elif next(child.parameters(), None) is not None:
                found.append((child_path, child, before))

    walk(root, "")
    return found


def check_no_unheld(value: Any, stage: int, what: str, block_path: str) -> None:
    """Raises :class:`UnheldValueError` if ``value`` holds a value computed from an unheld module's output."""
    for item in _tensors(value):
        if isinstance(item, UnheldTensor):
            names = ", ".join(item.sources) or "a module held by another stage"
            raise UnheldValueError(
                f"On pipeline stage {stage}, {what} depends on the output of {names}, which another stage holds: "
                f"PPStrategy keeps each module outside {block_path} only on the stage that runs it (before the "
                "blocks: the first stage; after them: the last). Values the blocks use besides their input may "
                "depend on the batch, and on the shape, dtype or device of such an output, not on its values. "
                "Compute them from the batch, or move the module into the blocks."
            )


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Sets the submodule at dotted ``path`` to ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def find_unheld(root: nn.Module) -> Optional[Unheld]:
    """The first placeholder in ``root``, if any (for tests and messages)."""
    return next((m for m in root.modules() if isinstance(m, Unheld)), None)
