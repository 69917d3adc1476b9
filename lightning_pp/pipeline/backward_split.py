"""One microbatch's backward on one stage in two parts: input gradients now, weight gradients later.

Zero-bubble schedules run a stage's backward as ``I``, the gradients w.r.t. the
stage's received inputs (what the previous stage waits for), and, later, ``W``,
the gradients w.r.t. its weights (what nothing waits for). Together they must
cost one backward and give its gradients exactly.

The obvious ``W`` -- the backward once more, restricted with ``inputs=<weights>``
-- gets the gradients right but recomputes the gradient of every activation
between the stage's layers, since each layer's weight gradient needs the gradient
of that layer's output: on a stage of 4 Linear+GELU layers I + W then cost 1.44
backwards. Instead, before ``I`` runs, one walk of the autograd graph finds the
path ``X`` from the outputs to the inputs and, on it, the nodes where weights hang
off::

    outputs -> N3 -> N2 -> N1 -> input      I runs X (inputs=<input>), keeping the
               |     |     |                gradient that reaches N3, N2, N1;
               w3    w2    w1               W starts at each N with that gradient
                                            and runs only its weight branch.

Each ``W`` call asks only for the weights under its own node, so autograd computes
nothing on ``X`` again (built-in kernels skip gradients nobody asked for). That is
exact when no weight hangs under two nodes of ``X`` (a weight used twice on one
stage); then, and on a stage whose inputs need no gradient (the first), ``W`` is
the plain restricted backward, still exact, only slower. Between ``I`` and ``W``
the graph stays alive, plus the kept gradients: about one activation per
weight-bearing op.

NOTE: a hook on an activation inside the stage (``Tensor.register_hook``, or a
module's full backward hook, which registers one) runs in ``I`` and again in
``W``: an observing hook sees each gradient twice, and a hook that changes the
gradient changes the weights' gradients twice. Such models should use 1F1B.
Reentrant activation checkpointing (``use_reentrant=True``) refuses a backward
restricted with ``inputs=``; the non-reentrant kind works.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["SplitBackward", "gradients_asked_for", "graph_leaves"]

Node = Any  # torch.autograd.graph.Node; its Python objects are stable while the graph lives


class SplitBackward:
    """The backward of one stage and microbatch, run as :meth:`backward_input` then :meth:`backward_weight`.

    Args:
        roots: the tensors the backward starts from (the stage's outputs, or the loss).
        root_grads: their gradients; ``None`` for a scalar loss.
        stage_inputs: the received leaves whose gradients ``I`` computes (into ``.grad``).
    """

    def __init__(
        self,
        roots: Sequence[torch.Tensor],
        root_grads: Optional[Sequence[torch.Tensor]],
        stage_inputs: Sequence[torch.Tensor],
    ) -> None:
        self.roots = list(roots)
        self.root_grads = None if root_grads is None else list(root_grads)
        self.stage_inputs = list(stage_inputs)
        #: Per weight branch: (node on the path, or a root tensor off it; the weights under it).
        self.groups: list[tuple[Any, list[torch.Tensor]]] = []
        #: Whether ``W`` starts from the kept gradients (else: the plain restricted backward).
        self.from_kept_gradients = False
        self._kept: dict[Node, tuple[Optional[torch.Tensor], ...]] = {}
        if self.roots and self.stage_inputs:
            self.groups, self.from_kept_gradients = _weight_branches(self.roots, self.stage_inputs)

    def backward_input(self) -> None:
        """``I``: accumulates the stage inputs' gradients into their ``.grad``; keeps the graph."""
        if not (self.roots and self.stage_inputs):
            return
        nodes = [start for start, _ in self.groups if not isinstance(start, torch.Tensor)]
        handles = [node.register_prehook(self._keeper(node)) for node in nodes] if self.from_kept_gradients else []
        try:
            torch.autograd.backward(
                self.roots, grad_tensors=self.root_grads, inputs=self.stage_inputs, retain_graph=True
            )
        finally:
            for handle in handles:
                handle.remove()
        if any(node not in self._kept for node in nodes):  # pragma: no cover - every node of X runs in I
            self.from_kept_gradients, self._kept = False, {}

    def backward_weight(self) -> None:
        """``W``: accumulates every other leaf's gradient (the weights) into ``.grad``; frees the graph."""
        if not self.roots:
            return
        if not self.stage_inputs:  # nothing was split off (the first stage): the whole backward
            torch.autograd.backward(self.roots, grad_tensors=self.root_grads)
        elif not self.from_kept_gradients:
            weights = graph_leaves(self.roots, exclude=self.stage_inputs)
            if weights:
                torch.autograd.backward(self.roots, grad_tensors=self.root_grads, inputs=weights)
        else:
            for start, weights in self.groups:
                if isinstance(start, torch.Tensor):  # a root off the path: its whole backward is W's
                    i = next(i for i, root in enumerate(self.roots) if root is start)
                    grad = None if self.root_grads is None else [self.root_grads[i]]
                    torch.autograd.backward([start], grad_tensors=grad, inputs=weights)
                    continue
                kept = self._kept.pop(start)
                edges = [GradientEdge(start, i) for i, g in enumerate(kept) if g is not None]
                if edges:
                    grads = [g for g in kept if g is not None]
                    torch.autograd.backward(edges, grad_tensors=grads, inputs=weights)
        self.roots, self.root_grads, self.groups, self._kept = [], None, [], {}

    def _keeper(self, node: Node) -> Any:
        def keep(grad_outputs: tuple[Optional[torch.Tensor], ...]) -> None:
            self._kept[node] = tuple(grad_outputs)

        return keep


def _weight_branches(
    roots: Sequence[torch.Tensor], stage_inputs: Sequence[torch.Tensor]
) -> tuple[list[tuple[Any, list[torch.Tensor]]], bool]:
    """Where weights hang off the path from ``roots`` to ``stage_inputs``; whether no weight hangs twice.

    One iterative post-order walk. A node is on the path ``X`` when an input is
    reachable from it; every node off it leads only to weights (leaves), which are
    collected per node. A node of ``X`` owns the weights under its children off
    ``X``; a root off ``X`` owns all of its own.
    """
    targets = {get_gradient_edge(t).node for t in stage_inputs}
    on_path: dict[Node, bool] = {}
    under: dict[Node, dict[int, torch.Tensor]] = {}  # node off X -> the leaves below it, by id
    stack = [(r.grad_fn, False) for r in roots if r.grad_fn is not None]
    while stack:
        node, children_done = stack.pop()
        if not children_done:
            if node in on_path:
                continue
            on_path[node] = False  # visiting; settled below once its children are
            stack.append((node, True))
            stack += [(child, False) for child, _ in node.next_functions if child is not None and child not in on_path]
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if node in targets or any(on_path[child] for child in children):
            on_path[node] = True
            continue
        leaves: dict[int, torch.Tensor] = {}
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if variable is not None:
            leaves[id(variable)] = variable
        for child in children:
            leaves.update(under[child])
        under[node] = leaves
    groups: list[tuple[Any, list[torch.Tensor]]] = []
    owned: set[int] = set()
    disjoint = True

    def claim(start: Any, leaves: dict[int, torch.Tensor]) -> None:
        nonlocal disjoint
        if leaves:
            disjoint = disjoint and owned.isdisjoint(leaves)
            owned.update(leaves)
            groups.append((start, list(leaves.values())))

    for node, is_on_path in on_path.items():
        if is_on_path and node not in targets:
            leaves = {}
            for child, _ in node.next_functions:
                if child is not None and not on_path[child]:
                    leaves.update(under[child])
            claim(node, leaves)
    excluded = {id(t) for t in stage_inputs}
    for root in roots:
        if root.grad_fn is None:  # a root that is itself a leaf: a weight, unless it is an input
            if root.requires_grad and id(root) not in excluded:
                claim(root, {id(root): root})
        elif not on_path[root.grad_fn]:
            claim(root, under[root.grad_fn])
    return groups, disjoint


def gradients_asked_for(ctx: Any) -> tuple[bool, ...]:
    """Which input gradients the running backward pass needs from a custom ``autograd.Function``.

    ``ctx.needs_input_grad`` says which inputs required grad when the forward ran,
    the same in every pass. A pass restricted with ``inputs=`` -- a zero-bubble
    schedule's ``I`` and ``W`` -- needs fewer; autograd's own kernels skip the rest,
    and a Function whose backward computes only what this returns does too::

        want_input, want_weight = gradients_asked_for(ctx)[:2]

    Asks the engine whether it will run the node each gradient flows to; inside
    ``torch.autograd.grad``, which cannot tell for leaves, it is ``needs_input_grad``.
    """
    will_run = torch._C._will_engine_execute_node  # private; no public equivalent in torch 2.13
    try:
        return tuple(
            bool(needs) and node is not None and bool(will_run(node))
            for needs, (node, _) in zip(ctx.needs_input_grad, ctx.next_functions)
        )
    except RuntimeError:
        return tuple(bool(needs) for needs in ctx.needs_input_grad)


def graph_leaves(roots: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """The leaves (tensors autograd accumulates into) reachable from ``roots``, but ``exclude``.

    Found by walking the graph, so parameters the user's step used around the
    Sequential (a loss head on the last stage) count like the stage's own: a
    parameter list would miss them and leave their gradients silently zero.
    """
    excluded = {id(t) for t in exclude}
    leaves: list[torch.Tensor] = []
    seen: set[Node] = set()
    stack = []
    for root in roots:
        if root.grad_fn is not None:
            stack.append(root.grad_fn)
        elif root.requires_grad and id(root) not in excluded:  # a root that is itself a leaf
            leaves.append(root)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or child in seen:
                continue
            seen.add(child)
            variable = getattr(child, "variable", None)  # set on AccumulateGrad nodes only
            if variable is None:
                stack.append(child)
            elif id(variable) not in excluded:
                leaves.append(variable)
    return leaves
