"""Finding the list of blocks to pipeline in a model, with no option in the common cases.

A model that is worth pipelining is, almost always, a stack of same-class blocks
between an input part (embeddings) and an output part (norm, head): a Hugging Face
causal LM's ``model.layers``, GPT-2's ``transformer.h``, BERT's ``encoder.layer``, a
user's ``self.blocks``. :func:`find_block_list` finds that stack:

1. the dotted path the user named (``PPStrategy(sequential="model.model.layers")``);
2. otherwise, a Hugging Face base model's ``config.base_model_pp_plan``, whose entry
   that is an ``nn.ModuleList`` is the block list (``embed_tokens`` -> ``layers`` ->
   ``norm`` for Llama, Qwen, Mistral);
3. otherwise the one largest ``nn.ModuleList``/``nn.Sequential`` of at least two
   blocks of one class, anywhere in the module tree, by parameter count.

When two candidates tie for largest, it fails and lists them with the option that
picks one. Nothing here runs the model or moves a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

__all__ = ["BlockContainer", "BlockList", "block_list_candidates", "find_block_list", "resolve_path"]


#: What holds the blocks: indexable, sized, and assignable by index.
BlockContainer = Union[nn.ModuleList, nn.Sequential]


@dataclass(frozen=True)
class BlockList:
    """The container of blocks to split over the pipeline.

    Attributes:
        path: its dotted path from the root module (``"model.model.layers"``).
        container: the ``nn.ModuleList`` or ``nn.Sequential`` itself.
        found_by: ``"name"``, ``"pp_plan"`` or ``"largest"``.
    """

    path: str
    container: BlockContainer
    found_by: str

    @property
    def num_blocks(self) -> int:
        return len(self.container)


def resolve_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``"model.layers"``), or a ``ValueError`` that lists what is there."""
    module = root
    walked: list[str] = []
    for part in path.split("."):
        children = dict(module.named_children())
        if part not in children:
            here = ".".join(walked) or type(root).__name__
            raise ValueError(
                f"{path!r} does not name a submodule: {here} has no child {part!r} (its children: "
                f"{', '.join(children) or 'none'})."
            )
        module = children[part]
        walked.append(part)
    return module


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
        return False
    return len({type(block) for block in module}) == 1


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_list_candidates(root: nn.Module) -> list[tuple[str, BlockContainer, int]]:
    """Every ``nn.ModuleList``/``nn.Sequential`` of two or more same-class blocks: ``(path, container, params)``.

    Nested lists count once, as the outermost (a block that holds its own list of
    sub-blocks does not compete with the stack it is part of).
    """
    found: list[tuple[str, BlockContainer, int]] = []

    def walk(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and _is_block_list(child):
                found.append((child_path, child, _num_params(child)))
            else:
                walk(child, child_path)

    walk(root, "")
    return found


def _from_pp_plan(root: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    for path, module in root.named_modules():
        plan = getattr(getattr(module, "config", None), "base_model_pp_plan", None)
        if not isinstance(plan, dict):
            continue
        children = dict(module.named_children())
        if not all(key in children for key in plan):
            continue  # the config's owner is a wrapper (e.g. ...ForCausalLM); its base model comes next
        lists = [key for key in plan if isinstance(children[key], nn.ModuleList)]
        if len(lists) == 1:
            blocks = children[lists[0]]
            assert isinstance(blocks, nn.ModuleList)
            return (f"{path}.{lists[0]}" if path else lists[0]), blocks
    return None


def find_block_list(root: nn.Module, name: Optional[str] = None) -> BlockList:
    """The block list to pipeline (see the module docstring for the order of preference).

    Raises:
        ValueError: ``name`` names nothing, or not a list of blocks; no candidate at
            all; or two candidates tie for largest. Each message says what to pass.
    """
    if name is not None:
        container = resolve_path(root, name)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"PPStrategy(sequential={name!r}) names a {type(container).__name__}, not an nn.ModuleList or "
                "nn.Sequential of blocks. Name the container whose children are the blocks to split over stages."
            )
        return BlockList(name, container, "name")
    planned = _from_pp_plan(root)
    if planned is not None:
        return BlockList(planned[0], planned[1], "pp_plan")
    candidates = block_list_candidates(root)
    if not candidates:
        raise ValueError(
            f"PPStrategy found no nn.Sequential child and no list of blocks to pipeline in {type(root).__name__}: "
            "it looks for a direct nn.Sequential child called once per step, then a Hugging Face model's "
            "base_model_pp_plan, then an nn.ModuleList or nn.Sequential of two or more blocks of one class anywhere. "
            "Put the repeated blocks in one (e.g. self.blocks = nn.ModuleList(...)) or name the container with "
            "PPStrategy(sequential='dotted.path')."
        )
    largest = max(size for _, _, size in candidates)
    top = [(path, container) for path, container, size in candidates if size == largest]
    if len(top) > 1:
        listed = ", ".join(f"{path} ({len(container)} x {type(container[0]).__name__})" for path, container in top)
        raise ValueError(
            f"{type(root).__name__} has several equally large lists of blocks: {listed}. Tell PPStrategy which to "
            f"split over the pipeline, e.g. PPStrategy(sequential={top[0][0]!r})."
        )
    return BlockList(top[0][0], top[0][1], "largest")
