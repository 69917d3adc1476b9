"""Walking nested batches, payloads and outputs: one implementation for the package.

Batches, stage payloads, step outputs and logged values are trees whose inner
nodes are dicts (any ``Mapping`` type that can be rebuilt from pairs), lists,
tuples and named tuples, and whose leaves are everything else (tensors, numbers,
strings, ``None``). Every module that looks inside such a value goes through these
functions, so all of them agree on what a container is and rebuild the same types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

__all__ = [
    "TreeSpec",
    "leaf_paths",
    "map_tensors",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_unflatten",
]

#: A tree's shape without its leaves: ``None`` for a leaf, else ``(container type, keys
#: or None, child specs)``. Plain data, so it pickles and compares with ``==``.
TreeSpec = Any


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _children(node: Any) -> tuple[Any, list[Any]] | None:
    """``(keys, children)`` of an inner node (``keys`` is ``None`` for sequences), or ``None`` for a leaf."""
    if isinstance(node, torch.Tensor):  # the usual leaf, told apart before the slower abstract-class check
        return None
    if isinstance(node, Mapping):
        return list(node.keys()), list(node.values())
    if isinstance(node, (list, tuple)):
        return None, list(node)
    return None


def _rebuild(kind: type, keys: Any, children: list[Any]) -> Any:
    if keys is not None:
        return kind(zip(keys, children))
    if issubclass(kind, tuple) and hasattr(kind, "_fields"):
        return kind(*children)
    return kind(children)


def tree_flatten(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> tuple[TreeSpec, list[Any]]:
    """The tree's leaves in depth-first order, and the spec that :func:`tree_unflatten` rebuilds it from.

    ``is_leaf(node)`` may declare a container a leaf (kept whole), e.g. a list that
    holds one value per row of a prediction.
    """
    leaves: list[Any] = []

    def walk(node: Any) -> TreeSpec:
        parts = None if is_leaf is not None and is_leaf(node) else _children(node)
        if parts is None:
            leaves.append(node)
            return None
        keys, children = parts
        return (type(node), keys, tuple(walk(child) for child in children))

    return walk(tree), leaves


def tree_unflatten(spec: TreeSpec, leaves: list[Any]) -> Any:
    """Inverse of :func:`tree_flatten`."""
    position = iter(leaves)

    def build(node: TreeSpec) -> Any:
        if node is None:
            return next(position)
        kind, keys, children = node
        return _rebuild(kind, keys, [build(child) for child in children])

    return build(spec)


def tree_leaves(tree: Any) -> list[Any]:
    """The tree's leaves in depth-first order."""
    return tree_flatten(tree)[1]


def leaf_paths(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> list[str]:
    """A readable path for each leaf, in :func:`tree_leaves` order (``"[0]['x']"``; ``""`` for a bare leaf).

    ``is_leaf`` as for :func:`tree_flatten`.
    """
    paths: list[str] = []

    def walk(node: Any, path: str) -> None:
        parts = None if is_leaf is not None and is_leaf(node) else _children(node)
        if parts is None:
            paths.append(path)
            return
        keys, children = parts
        for i, child in enumerate(children):
            walk(child, f"{path}[{keys[i]!r}]" if keys is not None else f"{path}[{i}]")

    walk(tree, "")
    return paths


def tree_map(fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """Rebuilds ``tree`` with ``fn(leaf, *matching leaves of others)`` at every leaf.

    ``others`` must have ``tree``'s containers (mappings are matched by key, so their
    order may differ); a leaf of ``tree`` receives the other trees' values at that
    position whole, even when those are containers.
    """
    parts = _children(tree)
    if parts is None:
        return fn(tree, *others)
    keys, children = parts
    if keys is not None:
        rebuilt = [tree_map(fn, child, *(other[key] for other in others)) for key, child in zip(keys, children)]
    else:
        rebuilt = [tree_map(fn, child, *(other[i] for other in others)) for i, child in enumerate(children)]
    return _rebuild(type(tree), keys, rebuilt)


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Rebuilds ``tree`` with ``fn(t)`` for every tensor leaf; other leaves stay as they are."""
    return tree_map(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, tree)
