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

Modules outside the block list that hold parameters live only on the stage that
runs them (:mod:`lightning_pp.pipeline.placement`): what comes before the blocks on
the first stage, what comes after them on the last; elsewhere a placeholder returns
a free stand-in of the right shape and dtype. Parameter-free modules (rotary tables,
dropout) and the rest of the step run on every stage as written, which is why values
the model derives from the batch between blocks (rotary tables, attention masks,
position ids) need not travel: each stage recomputes them. Only the activation
crosses ranks: a block's first argument, and its output (the first element when it
returns a tuple).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import Tensor, nn

from lightning_pp.distributed.errors import PayloadError
from lightning_pp.pipeline.blocks import BlockContainer, BlockList, find_block_list, resolve_path
from lightning_pp.pipeline.placement import Unheld, check_no_unheld, outside_modules, replace_module
from lightning_pp.pipeline.split import plan_stage_split
from lightning_pp.pipeline.ties import TiedParameter, find_module_ties
from lightning_pp.tree import leaf_paths, tree_leaves

__all__ = [
    "BlockCallError",
    "BlockPipeline",
    "PER_BLOCK_OUTPUTS",
    "PerBlockOutputError",
    "PassThrough",
    "partition_block_list",
    "plan_block_split",
    "installed_block_pipeline",
]


class BlockCallError(RuntimeError):
    """The step did not call the stage's blocks once each, in order."""


class PerBlockOutputError(ValueError):
    """The model was asked for a value per block (hidden states, attentions), which no one stage has."""


#: Keyword arguments, and config attributes of the same name, with which a Hugging Face model
#: returns one value per block, collected while its loop runs: every layer's hidden states,
#: attention weights, or router logits (for a mixture of experts' balancing loss).
PER_BLOCK_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")


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


def _check_sendable(activation: Any, index: int, path: str) -> None:
    """Fails, naming the block, when what a stage's last block passes on cannot go to the next stage.

    Raised on the sending stage before anything is sent (the transfer would fail deeper,
    in the point-to-point layer, without naming the block list).
    """
    leaves = tree_leaves(activation)
    paths = leaf_paths(activation)
    bad = [(paths[i], leaf) for i, leaf in enumerate(leaves) if leaf is not None and not isinstance(leaf, Tensor)]
    if bad or not any(isinstance(leaf, Tensor) for leaf in leaves):
        where, leaf = bad[0] if bad else ("", activation)
        what = f"{type(leaf).__name__}" + (f" at {where}" if where else "")
        raise PayloadError(
            f"Block {index} of {path} (the last block of its pipeline stage) passed on {what}, which cannot be "
            "sent to the next stage. A block must return its hidden states as a tensor, or a tuple whose first "
            "element is that tensor (or a tuple/list/dict of tensors): only that goes to the next block. Return "
            "other values from the block as tensors, or compute them outside the block list."
        )


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
        #: Parameters used on several stages (a head tied to the embedding), by full names.
        self.ties: tuple[TiedParameter, ...] = ()
        #: The modules outside the block list this rank holds, by dotted name from the root.
        self.placed: dict[str, nn.Module] = {}
        #: Whether some module outside the block list is a placeholder here.
        self.has_unheld = False

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
                _check_sendable(span.output, index, self.path)
                raise _StageDone

        return hook

    def outside_call_check(self, name: str, before: bool) -> Callable[..., Any]:
        """A forward pre-hook for a module outside the blocks, placed as coming ``before`` them or after.

        The placement follows registration order; a module called on the other side of
        the blocks would be computed on the wrong stage (or stood in for with zeros), so
        its first such call fails, naming the module and what to change.
        """

        def hook(module: nn.Module, args: tuple) -> None:
            span = self._span
            if span is None:
                return
            if before and span.next_block != span.first:
                when, where = f"after block {span.next_block - 1} of {self.path}", "before"
            elif not before and span.next_block != span.last + 1:
                when, where = f"before the last block of {self.path} had run", "after"
            else:
                return
            raise BlockCallError(
                f"The step called {name} {when}, but {name} is registered {where} {self.path} in the model. "
                f"PPStrategy keeps each module outside a block list on one stage, chosen by registration order "
                f"(registered before the list: the first stage; after it: the last stage). Register {name} "
                f"{'after' if before else 'before'} {self.path} in __init__ so the order matches the calls; a module "
                "called both before and after the blocks (or by the blocks) cannot live on one stage: move it into "
                "the blocks, or give each use its own module."
            )

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
                    if self.has_unheld:
                        check_no_unheld(span.output, stage, "the activation it sends on", self.path)
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
        if self.has_unheld:
            check_no_unheld(result, stage, "the step's result", self.path)
        return result

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of this rank's blocks and of the modules outside the blocks it holds."""
        seen: set[int] = set()
        for block in (*self._blocks.values(), *self.placed.values()):
            for p in block.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def _per_block_output_check(path: str) -> Callable[..., None]:
    """A forward pre-hook for the module that loops over the blocks: refuses :data:`PER_BLOCK_OUTPUTS`.

    With the blocks spread over pipeline stages, such a value would be collected on each
    stage from its own blocks only; the last stage's, which the step returns, would be
    short, and its first entries the received activation repeated: wrong, silently.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        config = getattr(module, "config", None)
        asked = []
        for name in PER_BLOCK_OUTPUTS:
            value = kwargs.get(name)
            if value is None:
                value = getattr(config, name, None)
            if value is True:
                asked.append(name)
        if asked:
            where = f"{type(module).__name__} (the module that calls {path})"
            raise PerBlockOutputError(
                f"{where} was called with {' and '.join(f'{name}=True' for name in asked)} (as an argument or in its "
                f"config): a value for every block, collected while it loops over them. Under PPStrategy each pipeline "
                "stage runs only its own blocks, so no stage can return that value, and the last stage's would be "
                "silently wrong. Leave it False (in the call and in the config) with pipeline stages. The final "
                "hidden states are available: call the base model (e.g. self.model.model(input_ids)) and use its "
                "last_hidden_state, which the last stage computes as one device does."
            )

    return hook


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

    Stages are balanced by the parameters they hold: the first stage's count includes
    the modules before the blocks, the last stage's those after them.

    Raises:
        ValueError: no block list (or an ambiguous one), fewer blocks than stages, a bad ``balance``.
    """
    found = find_block_list(root, name)
    weights = [sum(p.numel() for p in block.parameters()) for block in found.container]
    if balance is None and len(weights) < num_stages:
        raise ValueError(
            f"{type(root).__name__}.{found.path} has {len(weights)} blocks, fewer than the {num_stages} pipeline "
            "stages: every stage needs at least one block. Use a pipeline_parallel_size (times virtual_stages, "
            f"with Interleaved1F1B) of at most {len(weights)}, or name a longer block list with "
            "PPStrategy(sequential='dotted.path')."
        )
    # The first stage also holds what comes before the blocks (embeddings), the last what follows (norm, head).
    for _, module, before in outside_modules(root, found.path):
        weights[0 if before else -1] += sum(p.numel() for p in module.parameters())
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
    # Modules outside the blocks go to the stage that runs them: before -> first, after -> last.
    last = num_stages - 1
    outside = outside_modules(root, found.path)
    placed = [(path, module, 0 if before else last) for path, module, before in outside]
    blocks = [(f"{found.path}.{i}", found.container[i], stage) for stage, indices in enumerate(slices) for i in indices]
    # A tie's first name is the one one device reports (named_parameters keeps the first).
    order = {name: i for i, (name, _) in enumerate(root.named_parameters(remove_duplicate=False))}
    ties = [replace(t, names=tuple(sorted(t.names, key=order.__getitem__))) for t in find_module_ties(blocks + placed)]
    pipeline = BlockPipeline(found.container, found.path, {stage: slices[stage] for stage in local_stages})
    for (path, module, stage), (_, _, before) in zip(placed, outside):
        if stage in local_stages:
            pipeline.placed[path] = module
        else:
            module = Unheld(module, path, stage)
            replace_module(root, path, module)
            pipeline.has_unheld = True
        if num_stages > 1:
            module.register_forward_pre_hook(pipeline.outside_call_check(path, before))
    if num_stages > 1:
        owner = resolve_path(root, found.path.rpartition(".")[0]) if "." in found.path else root
        owner.register_forward_pre_hook(_per_block_output_check(found.path), with_kwargs=True)
    pipeline.layout = layout
    pipeline.ties = tuple(ties)
    object.__setattr__(found.container, _INSTALLED, pipeline)
    return pipeline
