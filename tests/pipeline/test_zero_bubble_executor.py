"""ZB-H1 on real gloo ranks: the split backward (I, then W) gives one device's gradients.

Each rank runs :class:`PipelineExecutor` on its stage of the same small model, once
with 1F1B and once with ZB-H1, and returns its gradients; the parent compares them
with one process back-propagating the whole batch (rtol 1e-5) and with 1F1B
(bit for bit: the split computes the same products and accumulates microbatches
in the same order). The model has parameters the stages do not hold, used by the
step around the pipelined Sequential (a scale before it, a head after it), so a
``W`` that looked only at the stage's own parameters would miss them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.pipeline.backward_split import gradients_asked_for
from lightning_pp.pipeline.executor import PipelineExecutor
from lightning_pp.pipeline.schedules import build_schedule, peak_live_activations

from blocking import RendezvousTransport
from multirank import run_on_ranks
from saved_tensors import SavedTensors

pytestmark = pytest.mark.slow

DIM, ROWS, LAYERS_PER_STAGE = 6, 11, 2


class _Scale(torch.autograd.Function):
    """``x * weight``, computing and recording only the gradients each backward pass asks for."""

    calls: list[tuple[bool, bool]] = []

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, Any]:
        x, weight = ctx.saved_tensors
        asked = gradients_asked_for(ctx)
        _Scale.calls.append(asked)
        grad_x = grad * weight if asked[0] else None
        grad_w = (grad * x).sum(dim=(0, 1)) if asked[1] else None
        return grad_x, grad_w


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Scale.apply(x, self.weight)


def _model(pp: int) -> tuple[nn.Parameter, nn.Sequential, nn.Parameter]:
    torch.manual_seed(0)
    pre = nn.Parameter(torch.randn(DIM))
    layers = []
    for _ in range(pp):  # each stage: its input goes through Scale first, then Linear + Tanh layers
        layers += [Scale()] + [nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(LAYERS_PER_STAGE)]
    head = nn.Parameter(torch.randn(DIM, 3))
    return pre, nn.Sequential(*layers), head


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(ROWS, 4, DIM, generator=g), torch.randn(ROWS, 4, 3, generator=g)


def _loss(x: torch.Tensor, y: torch.Tensor, pre: torch.Tensor, call: Any, head: torch.Tensor) -> torch.Tensor:
    return ((call(x * pre) @ head - y) ** 2).mean()


class _PeakSampler:
    """Stands in for the executor's trace recorder: counts the saved tensors alive after every action."""

    active = True

    def __init__(self, saved: SavedTensors) -> None:
        self.saved, self.peak = saved, 0

    def now(self) -> float:
        return 0.0

    def record(self, action: Any, start: float, end: float) -> None:
        self.peak = max(self.peak, self.saved.alive())


def _rank(rank: int, world: int, m: int, blocking: bool) -> dict:
    pre, layers, head = _model(world)
    stage = layers[rank * (LAYERS_PER_STAGE + 1) : (rank + 1) * (LAYERS_PER_STAGE + 1)]
    params = list(stage.parameters()) + ([pre] if rank == 0 else []) + ([head] if rank == world - 1 else [])
    x, y = _data()
    xs, ys = torch.tensor_split(x, m), torch.tensor_split(y, m)
    transport = RendezvousTransport(timeout=30.0) if blocking else None
    comm = PipeComm(dist.group.WORLD, torch.device("cpu"), transport=transport)
    out: dict = {}
    for name in ("1f1b", "zbh1"):
        for p in params:
            p.grad = None
        _Scale.calls.clear()
        schedule = build_schedule(name, world, m)
        executor = PipelineExecutor({rank: stage}, schedule, rank, comm)
        saved = SavedTensors()
        sampler = _PeakSampler(saved)
        executor.tracer = sampler  # type: ignore[assignment]

        def step_fn(k: int, call: Any) -> torch.Tensor:
            return _loss(xs[k], ys[k], pre, call, head)

        def loss_fn(k: int, loss: torch.Tensor) -> torch.Tensor:
            return loss * (xs[k].shape[0] / ROWS)

        with saved.hooks():
            results = executor.run(step_fn, loss_fn)
        out[name] = {
            "grads": [p.grad.clone() for p in params],
            "losses": [float(results[k].detach()) for k in sorted(results)],
            "peak": executor.peak_live_activations,
            "planned_peak": peak_live_activations(schedule)[rank],
            "saved_alive_after": saved.alive(),
            "saved_peak": sampler.peak,
            "scale_calls": list(_Scale.calls),
        }
    return out


def _reference(world: int, m: int) -> tuple[list[torch.Tensor], list[float]]:
    pre, layers, head = _model(world)
    x, y = _data()
    losses = []
    for xk, yk in zip(torch.tensor_split(x, m), torch.tensor_split(y, m)):
        loss = _loss(xk, yk, pre, layers, head)
        (loss * (xk.shape[0] / ROWS)).backward()
        losses.append(float(loss.detach()))
    return [p.grad for p in [pre, *layers.parameters(), head]], losses


@pytest.mark.parametrize(
    "world,m,blocking",
    [(2, 5, False), (4, 3, False), (4, 6, True)],
    ids=["pp2-m5", "pp4-m3-fewer-microbatches-than-stages", "pp4-m6-blocking-sends"],
)
def test_zbh1_gradients_equal_one_device_and_1f1b(world, m, blocking):
    results = run_on_ranks(_rank, world, m, blocking, timeout=180)
    ref_grads, ref_losses = _reference(world, m)
    per_stage = len(list(_model(world)[1][: LAYERS_PER_STAGE + 1].parameters()))
    for rank, result in enumerate(results):
        zb, one = result["zbh1"], result["1f1b"]
        assert len(zb["grads"]) == len(one["grads"])
        for a, b in zip(zb["grads"], one["grads"]):
            assert torch.equal(a, b), f"rank {rank}: ZB-H1's gradients differ from 1F1B's"
        # The same parameters in the reference's order: [pre, stage 0, stage 1, ..., head].
        stage_grads = zb["grads"][:per_stage]
        ref_stage = ref_grads[1 + rank * per_stage : 1 + (rank + 1) * per_stage]
        for a, b in zip(stage_grads, ref_stage):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        if rank == 0:
            torch.testing.assert_close(zb["grads"][per_stage], ref_grads[0], rtol=1e-5, atol=1e-7)
        if rank == world - 1:
            torch.testing.assert_close(zb["grads"][-1], ref_grads[-1], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(zb["losses"], ref_losses, rtol=1e-6, atol=0)
            assert zb["losses"] == one["losses"]
        # Activations live from F to W: the executor held what the plan says, min(p, m) on every rank.
        assert zb["peak"] == zb["planned_peak"] == min(world, m)
        assert one["peak"] == one["planned_peak"] == min(world - rank, m)
        # Every W released the graph its I kept: nothing saved for backward outlives the step, and at
        # the peak the tensors saved for backward are those of the planned number of microbatches.
        assert zb["saved_alive_after"] == 0 and one["saved_alive_after"] == 0
        assert zb["saved_peak"] * one["planned_peak"] == one["saved_peak"] * zb["planned_peak"] > 0
        # The split is real: on stages that receive their input, I asked the first layer for the input
        # gradient only and W for the weight gradient only; the first stage runs its whole backward in W.
        whole = [(True, True)] * m
        assert one["scale_calls"] == whole
        split = sorted([(False, True)] * m + [(True, False)] * m)
        assert sorted(zb["scale_calls"]) == (whole if rank == 0 else split)
