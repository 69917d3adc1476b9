"""Chunked prefill sized by a latency predictor.

A long prompt is prefilled in chunks so that decode steps of other sequences are
not stalled behind it. Equal-*token* chunks get slower as the prefix grows (each
chunk's queries attend over everything before it), so chunks are sized for equal
*time* instead, as SGLang's dynamic chunking does:

1. the first stage times its forward on chunks of ``n`` tokens after cached
   prefixes of ``p`` tokens, over a grid of ``(p, n)`` (the first, warm-up, sample
   dropped), and fits the chunk cost model
   ``latency(p, n) ≈ a·n·(p + n) + b·n + c`` (the ``n`` queries attend over
   ``p + n`` keys) by least squares on the features ``[n (p + n), n, 1]``.
   Profiling fresh chunks only (``p = 0``) would leave ``a`` to the curvature of
   ``a n² + b n``, which on a CPU drowns in the linear term and the noise; the
   prefixes make the attention term ``a n p`` large enough to measure. ``a > 0``
   is required (a cost that does not grow with the prefix cannot size chunks, and
   usually means the timings were noise);
2. the fit is shared with every stage: a success flag is broadcast *first*, then
   the coefficients only on success, so a failed profile makes every stage fall
   back to fixed chunks instead of some waiting for coefficients never sent;
3. the planner picks, after a prefix ``p``, the ``n`` whose cost equals the first
   chunk's, ``a n² + (a p + b) n = a n0² + b n0``, aligned down.

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

__all__ = [
    "ChunkPlanner",
    "FitError",
    "LatencyModel",
    "fit_latency",
    "plan_chunks",
    "profile_grid",
    "profile_latency",
    "share_latency_model",
]


class FitError(ValueError):
    """The latency samples do not give a usable quadratic."""


@dataclass(frozen=True)
class LatencyModel:
    """``a·n·(p + n) + b·n + c`` seconds for a chunk of ``n`` tokens after ``p`` cached ones.

    Called with ``n`` alone it is the fresh-chunk latency ``a·n² + b·n + c``.
    """

    a: float
    b: float
    c: float

    def __call__(self, n: float) -> float:
        return self.a * n * n + self.b * n + self.c

    def chunk_cost(self, prefix: int, n: int) -> float:
        """Predicted time of ``n`` tokens after ``prefix`` cached ones."""
        return self.a * n * (prefix + n) + self.b * n + self.c


def fit_latency(
    sizes: Sequence[int], latencies: Sequence[float], *, prefixes: Optional[Sequence[int]] = None
) -> LatencyModel:
    """Least-squares fit of the chunk cost model to ``(prefix, size, latency)`` samples.

    Args:
        sizes: each sample's chunk length ``n``.
        latencies: each sample's seconds.
        prefixes: each sample's cached prefix ``p``; all ``0`` (fresh chunks) by default.

    Raises:
        FitError: fewer than three distinct ``(p, n)`` points (or points that cannot
            separate the three coefficients), non-finite values, ``a <= 0``, or a
            cost that falls as the chunk grows somewhere in the profiled range.
    """
    prefixes = [0] * len(sizes) if prefixes is None else list(prefixes)
    points = set(zip(prefixes, sizes))
    if len(points) < 3 or not len(sizes) == len(latencies) == len(prefixes):
        raise FitError(
            f"need latencies at three or more distinct (prefix, chunk size) points, got {sorted(points)} "
            f"for {len(latencies)} latencies."
        )
    n = torch.tensor(sizes, dtype=torch.float64)
    p = torch.tensor(prefixes, dtype=torch.float64)
    y = torch.tensor(latencies, dtype=torch.float64)
    if not torch.isfinite(y).all():
        raise FitError("latency samples contain NaN or infinity.")
    design = torch.stack([n * (p + n), n, torch.ones_like(n)], dim=1)
    if int(torch.linalg.matrix_rank(design)) < 3:
        raise FitError(f"the points {sorted(points)} cannot separate the three coefficients: vary the chunk sizes.")
    a, b, c = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    if not a > 0:
        raise FitError(
            f"fitted a={a:.3g} is not positive: latency does not grow with the chunk's attention span n·(p + n)."
        )
    smallest, p0 = float(n.min()), float(p.min())
    # d cost / dn = a (p + 2n) + b is smallest at the smallest profiled n and p.
    if not a * (p0 + 2 * smallest) + b > 0:
        # A fit that falls over part of the profiled range (b far below zero) says the
        # timings are dominated by noise or fixed overhead; sizing chunks from it gave
        # chunks of a few tokens on CPU. Fixed chunks are the honest answer then.
        raise FitError(
            f"fitted latency {a:.3g}·n·(p + n) + {b:.3g}·n + {c:.3g} decreases between n={smallest:g} and "
            f"n={-(b + a * p0) / (2 * a):.0f} (p={p0:g}): the timings do not support equal-time chunks."
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
        n = (
            first_chunk
            if model is None or prefix == 0
            else _equal_time_chunk(model, prefix, first_chunk, align, min_chunk)
        )
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


def profile_grid(sizes: Sequence[int], prefixes: Sequence[int]) -> list[tuple[int, int]]:
    """``(prefix, size)`` points to profile: every size after every prefix, prefixes ascending.

    Ascending prefixes let a profiler build each cached prefix once.
    """
    if not sizes or not prefixes or min(sizes) < 1 or min(prefixes) < 0:
        raise ValueError(
            f"profile sizes must be positive and prefixes non-negative, got {list(sizes)} and {list(prefixes)}."
        )
    return [(p, n) for p in sorted(set(prefixes)) for n in sizes]


def profile_latency(
    run: Callable[[int, int], None],
    points: Sequence[tuple[int, int]],
    *,
    setup: Optional[Callable[[int, int], None]] = None,
    repeats: int = 1,
    device: Optional[torch.device] = None,
) -> tuple[list[int], list[int], list[float]]:
    """Times ``run(prefix, n)`` at each point; the very first call is a warm-up and is not recorded.

    ``setup(prefix, n)``, when given, runs untimed before each call (a profiler
    puts the cached prefix in place there). ``run`` must resolve its inputs the
    same way a real launch does (the seed's profiler ran with input ids that a
    deferred copy had not filled in yet).

    Returns:
        ``(prefixes, sizes, seconds)``, one entry per timed call.
    """
    platform = current_platform()  # module level: valid whenever this is called

    def call(prefix: int, n: int) -> float:
        if setup is not None:
            setup(prefix, n)
        platform.synchronize(device)
        start = time.perf_counter()
        run(prefix, n)
        platform.synchronize(device)
        return time.perf_counter() - start

    call(*points[0])  # warm-up: allocator, kernels, caches
    ps, ns, ys = [], [], []
    for prefix, n in points:
        for _ in range(repeats):
            ys.append(call(prefix, n))
            ps.append(prefix)
            ns.append(n)
    return ps, ns, ys


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
    coeffs = torch.tensor(
        [model.a, model.b, model.c] if model is not None and dist.get_rank() == src else [0.0] * 3,
        dtype=torch.float64,
    )
    dist.broadcast(coeffs, src=src, group=group)
    return LatencyModel(*coeffs.tolist())
