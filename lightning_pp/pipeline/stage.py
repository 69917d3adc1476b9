"""Finding the pipelined ``nn.Sequential`` in a module and keeping only this rank's stages.

The user's module holds the network to pipeline as an ``nn.Sequential`` attribute
(a direct child). :func:`partition_module` replaces that attribute with a
:class:`PipelinedSequential` that holds only the layers of this rank's stages,
registered under their *original* indices: ``layers.3.weight`` keeps its name on
whichever rank holds layer 3, so the union of the ranks' state dicts is the
original state dict, whatever the split.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from torch import nn

from lightning_pp.pipeline.block_stage import installed_block_pipeline
from lightning_pp.pipeline.split import plan_stage_split
from lightning_pp.pipeline.ties import TiedParameter, find_cross_stage_ties

__all__ = [
    "PipelinedSequential",
    "capture_sequential_input",
    "find_pipelined_sequential",
    "layer_weights",
    "partition_module",
    "plan_module_split",
    "uses_block_list",
]


class PipelinedSequential(nn.Module):
    """Stands in for the user's ``nn.Sequential`` on one pipeline rank.

    Calling it runs whatever handler the executor installed for the current
    microbatch: the first stage's layers on the step's input, or the last stage's
    layers on the activation received from the previous stage.
    """

    def __init__(
        self,
        layers: dict[int, nn.Module],
        stage_slices: dict[int, range],
        num_layers: int,
        layout: tuple[int, Optional[tuple[int, ...]]] = (1, None),
        ties: Sequence[TiedParameter] = (),
    ) -> None:
        super().__init__()
        #: Parameters that layers of different stages share (a tied embedding and head).
        self.ties = tuple(ties)
        #: ``(num_stages, balance)`` the split was made with, to refuse reuse under another.
        self.layout = layout
        for index, layer in layers.items():
            self.add_module(str(index), layer)
        self.num_layers = num_layers
        self.stage_slices = dict(stage_slices)
        # Plain dict: the stage containers share the layers registered above and must
        # not register them a second time under other names.
        self.stages: dict[int, nn.Sequential] = {
            stage: nn.Sequential(*(layers[i] for i in indices)) for stage, indices in stage_slices.items()
        }
        self.handler: Optional[Callable[[Any], Any]] = None

    def forward(self, x: Any) -> Any:
        if self.handler is None:
            raise RuntimeError(
                "The pipelined nn.Sequential was called outside a training/validation/test/predict step. Under "
                "PPStrategy its layers are spread over the pipeline ranks, so it can only run inside a step."
            )
        return self.handler(x)


def find_pipelined_sequential(module: nn.Module, name: Optional[str] = None) -> tuple[str, nn.Module]:
    """Returns ``(attribute name, Sequential)`` of the network to pipeline.

    Raises:
        ValueError: none, or more than one, direct ``nn.Sequential`` child and no ``name``.
    """
    children = dict(module.named_children())
    if name is not None:
        child = children.get(name)
        if not isinstance(child, (nn.Sequential, PipelinedSequential)):
            raise ValueError(
                f"PPStrategy(sequential={name!r}): {type(module).__name__}.{name} is "
                f"{type(child).__name__ if child is not None else 'missing'}, not an nn.Sequential. Name the "
                "attribute that holds the layers to pipeline as an nn.Sequential."
            )
        return name, child
    found = [(n, c) for n, c in children.items() if isinstance(c, (nn.Sequential, PipelinedSequential))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"PPStrategy found no nn.Sequential among the direct children of {type(module).__name__}. Put the layers "
            "to pipeline in an nn.Sequential attribute (e.g. self.layers = nn.Sequential(embed, *blocks, head)) "
            "and call it once per step."
        )
    names = ", ".join(n for n, _ in found)
    raise ValueError(
        f"{type(module).__name__} has several nn.Sequential children ({names}); tell PPStrategy which one to "
        f"pipeline, e.g. PPStrategy(sequential={found[0][0]!r})."
    )


def layer_weights(sequential: nn.Module) -> list[int]:
    """Parameter count of each layer (shared parameters counted where first seen)."""
    seen: set[int] = set()
    weights = []
    for layer in sequential.children():
        count = 0
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
        weights.append(count)
    return weights


def plan_module_split(
    module: nn.Module, *, name: Optional[str], num_stages: int, balance: Optional[Sequence[int]] = None
) -> tuple[str, nn.Module, Optional[list[range]]]:
    """The Sequential to pipeline and each stage's layers, checked but not applied.

    Returns:
        The attribute name, the Sequential, and its layer ranges per stage (``None``
        when the module was split already).

    Raises:
        ValueError: no (or an ambiguous) ``nn.Sequential``, fewer layers than stages,
            or a ``balance`` that does not fit.
    """
    attr, sequential = find_pipelined_sequential(module, name)
    if isinstance(sequential, PipelinedSequential):
        return attr, sequential, None
    return attr, sequential, plan_stage_split(layer_weights(sequential), num_stages, balance)


def partition_module(
    module: nn.Module,
    *,
    name: Optional[str],
    num_stages: int,
    local_stages: Sequence[int],
    balance: Optional[Sequence[int]] = None,
) -> tuple[str, PipelinedSequential]:
    """Replaces the pipelined Sequential of ``module`` with this rank's part of it.

    Idempotent: a module already partitioned the same way is left as it is.

    Returns:
        The attribute name and the installed :class:`PipelinedSequential`.
    """
    attr, sequential, slices = plan_module_split(module, name=name, num_stages=num_stages, balance=balance)
    if isinstance(sequential, PipelinedSequential):
        layout = (num_stages, tuple(balance) if balance is not None else None)
        if sequential.layout != layout or set(sequential.stages) != set(local_stages):
            raise ValueError(
                f"{type(module).__name__}.{attr} was already split for another pipeline layout. Create a fresh "
                "model (or load it from a consolidated checkpoint) to use a different PPStrategy layout."
            )
        return attr, sequential
    assert slices is not None
    ties = find_cross_stage_ties(sequential, slices)
    layers = list(sequential.children())
    mine = {stage: slices[stage] for stage in local_stages}
    kept = {i: layers[i] for indices in mine.values() for i in indices}
    layout = (num_stages, tuple(balance) if balance is not None else None)
    pipelined = PipelinedSequential(kept, mine, num_layers=len(layers), layout=layout, ties=ties)
    setattr(module, attr, pipelined)
    return attr, pipelined


class _Handler(nn.Module):
    """Calls a function; stands in for the Sequential while a step is run outside the pipeline."""

    def __init__(self, handler: Callable[[Any], Any]) -> None:
        super().__init__()
        self.handler = handler

    def forward(self, x: Any) -> Any:
        return self.handler(x)


def capture_sequential_input(module: nn.Module, attr: str, batch: Any, hook: str = "training_step") -> Any:
    """The input ``module.<hook>(batch, 0)`` passes to its Sequential ``attr``, without running the Sequential."""
    from lightning_pp.pipeline.executor import run_step_to_first_stage

    original = getattr(module, attr)
    # Logging is not possible outside a Lightning hook; anything logged before the call is dropped.
    # ignore: typed as nn.Module, whose attributes mypy sees as Tensor | Module (log is LightningModule's).
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[assignment]

    def run(handler: Callable[[Any], Any]) -> Any:
        setattr(module, attr, _Handler(handler))
        return getattr(module, hook)(batch, 0)

    try:
        return run_step_to_first_stage(run, lambda x: x, f"self.{attr}")
    finally:
        setattr(module, attr, original)
        del module.log, module.log_dict


def uses_block_list(root: nn.Module, name: Optional[str]) -> bool:
    """Whether ``root`` is pipelined by a block list rather than a direct-child ``nn.Sequential`` called once.

    A direct-child ``nn.Sequential`` (the original contract) keeps its meaning: with
    no name, any such child selects it; a plain name that is such a child too. A
    dotted path, or a name of anything else, selects a block list.
    """
    if installed_block_pipeline(root) is not None:
        return True
    children = dict(root.named_children())
    sequential = (nn.Sequential, PipelinedSequential)
    if name is None:
        return not any(isinstance(child, sequential) for child in children.values())
    return not isinstance(children.get(name), sequential)
