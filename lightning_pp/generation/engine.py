"""Greedy KV-cached generation through a pipeline of decoder stages.

The sequences of a batch are dealt into ``M`` *slots* (microbatches); each
forward of a slot advances all of its live sequences by one step: a prefill
chunk of a prompt, or one decode token. Forwards are numbered as one stream
``g = 0, 1, 2, ...`` with ``g = step * M + slot`` and run on a
:class:`~lightning_pp.pipeline.streaming.StreamingPipeline`: stage ``s`` forwards ``g``
at tick ``g + s``, and the sampled tokens of ``g`` go from the last stage back
to the first over the same parity-ordered ring exchange as streaming predict.
Three stages, three slots (``a b c``), step numbers below::

    tick     0   1   2   3   4   5   6
    stage 0 a0  b0  c0  a1  b1  c1  a2     a1 needs a0's token: back after tick 2
    stage 1  .  a0  b0  c0  a1  b1  c1
    stage 2  .   .  a0  b0  c0  a1  b1 -> tokens of a0 to stage 0 after tick 2

With ``M = pp_size`` the tokens of a slot are back on the first stage exactly
in time for its next step, so the pipeline never idles while sequences remain.

Every stage keeps the KV cache of its own layers, per sequence. A stage learns
which sequences left a slot from the slot's next header (they are missing) and
frees their cache; when a slot has no live sequences left the first stage sends
a *sentinel* through it instead. Each stage decides whether forward ``g``
exists from what it has itself seen of slot ``g % M`` (its sentinel, if any),
so all stages agree without any extra message.

Deferred host-to-device copy: prompts stay on the host (pinned where the
platform copies asynchronously) until the rows of a forward are launched;
:func:`resolve_input_ids` is the only place that copies them, and the latency
profiler goes through it too.

Data-parallel attention (``StageContext.attn_dp_group`` of ``C > 1`` ranks, the
mesh's ``cp`` axis): ``C`` pipelines run side by side, each on its own share of
the prompts (:func:`~lightning_pp.parallel.dp_attention.share_prompts`), and the layers of a stage gather the rows of
all ``C`` for their MLP. So forward ``g`` of a stage must run on all ``C`` ranks
of that stage, with the same existence decisions everywhere. The first stages
decide together at launch, with one exchange of row counts
(:func:`~lightning_pp.parallel.dp_attention.gather_batch_info`)::

    rows of slot g % M      nobody has rows    I have none, a peer has some    I have rows
    forward g               sentinel (all C)   idle forward (zero rows)        real forward

so a slot closes at the same ``g`` on every attention-DP rank, and a rank whose
share ran out keeps joining every collective with idle forwards until all ranks
are done. The counts travel in the header (``dp_rows``), so later stages, whose
forwards follow the first stage's, do not exchange again. Each pipeline keeps the
parity-ordered ring of its own stages; the attention-DP collectives happen inside
a tick's compute, which every rank of a stage runs for the same ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.generation.chunking import (
    ChunkPlanner,
    LatencyModel,
    fit_latency,
    profile_grid,
    profile_latency,
    share_latency_model,
)
from lightning_pp.generation.kv_cache import KVCache, StepRows
from lightning_pp.parallel.dp_attention import gather_batch_info
from lightning_pp.pipeline.streaming import StreamingPipeline
from lightning_pp.platform import Platform, current_platform

__all__ = [
    "PipelineGenerator",
    "StageContext",
    "StageParts",
    "init_chunk_planner",
    "resolve_input_ids",
]


@dataclass(frozen=True)
class StageContext:
    """What a pipeline rank needs to take part in generation (built by the strategy).

    Attributes:
        pp_rank: position in the pipeline.
        pp_size: number of stages.
        comm: point-to-point channel (``None`` with one stage).
        device: this rank's device.
        platform: its device facts.
        control_group: a CPU-backend group over the pipeline, for the predictor broadcast.
        first_stage_rank: global rank of pipeline rank 0.
        attn_dp_group: the attention-DP group (the mesh's ``cp`` group with
            ``attention_mode="data"``): the ranks of this stage that run their own
            sequences through layers sharing one MLP. ``None`` (or a group of one):
            no data-parallel attention.
        attn_tp_size: attention tensor-parallel size, for the row-count exchange.
        num_microbatches: the microbatches the strategy was asked for
            (``PPStrategy(num_microbatches=...)``), ``None`` when not set.
    """

    pp_rank: int = 0
    pp_size: int = 1
    comm: Optional[PipeComm] = None
    device: torch.device = torch.device("cpu")
    platform: Optional[Platform] = None
    control_group: Optional[dist.ProcessGroup] = None
    first_stage_rank: int = 0
    attn_dp_group: Optional[ParallelGroup] = None
    attn_tp_size: int = 1
    num_microbatches: Optional[int] = None

    @property
    def attn_dp_size(self) -> int:
        """Ranks of the attention-DP group (1 without data-parallel attention)."""
        return self.attn_dp_group.size if self.attn_dp_group is not None else 1


@dataclass
class StageParts:
    """The model pieces one stage runs: ``embed`` on the first, ``head`` on the last."""

    layers: list[nn.Module]
    embed: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    vocab_size: int = 0


def resolve_input_ids(host_ids: Optional[torch.Tensor], device: torch.device, platform: Platform) -> torch.Tensor:
    """Copies a launching forward's token ids from the host to ``device``.

    The one place ids cross to the device: real launches and the profiler both
    call it, so neither can run on ids a deferred copy has not produced yet.
    """
    if host_ids is None:
        raise RuntimeError("token ids of a launching forward are missing (deferred host-to-device copy not resolved).")
    return platform.to_device(host_ids, device)


_HEADER_KEYS = ("slot", "seq_ids", "num_new", "start", "sample", "dp_rows")


@dataclass
class _Sequence:
    seq_id: int
    prompt: torch.Tensor  # host, pinned where useful
    consumed: int = 0
    generated: list[int] = field(default_factory=list)
    done: bool = False


class PipelineGenerator:
    """One rank's part of greedy generation (see the module docstring).

    Args:
        parts: this stage's layers, plus ``embed`` (first stage) and ``head`` (last stage).
        stage: the rank's pipeline position and channels.
        max_new_tokens: longest continuation.
        eos_token_ids: tokens that end a sequence (kept in its output).
        planner: prefill chunk sizes; ``None`` prefills a prompt in one forward.
        num_microbatches: slots in flight; at least ``pp_size`` (the default).
    """

    def __init__(
        self,
        parts: StageParts,
        stage: StageContext,
        *,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        planner: Optional[ChunkPlanner] = None,
        num_microbatches: Optional[int] = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        self.num_slots = num_microbatches or stage.pp_size
        if self.num_slots < stage.pp_size:
            raise ValueError(
                f"num_microbatches={self.num_slots} is fewer than the {stage.pp_size} stages: a slot's tokens would "
                "not be back on the first stage in time for its next step. Use at least pp_size microbatches."
            )
        self.parts, self.stage = parts, stage
        self.platform = stage.platform or current_platform()
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.planner = planner
        self.first, self.last = stage.pp_rank == 0, stage.pp_rank == stage.pp_size - 1
        if self.first and parts.embed is None or self.last and parts.head is None:
            raise ValueError("the first stage needs `embed` and the last stage needs `head`.")
        self._attn_dp = stage.attn_dp_group if stage.attn_dp_size > 1 else None
        #: Forwards of this stage that ran with no rows of its own (data-parallel attention).
        self.num_idle_forwards = 0

    # -- driver -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor]) -> Optional[list[list[int]]]:
        """Generates for every prompt (all stages call it with the same prompts).

        With data-parallel attention, each attention-DP rank passes its own share
        (possibly empty), and every rank of the group must call this together.

        Returns:
            On the first stage, each prompt's generated ids (EOS included when hit);
            ``None`` on other stages.
        """
        m = self.num_slots
        seqs = [
            _Sequence(i, self.platform.pin(torch.as_tensor(p, dtype=torch.long).flatten().cpu()))
            for i, p in enumerate(prompts)
        ]
        for s in seqs:
            if s.prompt.numel() == 0:
                raise ValueError(f"prompt {s.seq_id} is empty: every sequence needs at least one token.")
        self._slots = [seqs[j::m] for j in range(m)]  # round-robin: long and short prompts mix
        self._caches = [KVCache() for _ in self.parts.layers]
        self._slot_members: dict[int, tuple[int, ...]] = {}
        self._closed_at: dict[int, int] = {}
        self._awaiting: set[int] = set()
        pipe = StreamingPipeline(
            self._stage_fn,  # type: ignore[arg-type]
            self.stage.pp_rank,
            self.stage.pp_size,
            self.stage.comm,
            exists=self._exists,
            launch=self._launch,
            finish=self._finish,
            on_result=self._on_result,
            overlap=False,  # a slot's next step needs its tokens right after the previous exchange
            platform=self.platform,
        )
        try:
            delay = self.stage.pp_size - 1 if self.first else self.stage.pp_rank
            while len(self._closed_at) < m or pipe.tick <= max(self._closed_at.values()) + delay:
                pipe.run_until(pipe.tick)
        finally:
            pipe.close()
            self._caches = []
        return [s.generated for s in seqs] if self.first else None

    def _exists(self, g: int) -> bool:
        closed = self._closed_at.get(g % self.num_slots)
        return closed is None or g <= closed

    # -- first stage ------------------------------------------------------------------------------
    def _launch(self, g: int) -> Any:
        slot = g % self.num_slots
        if slot in self._awaiting:
            raise RuntimeError(f"slot {slot} launched before the tokens of its previous step came back.")
        live = [s for s in self._slots[slot] if not s.done]
        host_ids, num_new, start, sample = [], [], [], []
        for s in live:
            total = s.prompt.numel()
            if s.consumed < total:  # prefill, maybe one chunk of it
                n = total - s.consumed
                if self.planner is not None:
                    n = self.planner.next_chunk(s.consumed, n)
                host_ids.append(s.prompt[s.consumed : s.consumed + n])
                start.append(s.consumed)
                s.consumed += n
                sample.append(int(s.consumed == total))
            else:  # decode the last sampled token
                host_ids.append(torch.tensor([s.generated[-1]], dtype=torch.long))
                start.append(total + len(s.generated) - 1)
                n = 1
                sample.append(1)
            num_new.append(n)
        dp_rows: tuple[int, ...] = ()
        if self._attn_dp is not None:
            # One exchange per forward, on the first stage only: later stages read the
            # counts from the header. Padding to attention-TP multiples is not needed
            # (no reduce-scatter here), so only the counts and the decisions are used.
            info = gather_batch_info(sum(num_new), dp_group=self._attn_dp, attn_tp_size=self.stage.attn_tp_size)
            dp_rows = info.global_num_tokens
            if not info.should_run:  # every rank's slot is empty: it closes everywhere at this g
                return self._forward(self._header(g, slot, [], [], [], [], dp_rows, sentinel=True), None)
        elif not live:
            return self._forward(self._header(g, slot, [], [], [], [], dp_rows, sentinel=True), None)
        # With no live sequences here but rows on a peer: an idle forward (zero rows).
        self._awaiting.add(slot)
        header = self._header(g, slot, [s.seq_id for s in live], num_new, start, sample, dp_rows, sentinel=False)
        ids = torch.cat(host_ids) if host_ids else torch.zeros(0, dtype=torch.long)
        return self._forward(header, self.platform.pin(ids))

    def _on_result(self, g: int, result: dict) -> None:
        slot = int(result["slot"][0])
        self._awaiting.discard(slot)
        by_id = {s.seq_id: s for s in self._slots[slot]}
        for seq_id, token in zip(result["seq_ids"].tolist(), result["tokens"].tolist()):
            if token < 0:
                continue  # a prefill chunk before the prompt's last: nothing sampled
            s = by_id[seq_id]
            s.generated.append(token)
            if token in self.eos or len(s.generated) >= self.max_new_tokens:
                s.done = True

    # -- every stage ------------------------------------------------------------------------------
    def _header(self, g, slot, seq_ids, num_new, start, sample, dp_rows, *, sentinel: bool) -> dict:
        dev = self.stage.device

        def t(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long).to(dev)

        return {
            "slot": t([slot, g, int(sentinel)]),
            "seq_ids": t(seq_ids),
            "num_new": t(num_new),
            "start": t(start),
            "sample": t(sample),
            "dp_rows": t(dp_rows),  # every attention-DP rank's rows; empty without DP attention
        }

    def _stage_fn(self, payload: dict) -> dict:
        return self._forward(payload, None)

    def _finish(self, g: int, payload: dict) -> dict:
        return self._forward(payload, None)

    def _forward(self, payload: dict, host_ids: Optional[torch.Tensor]) -> dict:
        """Runs this stage on one forward; returns the activation payload, or the result on the last stage."""
        slot, g, sentinel = payload["slot"].tolist()
        seq_ids = tuple(payload["seq_ids"].tolist())
        previous = self._slot_members.get(slot, ())
        gone = [i for i in previous if i not in seq_ids]
        for cache in self._caches:  # sequences that left the slot (EOS, length) free their cache here
            cache.free(gone)
        self._slot_members[slot] = seq_ids
        header = {k: payload[k] for k in _HEADER_KEYS}
        if sentinel:
            self._closed_at[slot] = g
            return (
                {"slot": header["slot"], "seq_ids": header["seq_ids"], "tokens": header["seq_ids"]}
                if self.last
                else header
            )
        dp_rows = tuple(payload["dp_rows"].tolist()) or None
        num_new, start = tuple(payload["num_new"].tolist()), tuple(payload["start"].tolist())
        rows = StepRows(seq_ids, num_new, start, dp_num_rows=dp_rows)
        if not seq_ids:
            self.num_idle_forwards += 1
        if self.first:
            embed = self.parts.embed
            if embed is None:  # checked in __init__
                raise RuntimeError("the first stage has no `embed`.")
            hidden, residual = embed(resolve_input_ids(host_ids, self.stage.device, self.platform))
        else:
            hidden, residual = payload["hidden"], payload["residual"]
        for layer, cache in zip(self.parts.layers, self._caches):
            hidden, residual = layer(hidden, residual, rows=rows, cache=cache)
        if not self.last:
            return {**header, "hidden": hidden, "residual": residual}
        return {
            "slot": header["slot"],
            "seq_ids": header["seq_ids"],
            "tokens": self._sample(hidden, rows, payload["sample"]),
        }

    def _sample(self, hidden: torch.Tensor, rows: StepRows, sample: torch.Tensor) -> torch.Tensor:
        """Greedy token per sequence from its last row, ``-1`` where the rows end mid-prompt.

        An idle forward has no sequences: the empty index gives no tokens.
        """
        ends = torch.tensor(rows.num_new, dtype=torch.long).cumsum(0) - 1
        head = self.parts.head
        if head is None:  # checked in __init__
            raise RuntimeError("the last stage has no `head`.")
        logits = head(hidden[ends.to(hidden.device)])
        tokens = logits.argmax(dim=-1)
        return torch.where(sample.to(tokens.device) > 0, tokens, torch.full_like(tokens, -1))


# -- latency predictor -----------------------------------------------------------------------------
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
    restored from a snapshot before every timed chunk, which would otherwise leave
    its keys behind. ``run(p, n)`` goes through the launch path: host ids resolved
    by :func:`resolve_input_ids` (the seed's profiler saw ``None`` ids).
    """

    def __init__(self, parts: StageParts, stage: StageContext, *, prefill_chunk: int) -> None:
        self.parts, self.stage = parts, stage
        self.platform = stage.platform or current_platform()
        self.vocab = max(parts.vocab_size, 1)
        self.prefill_chunk = max(prefill_chunk, 1)
        self._prefix = -1
        self._snapshot: list[dict] = []
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
            self._snapshot = [dict(cache.entries) for cache in self._caches]
            self._prefix = prefix
        for cache, entries in zip(self._caches, self._snapshot):
            cache.entries = dict(entries)  # extend() replaces entries, so the snapshot's tensors stay intact

    def run(self, prefix: int, n: int) -> None:
        self._forward(prefix, n)
