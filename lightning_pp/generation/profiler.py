"""Profiling the first stage's chunk latency and sharing the fit: the chunk predictor's start-up.

:mod:`lightning_pp.generation.chunking` holds the cost model, its fit and the
planner; this module runs the stage to measure it. The first stage times
chunks of several lengths after several cached prefixes, going through the same
launch path as generation (:func:`~lightning_pp.generation.stage.resolve_input_ids`),
fits the model, and every stage receives the outcome, success or not, so all of
them plan the same chunks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lightning_pp.generation.chunking import (
    ChunkPlanner,
    LatencyModel,
    fit_latency,
    profile_grid,
    profile_latency,
    share_latency_model,
)
from lightning_pp.generation.kv_cache import KVCache, StepRows
from lightning_pp.generation.stage import StageContext, StageParts, resolve_input_ids
from lightning_pp.platform import current_platform

__all__ = ["init_chunk_planner"]

def init_chunk_planner(
    parts: StageParts,
    stage: StageContext,
    *,
    first_chunk: int,
    profile_sizes: Optional[Sequence[int]] = None,
    profile_prefixes: Optional[Sequence[int]] = None,
    align: int = 1,
) -> tuple[ChunkPlanner, Optional[str]]:
    """Profiles the first stage, fits the latency model, and shares it with every stage.

    All stages must call this together. Returns the planner and, if the predictor
    could not be used, why (every stage then falls back to fixed chunks of ``first_chunk``).

    Args:
        parts: this stage's pieces (the first stage's are profiled).
        stage: the rank's pipeline position and channels.
        first_chunk: the first chunk of every prompt, and the fixed chunk of the fallback.
        profile_sizes: chunk lengths to time (default ``first_chunk / 2`` to ``4 first_chunk``).
        profile_prefixes: cached prefixes to time them after (default ``0``,
            ``2 first_chunk`` and ``4 first_chunk``); see :mod:`lightning_pp.generation.chunking`.
        align: chunk lengths after the first are multiples of it.

    With data-parallel attention the first stages of all attention-DP ranks
    profile together (their layers share collectives), and the fit of attention-DP
    rank 0 is then shared over the group, so every rank plans the same chunks.
    """
    model: Optional[LatencyModel] = None
    reason: Optional[str] = None
    if stage.pp_rank == 0:
        sizes = list(profile_sizes or range(first_chunk // 2 or 1, 4 * first_chunk + 1, max(first_chunk // 2, 1)))
        prefixes = list(profile_prefixes if profile_prefixes is not None else (0, 2 * first_chunk, 4 * first_chunk))
        try:
            profiler = _ChunkProfiler(parts, stage, prefill_chunk=first_chunk)
            points = profile_grid(sizes, prefixes)
            ps, ns, ys = profile_latency(profiler.run, points, setup=profiler.setup, device=stage.device)
            model = fit_latency(ns, ys, prefixes=ps)
        except (ValueError, RuntimeError) as error:  # a failed profile falls back; it must not stop the stage
            reason = f"{type(error).__name__}: {error}"
    group = stage.control_group if stage.pp_size > 1 else None
    model = share_latency_model(model, src=stage.first_stage_rank, group=group)
    dp = stage.attn_dp_group
    if dp is not None and dp.size > 1:
        model = share_latency_model(model, src=dp.global_rank_of(0), group=dp.cpu_group)
    # The shared outcome decides: a rank whose own fit failed may still get one.
    reason = None if model is not None else reason or "the first stage's profile failed"
    return ChunkPlanner(first_chunk, model, align=align), reason


class _ChunkProfiler:
    """Runs the first stage on one chunk of ``n`` tokens after a cached prefix of ``p``.

    ``setup(p, n)`` (untimed) puts a cache holding ``p`` tokens in place: it is
    prefilled once per prefix, in chunks of ``prefill_chunk`` as generation would
    (one forward over a long prefix would build a ``p x p`` score matrix), and
    truncated back to ``p`` tokens before every timed chunk, which would otherwise
    leave its keys behind. ``run(p, n)`` goes through the launch path: host ids resolved
    by :func:`resolve_input_ids` (the seed's profiler saw ``None`` ids).
    """

    def __init__(self, parts: StageParts, stage: StageContext, *, prefill_chunk: int) -> None:
        self.parts, self.stage = parts, stage
        self.platform = stage.platform or current_platform()
        self.vocab = max(parts.vocab_size, 1)
        self.prefill_chunk = max(prefill_chunk, 1)
        self._prefix = -1
        self._caches: list[KVCache] = []

    @torch.no_grad()
    def _forward(self, start: int, n: int) -> None:
        host_ids = self.platform.pin(torch.arange(start, start + n, dtype=torch.long) % self.vocab)
        ids = resolve_input_ids(host_ids, self.stage.device, self.platform)
        hidden, residual = self.parts.embed(ids)  # type: ignore[misc]
        # With data-parallel attention every attention-DP rank profiles the same points together.
        dp_rows = (n,) * self.stage.attn_dp_size if self.stage.attn_dp_size > 1 else None
        rows = StepRows((0,), (n,), (start,), dp_num_rows=dp_rows)
        for layer, cache in zip(self.parts.layers, self._caches):
            hidden, residual = layer(hidden, residual, rows=rows, cache=cache)

    def setup(self, prefix: int, n: int) -> None:
        if prefix != self._prefix:
            self._caches = [KVCache() for _ in self.parts.layers]
            for start in range(0, prefix, self.prefill_chunk):
                self._forward(start, min(self.prefill_chunk, prefix - start))
            self._prefix = prefix
        for cache in self._caches:
            cache.truncate(0, prefix)  # forget the last timed chunk: positions past the prefix are rewritten

    def run(self, prefix: int, n: int) -> None:
        self._forward(prefix, n)
