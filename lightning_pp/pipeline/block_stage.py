"""Running one pipeline stage of a model whose blocks its own code calls in a loop.

A Hugging Face causal LM, GPT-2 or a user's ``self.blocks`` is not one call of an
``nn.Sequential``: its ``forward`` computes embeddings, masks and rotary tables, then
loops over the blocks with extra arguments, then applies a norm and a head. So
every stage runs the user's whole step, and :class:`BlockPipeline` makes the block
list behave, for the duration of one stage's forward, as that stage alone:

* blocks of other stages are swapped for pass-through placeholders that hold no
  parameters and return their input;
* on every stage but the first, the first block of the stage gets the activation
  received from the previous stage instead of what the (placeholder) blocks before
  it passed along;
* on every stage but the last, the step stops right after the stage's last block,
  whose output is what goes to the next stage.

Everything outside the block list (embeddings, norms, the head, the loss) stays on
every stage and runs as written, which is also why values the model derives from
the batch between blocks (rotary tables, attention masks, position ids) need not
travel: each stage recomputes them. Only the activation crosses ranks: a block's
first argument, and its output (the first element when it returns a tuple).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import nn

from lightning_pp.pipeline.blocks import BlockContainer, BlockList, find_block_list
from lightning_pp.pipeline.split import plan_stage_split

__all__ = [
    "BlockCallError",
    "BlockPipeline",
    "PassThrough",
    "partition_block_list",
    "plan_block_split",
    "installed_block_pipeline",
]


class BlockCallError(RuntimeError):
    """The step did not call the stage's blocks once each, in order."""


class _StageDone(BaseException):
    # A BaseException: a user's `except Exception:` around the model call must not
    # swallow the signal that this stage's part of the step is done.
    pass


class PassThrough(nn.Module):
    """Stands in for a block another stage holds: no parameters, returns its first argument."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            return args[0]
        return next(iter(kwargs.values()))


def _activation(output: Any) -> Any:
    """What a block passes on: its output, or the first element of a tuple/list output."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class _Span:
    first: int
    last: int
    stage_input: Any
    stop: bool
    next_block: int
    output: Any = None


class BlockPipeline:
    """This rank's stages of a block list, and the machinery to run one stage inside a step.

    Args:
        container: the model's ``nn.ModuleList``/``nn.Sequential`` of blocks (changed in place).
        path: its dotted path, for messages.
        stage_slices: the block indices of every stage held by this rank.

    The container keeps its length; blocks of other stages become
    :class:`PassThrough` for good (their parameters are freed), so the module's
    state dict holds this rank's blocks under their original names.
    """

    def __init__(self, container: BlockContainer, path: str, stage_slices: dict[int, range]) -> None:
        self.container = container
        self.path = path
        self.stage_slices = dict(stage_slices)
        self.num_blocks = len(container)
        self.local_blocks = sorted({i for indices in self.stage_slices.values() for i in indices})
        self._blocks = {i: container[i] for i in self.local_blocks}
        self._placeholder = PassThrough()
        for i in range(self.num_blocks):
            if i not in self._blocks:
                container[i] = PassThrough()
        for i, block in self._blocks.items():
            block.register_forward_pre_hook(self._before(i), with_kwargs=True)
            block.register_forward_hook(self._after(i))
        self._span: Optional[_Span] = None
        #: ``(num_stages, balance, local stages)`` the split was made for.
        self.layout: tuple = ()

    # -- hooks -------------------------------------------------------------------------------
    def _before(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
            span = self._span
            if span is None:
                raise RuntimeError(
                    f"Block {index} of {self.path} was called outside a pipelined step. Under PPStrategy the blocks "
                    "are spread over the pipeline ranks, so they only run inside a training/validation/test/predict "
                    "step."
                )
            if index != span.next_block:
                how = "again" if index < span.next_block else f"before block {span.next_block}"
                raise BlockCallError(
                    f"The step called block {index} of {self.path} {how}. A pipelined step must call every block of "
                    "the list once, in order (they are spread over the pipeline ranks)."
                )
            span.next_block += 1
            if index != span.first or span.stage_input is None:
                return None
            if args:
                return (span.stage_input, *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: span.stage_input}

        return hook

    def _after(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            span = self._span
            if span is not None and index == span.last and span.stop:
                span.output = _activation(output)
                raise _StageDone

        return hook

    # -- running a stage -----------------------------------------------------------------------
    @contextmanager
    def _stage_view(self, stage: int) -> Iterator[None]:
        """The container shows only ``stage``'s blocks (other local stages' blocks pass through too)."""
        indices = self.stage_slices[stage]
        for i in self.local_blocks:
            if i not in indices:
                self.container[i] = self._placeholder
        try:
            yield
        finally:
            for i in self.local_blocks:
                self.container[i] = self._blocks[i]

    def run_stage(
        self, stage: int, stage_input: Any, run_step: Callable[[], Any], *, stop: bool
    ) -> Any:
        """Runs the step as ``stage``: its output (``stop``), or the step's result (the last stage).

        Args:
            stage: a stage this rank holds.
            stage_input: the activation received from the previous stage (``None`` on the first).
            run_step: runs the user's step once.
            stop: end the step after the stage's last block and return that block's
                activation (every stage but the last).

        Raises:
            BlockCallError: the step did not call each of the stage's blocks once, in order.
        """
        indices = self.stage_slices[stage]
        span = _Span(indices[0], indices[-1], stage_input, stop, next_block=indices[0])
        self._span = span
        try:
            with self._stage_view(stage):
                try:
                    result = run_step()
                except _StageDone:
                    return span.output
        finally:
            self._span = None
        if span.next_block != span.last + 1:
            raise BlockCallError(
                f"The step called blocks {indices[0]}..{span.next_block - 1} of {self.path}, not through block "
                f"{span.last}. A pipelined step must call every block of the list once, in order."
            )
        if stop:
            raise BlockCallError(f"The step returned before reaching block {span.last} of {self.path}.")
        return result

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of this rank's blocks."""
        seen: set[int] = set()
        for block in self._blocks.values():
            for p in block.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def installed_block_pipeline(root: nn.Module) -> Optional[tuple[str, BlockPipeline]]:
    for path, module in root.named_modules():
        pipeline = getattr(module, _INSTALLED, None)
        if isinstance(pipeline, BlockPipeline):
            return path, pipeline
    return None


_INSTALLED = "_lightning_pp_block_pipeline"


def plan_block_split(
    root: nn.Module, *, name: Optional[str], num_stages: int, balance: Optional[Sequence[int]] = None
) -> tuple[BlockList, list[range]]:
    """The block list and each stage's blocks, checked but not applied (balanced by parameter count).

    Raises:
        ValueError: no block list (or an ambiguous one), fewer blocks than stages, a bad ``balance``.
    """
    found = find_block_list(root, name)
    weights = [sum(p.numel() for p in block.parameters()) for block in found.container]
    try:
        slices = plan_stage_split(weights, num_stages, balance)
    except ValueError as error:
        raise ValueError(f"{found.path} ({len(found.container)} blocks): {error}") from error
    return found, slices


def partition_block_list(
    root: nn.Module,
    *,
    name: Optional[str],
    num_stages: int,
    local_stages: Sequence[int],
    balance: Optional[Sequence[int]] = None,
) -> BlockPipeline:
    """Keeps only this rank's blocks of ``root``'s block list; returns what runs them.

    Idempotent: a model already split the same way gets its pipeline back; a model
    split for another layout is refused.
    """
    layout = (num_stages, tuple(balance) if balance is not None else None, tuple(local_stages))
    installed = installed_block_pipeline(root)
    if installed is not None:
        path, pipeline = installed
        if pipeline.layout != layout:
            raise ValueError(
                f"{type(root).__name__}.{path} was already split for another pipeline layout. Create a fresh model "
                "(or load it from a consolidated checkpoint) to use a different PPStrategy layout."
            )
        return pipeline
    found, slices = plan_block_split(root, name=name, num_stages=num_stages, balance=balance)
    pipeline = BlockPipeline(found.container, found.path, {stage: slices[stage] for stage in local_stages})
    pipeline.layout = layout
    object.__setattr__(found.container, _INSTALLED, pipeline)
    return pipeline
