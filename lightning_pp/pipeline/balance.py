"""Stage boundaries from measured layer times instead of parameter counts.

The slowest stage sets the pace of a pipeline, and parameter counts say little about
time: an attention layer over a long sequence costs far more than its weights
suggest, an embedding far less. :func:`profile_layer_times` measures each layer's
forward + backward on the target device, one layer at a time (so the device needs
room for one layer and its activations, not the model), and
:func:`balance_by_time` turns the times into per-stage layer counts that minimise
the slowest stage -- the ``balance`` argument of ``PPStrategy``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_pp.distributed.p2p import flatten_payload, unflatten_payload
from lightning_pp.pipeline.split import plan_stage_split
from lightning_pp.platform import Platform, platform_for
from lightning_pp.tree import map_tensors

__all__ = ["balance_by_time", "profile_layer_times"]


def _detached_input(payload: Any) -> Any:
    structure, tensors = flatten_payload(payload, where="a layer output")
    fresh = [
        None if t is None else t.detach().requires_grad_(t.is_floating_point() or t.is_complex())
        for t in tensors
    ]
    return unflatten_payload(structure, fresh)


def _backward_all(output: Any) -> None:
    tensors = [t for t in flatten_payload(output, where="a layer output")[1] if t is not None and t.requires_grad]
    if tensors:
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])


def profile_layer_times(
    sequential: nn.Sequential,
    sample_input: Any,
    device: torch.device,
    *,
    repeats: int = 3,
    platform: Optional[Platform] = None,
) -> list[float]:
    """Seconds of forward + backward of each layer on ``device``, for ``sample_input``.

    Each layer is moved to ``device``, timed (one warm-up run is dropped, then the
    median of ``repeats``), and moved back where it was; the next layer gets this
    layer's output as input. Gradients the runs leave on parameters are cleared.
    """
    platform = platform or platform_for(device)
    times = []
    x = _to(sample_input, device)
    for layer in sequential.children():
        home = next((p.device for p in layer.parameters()), None)
        layer.to(device)
        samples = []
        out = None
        for run in range(repeats + 1):
            inp = _detached_input(x)
            platform.synchronize(device)
            start = time.perf_counter()
            out = layer(inp)
            _backward_all(out)
            platform.synchronize(device)
            if run:  # the first run warms up allocators and kernels
                samples.append(time.perf_counter() - start)
        for p in layer.parameters():
            p.grad = None
        if home is not None:
            layer.to(home)
        times.append(statistics.median(samples))
        x = _detached_input(out)
    return times


def balance_by_time(times: Sequence[float], num_stages: int) -> list[int]:
    """Layers per stage minimising the slowest stage's total time."""
    return [len(r) for r in plan_stage_split(times, num_stages)]


def _to(payload: Any, device: torch.device) -> Any:
    return map_tensors(lambda t: t.to(device), payload)
