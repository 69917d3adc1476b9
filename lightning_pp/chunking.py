"""Chunked prefill sized by a latency predictor.

A long prompt is prefilled in chunks so that decode steps of other sequences are
not stalled behind it. Equal-*token* chunks get slower as the prefix grows (each
chunk's queries attend over everything before it), so chunks are sized for equal
*time* instead, as SGLang's dynamic chunking does:

1. the first stage times its forward for fresh sequences of ``n`` tokens over a
   range of ``n`` (the first, warm-up, sample dropped) and fits
   ``latency(n) ≈ a·n² + b·n + c``; ``a > 0`` is required (a line or a concave fit
   cannot size chunks, and usually means the timings were noise);
2. the fit is shared with every stage: a success flag is broadcast *first*, then
   the coefficients only on success, so a failed profile makes every stage fall
   back to fixed chunks instead of some waiting for coefficients never sent;
3. a chunk of ``n`` tokens after a prefix of ``p`` costs about
   ``a·n·(p + n) + b·n + c`` (its ``n`` queries attend over ``p + n`` keys; the
   fresh-prompt fit is the case ``p = 0``); the planner picks the ``n`` whose cost
   equals the first chunk's, ``a n² + (a p + b) n = a n0² + b n0``, aligned down.

Device synchronisation uses the module-level platform (:func:`current_platform`),
never state set on an object later in start-up (the seed's init-order bug: the
profiler ran before ``self.device_module`` existed and silently disabled itself).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from lightning_pp.platform import current_platform

__all__ = ["ChunkPlanner", "LatencyModel", "fit_latency", "plan_chunks", "profile_latency", "share_latency_model"]


class FitError(ValueError):
    """The latency samples do not give a usable quadratic."""


@dataclass(frozen=True)
class LatencyModel:
    """``latency(n) = a·n² + b·n + c`` seconds for a chunk of ``n`` fresh tokens."""

    a: float
    b: float
    c: float

    def __call__(self, n: float) -> float:
        return self.a * n * n + self.b * n + self.c

    def chunk_cost(self, prefix: int, n: int) -> float:
        """Predicted time of ``n`` tokens after ``prefix`` cached ones."""
        return self.a * n * (prefix + n) + self.b * n + self.c


def fit_latency(sizes: Sequence[int], latencies: Sequence[float]) -> LatencyModel:
    """Least-squares quadratic through ``(size, latency)`` samples.

    Raises:
        FitError: fewer than three distinct sizes, non-finite values, or ``a <= 0``.
    """
    if len(set(sizes)) < 3 or len(sizes) != len(latencies):
        raise FitError(f"need latencies at three or more distinct chunk sizes, got sizes {list(sizes)}.")
    x = torch.tensor(sizes, dtype=torch.float64)
    y = torch.tensor(latencies, dtype=torch.float64)
    if not torch.isfinite(y).all():
        raise FitError("latency samples contain NaN or infinity.")
    design = torch.stack([x * x, x, torch.ones_like(x)], dim=1)
    a, b, c = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    if not a > 0:
        raise FitError(f"fitted a={a:.3g} is not positive: latency does not grow quadratically with chunk size.")
    smallest = float(x.min())
    if not 2 * a * smallest + b > 0:
        # A fit that falls over part of the profiled range (b far below zero) says the
        # timings are dominated by noise or fixed overhead; sizing chunks from it gave
        # chunks of a few tokens on CPU. Fixed chunks are the honest answer then.
        raise FitError(
            f"fitted latency {a:.3g}·n² + {b:.3g}·n + {c:.3g} decreases between n={smallest:g} and "
            f"n={-b / (2 * a):.0f}: the timings do not support equal-time chunks."
        )
    return LatencyModel(a, b, c)


def plan_chunks(
    model: Optional[LatencyModel], prompt_len: int, *, first_chunk: int, align: int = 1, min_chunk: int = 1
) -> list[int]:
    """Chunk lengths for a prompt of ``prompt_len`` tokens (they sum to it).

    With ``model=None`` (no usable profile) every chunk is ``first_chunk`` tokens.
    Otherwise each chunk costs about as much as the first, per the model.
    """
    if first_chunk < 1:
        raise ValueError(f"first_chunk must be positive, got {first_chunk}.")
    chunks, prefix = [], 0
    while prefix < prompt_len:
        n = first_chunk if model is None or prefix == 0 else _equal_time_chunk(model, prefix, first_chunk, align, min_chunk)
        n = min(n, prompt_len - prefix)
        chunks.append(n)
        prefix += n
    return chunks


def _equal_time_chunk(model: LatencyModel, prefix: int, first_chunk: int, align: int, min_chunk: int) -> int:
    a, b = model.a, model.b
    target = a * first_chunk * first_chunk + b * first_chunk
    linear = a * prefix + b
    n = (-linear + math.sqrt(max(linear * linear + 4 * a * target, 0.0))) / (2 * a)
    n = int(n) // align * align
    return max(n, min_chunk, 1)


class ChunkPlanner:
    """Chunk sizes for prompts: fixed, or equal-time from a shared :class:`LatencyModel`."""

    def __init__(self, first_chunk: int, model: Optional[LatencyModel] = None, *, align: int = 1) -> None:
        self.first_chunk, self.model, self.align = first_chunk, model, align

    def next_chunk(self, prefix: int, remaining: int) -> int:
        """Length of the chunk after ``prefix`` prefilled tokens, ``remaining`` still to go."""
        if self.model is None or prefix == 0:
            return min(self.first_chunk, remaining)
        return min(_equal_time_chunk(self.model, prefix, self.first_chunk, self.align, self.align), remaining)


def profile_latency(
    run: Callable[[int], None], sizes: Sequence[int], *, repeats: int = 1, device: Optional[torch.device] = None
) -> tuple[list[int], list[float]]:
    """Times ``run(n)`` for each size; the very first call is a warm-up and is not recorded.

    ``run`` must resolve its inputs the same way a real launch does (the seed's
    profiler ran with input ids that a deferred copy had not filled in yet).
    """
    platform = current_platform()  # module level: valid whenever this is called
    run(sizes[0])  # warm-up: allocator, kernels, caches
    platform.synchronize(device)
    xs, ys = [], []
    for n in sizes:
        for _ in range(repeats):
            platform.synchronize(device)
            start = time.perf_counter()
            run(n)
            platform.synchronize(device)
            xs.append(n)
            ys.append(time.perf_counter() - start)
    return xs, ys


def share_latency_model(
    model: Optional[LatencyModel], *, src: int, group: Optional[dist.ProcessGroup]
) -> Optional[LatencyModel]:
    """Broadcasts the first stage's fit (``None`` = failed) to every rank of ``group``.

    The success flag goes first, and the coefficients only when it is set: every
    rank learns the outcome from the same first message, so a failed profile
    cannot leave other ranks waiting for coefficients.

    Args:
        model: the fit on ``src``; ignored elsewhere.
        src: the *global* rank of the profiling stage.
        group: a CPU-backend group (gloo); ``None`` when not distributed.
    """
    if group is None or not dist.is_initialized():
        return model
    ok = torch.tensor([1 if model is not None else 0], dtype=torch.int64)  # only src's value counts
    dist.broadcast(ok, src=src, group=group)
    if not int(ok.item()):
        return None
    coeffs = torch.tensor([model.a, model.b, model.c] if model is not None and dist.get_rank() == src else [0.0] * 3, dtype=torch.float64)
    dist.broadcast(coeffs, src=src, group=group)
    return LatencyModel(*coeffs.tolist())
