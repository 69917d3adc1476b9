"""The split backward (I, then W) against one whole backward, in one process.

Every case builds the same stage twice from one seed, back-propagates one copy
whole and the other as ``I`` then ``W``, and compares every gradient bit for bit:
the split computes the same products from the same gradients. A counting layer
shows that ``W`` computes no activation gradient again.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn

from lightning_pp.pipeline.backward_split import SplitBackward, gradients_asked_for, graph_leaves

from saved_tensors import SavedTensors

DIM = 8


class _Counted(torch.autograd.Function):
    """``x * weight``; records which gradients each backward pass asked for."""

    calls: List[Tuple[bool, ...]] = []

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, weight = ctx.saved_tensors
        asked = gradients_asked_for(ctx)
        _Counted.calls.append(asked)
        return (grad * weight if asked[0] else None), ((grad * x).sum(0) if asked[1] else None)


class Counted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Counted.apply(x, self.weight)


class Shared(nn.Module):
    """One Linear applied twice: its weight hangs under two nodes of the input's path."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.linear(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class TwoOutputs(nn.Module):
    """Outputs a pair, one of which does not depend on the input (a root off the path)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, 2 * DIM)
        self.bias = nn.Parameter(torch.ones(DIM))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a, b = self.linear(x).chunk(2, dim=-1)  # a node with two outputs on the path
        return a * b, self.bias.exp()


STAGES: dict = {
    "counted-chain": lambda: nn.Sequential(Counted(), Counted(), Counted()),
    "mlp": lambda: nn.Sequential(*[nn.Sequential(nn.Linear(DIM, DIM), nn.GELU()) for _ in range(3)]),
    "residual+layernorm": lambda: nn.Sequential(Residual(), Residual()),
    "transformer-layer": lambda: nn.TransformerEncoderLayer(DIM, 2, 2 * DIM, dropout=0.0, batch_first=True),
    "two-outputs": TwoOutputs,
    "shared-weight": Shared,
}


def _run(make: Callable[[], nn.Module], split: bool, head: bool) -> Tuple[List[torch.Tensor], Any]:
    """Gradients of the stage (and a head after it, as on the last stage) and of its input."""
    torch.manual_seed(0)
    stage = make()
    head_weight = nn.Parameter(torch.randn(DIM, 3)) if head else None
    x = torch.randn(4, 5, DIM, requires_grad=True)
    out = stage(x)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(1)
    if head_weight is not None:
        roots = [(outs[0] @ head_weight).square().mean() + sum(o.square().mean() for o in outs[1:])]
        grads = None
    else:
        roots, grads = outs, [torch.randn(o.shape, generator=g) for o in outs]
    params = list(stage.parameters()) + ([head_weight] if head_weight is not None else [])
    if split:
        backward = SplitBackward(roots, grads, [x])
        backward.backward_input()
        input_grad = x.grad
        assert all(p.grad is None for p in params), "I must leave the weights alone"
        backward.backward_weight()
        assert x.grad is input_grad, "W must leave the input alone"
        result: Any = backward
    else:
        torch.autograd.backward(roots, grad_tensors=grads)
        result = None
    return [x.grad] + [p.grad for p in params], result


@pytest.mark.parametrize("head", [False, True], ids=["middle-stage", "last-stage-with-head"])
@pytest.mark.parametrize("name", STAGES)
def test_split_backward_gives_the_whole_backwards_gradients_bit_for_bit(name, head):
    whole, _ = _run(STAGES[name], split=False, head=head)
    split, backward = _run(STAGES[name], split=True, head=head)
    assert len(whole) == len(split)
    for i, (a, b) in enumerate(zip(whole, split)):
        assert a is not None and b is not None, f"gradient #{i} missing"
        assert torch.equal(a, b), f"gradient #{i} differs"
    # W starts from the kept gradients unless a weight hangs under two nodes of the path.
    assert backward.from_kept_gradients == (name != "shared-weight")


def test_w_computes_no_activation_gradient_again():
    _Counted.calls.clear()
    _run(STAGES["counted-chain"], split=True, head=False)
    i_calls, w_calls = _Counted.calls[:3], _Counted.calls[3:]
    assert i_calls == [(True, False)] * 3  # I: input gradients only
    assert w_calls == [(False, True)] * 3  # W: weight gradients only, no input gradient recomputed
    _Counted.calls.clear()
    _run(STAGES["counted-chain"], split=False, head=False)
    assert _Counted.calls == [(True, True)] * 3


def test_a_stage_without_inputs_to_differentiate_runs_the_whole_backward_in_w():
    torch.manual_seed(0)
    stage = nn.Sequential(Counted(), nn.Linear(DIM, DIM))
    out = stage(torch.randn(3, DIM))  # the first stage: its input needs no gradient
    backward = SplitBackward([out], [torch.ones_like(out)], [])
    backward.backward_input()
    assert all(p.grad is None for p in stage.parameters())
    backward.backward_weight()
    assert all(p.grad is not None for p in stage.parameters())


def test_the_graph_lives_from_i_to_w_and_not_after():
    saved = SavedTensors()
    torch.manual_seed(0)
    stage = STAGES["residual+layernorm"]()
    x = torch.randn(4, DIM, requires_grad=True)
    with saved.hooks():
        out = stage(x)
    backward = SplitBackward([out], [torch.ones_like(out)], [x])
    del out
    held = saved.alive()
    assert held > 0
    backward.backward_input()
    assert saved.alive() == held, "I keeps the graph for W"
    backward.backward_weight()
    del backward
    assert saved.alive() == 0, "nothing saved for backward outlives W"


def test_graph_leaves_finds_every_parameter_but_the_excluded():
    torch.manual_seed(0)
    stage, head = nn.Linear(DIM, DIM), nn.Parameter(torch.randn(DIM))
    x = torch.randn(2, DIM, requires_grad=True)
    loss = (stage(x) * head).sum()
    found: Sequence[torch.Tensor] = graph_leaves([loss], exclude=[x])
    assert {id(t) for t in found} == {id(stage.weight), id(stage.bias), id(head)}
    assert {id(t) for t in graph_leaves([loss])} == {id(stage.weight), id(stage.bias), id(head), id(x)}


def test_gradients_asked_for_follows_the_pass_and_falls_back_inside_autograd_grad():
    layer = Counted()
    x = torch.randn(2, DIM, requires_grad=True)
    y = layer(x).sum()
    _Counted.calls.clear()
    torch.autograd.backward(y, inputs=[x], retain_graph=True)
    torch.autograd.backward(y, inputs=[layer.weight], retain_graph=True)
    (grad_w,) = torch.autograd.grad(y, [layer.weight])  # the engine cannot tell for leaves here
    assert _Counted.calls == [(True, False), (False, True), (True, True)]
    assert torch.equal(grad_w, layer.weight.grad)
