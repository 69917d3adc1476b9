"""KV-cached generation and scoring through a pipeline of decoder stages.

The sequences of a batch are dealt into ``M`` *slots* (microbatches); each
forward of a slot advances all of its live sequences by one step: a prefill
chunk of a prompt, or one decode token. With ``max_running`` set, only that many
are in flight and a finished sequence's place goes to the next waiting prompt
(continuous batching, :mod:`lightning_pp.generation.scheduler`). Forwards are numbered as one stream
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
frees their cache, or hands it to the prompts admitted in their place; when
a slot has no live sequences left the first stage sends a *sentinel* through it
instead. Each stage decides whether forward ``g``
exists from what it has itself seen of slot ``g % M`` (its sentinel, if any),
so all stages agree without any extra message.

Each forward carries a *header* (which sequences, how many new rows each, from
which position, which of them pick a token) packed into one int64 tensor whose
first five numbers give its length, so a later stage reads it with a single
device-to-host copy; the first stage built it and never reads it back. The last
stage returns only the picked tokens (or, when scoring, the log-probabilities),
in the order of the forward's sequences: the first stage remembers what each
forward in flight carried. Per forward, two host round trips remain, both
needed by the protocol: later stages read the header (the KV cache and the
attention masks are managed on the host), and the first stage reads the tokens
(the host decides who stops and launches the next step's ids).

Sampling happens on the last stage, where the logits are
(:mod:`lightning_pp.generation.sampling`): the random number of a sequence's
token is a function of the seed, the prompt's key (its dataset index) and the
position, so every layout draws the same tokens. Scoring (:meth:`PipelineGenerator.score`)
prefills ``prompt + continuation`` and returns the log-probabilities of the
continuation's tokens; nothing is decoded. Every stage holds every prompt (they
are small), so the last stage finds the tokens to score and each prompt's
random stream itself, and nothing but the header travels forward.

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

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from lightning_pp.generation.chunking import ChunkPlanner
from lightning_pp.generation.kv_cache import KVCache, StepRows, host_to_device
from lightning_pp.generation.profiler import init_chunk_planner
from lightning_pp.generation.sampling import SamplingParams, sample_tokens
from lightning_pp.generation.scheduler import (
    SequenceState,
    SlotMembers,
    SlotScheduler,
    check_max_running,
    plan_forward,
)
from lightning_pp.generation.stage import StageContext, StageParts, resolve_input_ids
from lightning_pp.parallel.dp_attention import gather_batch_info
from lightning_pp.pipeline.streaming import StreamingPipeline
from lightning_pp.platform import current_platform

__all__ = [
    "PipelineGenerator",
    "StageContext",
    "StageParts",
    "init_chunk_planner",
    "resolve_input_ids",
]


@dataclass(frozen=True)
class _Header:
    """What every stage must know about forward ``g``, sent as one int64 tensor.

    Packed as ``[slot, g, sentinel, B, C, seq_ids (B), num_new (B), start (B),
    sample (B), dp_rows (C)]``: a fixed five-number head that says how long the
    rest is, so a stage reads the whole header with one device-to-host copy.
    ``sample[i]`` says whether the last stage picks a token after sequence ``i``'s
    rows (its prompt is complete); ``dp_rows`` holds every attention-DP rank's row
    count (empty without data-parallel attention).
    """

    slot: int
    g: int
    sentinel: bool
    seq_ids: tuple[int, ...] = ()
    num_new: tuple[int, ...] = ()
    start: tuple[int, ...] = ()
    sample: tuple[int, ...] = ()
    dp_rows: tuple[int, ...] = ()

    def pack(self) -> list[int]:
        head = [self.slot, self.g, int(self.sentinel), len(self.seq_ids), len(self.dp_rows)]
        return head + [*self.seq_ids, *self.num_new, *self.start, *self.sample, *self.dp_rows]

    @classmethod
    def unpack(cls, values: Sequence[int]) -> "_Header":
        slot, g, sentinel, b, c = values[:5]
        body = values[5:]
        if len(body) != 4 * b + c:
            raise RuntimeError(
                f"a generation header of {len(values)} numbers says it holds {b} sequences and {c} counts."
            )
        seq_ids, num_new, start, sample = (tuple(body[i * b : (i + 1) * b]) for i in range(4))
        return cls(slot, g, bool(sentinel), seq_ids, num_new, start, sample, tuple(body[4 * b :]))

    def rows(self) -> StepRows:
        return StepRows(self.seq_ids, self.num_new, self.start, dp_num_rows=self.dp_rows or None)


class PipelineGenerator:
    """One rank's part of KV-cached generation or scoring (see the module docstring).

    Args:
        parts: this stage's layers, plus ``embed`` (first stage) and ``head`` (last stage).
        stage: the rank's pipeline position and channels.
        max_new_tokens: longest continuation (a prompt may ask for its own, see :meth:`generate`).
        eos_token_ids: tokens that end a sequence (kept in its output).
        planner: prefill chunk sizes; ``None`` prefills a prompt in one forward.
        num_microbatches: slots in flight; at least ``pp_size`` (the default).
        sampling: how the last stage picks tokens; ``None``: greedy.
        max_running: the most sequences in flight at once (continuous batching,
            :mod:`lightning_pp.generation.scheduler`): a finished sequence's lane takes
            the next waiting prompt. ``None``: every prompt starts at once. At least
            ``num_microbatches``.
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
        sampling: Optional[SamplingParams] = None,
        max_running: Optional[int] = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        self.num_slots = num_microbatches or stage.pp_size
        if self.num_slots < stage.pp_size:
            raise ValueError(
                f"num_microbatches={self.num_slots} is fewer than the {stage.pp_size} stages: a slot's tokens would "
                "not be back on the first stage in time for its next step. Use at least pp_size microbatches."
            )
        check_max_running(max_running, self.num_slots)  # here, before any rank waits for another
        self.max_running = max_running
        self.parts, self.stage = parts, stage
        self.platform = stage.platform or current_platform()
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.planner = planner
        self.sampling = sampling or SamplingParams()
        self.first, self.last = stage.pp_rank == 0, stage.pp_rank == stage.pp_size - 1
        if self.first and parts.embed is None or self.last and parts.head is None:
            raise ValueError("the first stage needs `embed` and the last stage needs `head`.")
        self._attn_dp = stage.attn_dp_group if stage.attn_dp_size > 1 else None
        self._scoring = False
        #: Forwards of this stage that ran with no rows of its own (data-parallel attention).
        self.num_idle_forwards = 0
        #: On the first stage, why each prompt of the last :meth:`generate` ended:
        #: ``"eos"``, ``"stop"`` or ``"length"`` (see :mod:`lightning_pp.generation.text`).
        self.finish_reasons: list[str] = []
        #: On the first stage, all calls so far: prompts admitted into a finished sequence's
        #: lane (continuous batching), and forwards launched (sentinels left out).
        self.num_admitted = self.num_forwards = 0

    # -- driver -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[torch.Tensor],
        *,
        keys: Optional[Sequence[int]] = None,
        max_new_tokens: Optional[Sequence[Optional[int]]] = None,
        stop: Optional[Sequence[Optional[Callable[[list[int]], bool]]]] = None,
    ) -> Optional[list[list[int]]]:
        """Generates for every prompt (all stages call it with the same arguments).

        With data-parallel attention, each attention-DP rank passes its own share
        (possibly empty), and every rank of the group must call this together.

        Args:
            prompts: 1-D token ids, one tensor per prompt.
            keys: each prompt's random stream when sampling (its dataset index);
                default ``0, 1, ...``.
            max_new_tokens: each prompt's own limit (``None`` entries: the generator's).
            stop: each prompt's stop test (``None`` entries: none), called on the
                first stage with the ids generated so far after every token; a
                sequence whose test is true ends there. Only the first stage calls it,
                and the stages that follow learn of the end from its headers, so
                any layout stops where one device stops.

        Returns:
            On the first stage, each prompt's generated ids (EOS included when hit),
            with :attr:`finish_reasons` saying why each ended; ``None`` on other stages.
        """
        limits = list(max_new_tokens) if max_new_tokens is not None else [None] * len(prompts)
        stops = list(stop) if stop is not None else [None] * len(prompts)
        for name, values in (("max_new_tokens", limits), ("stop", stops)):
            if len(values) != len(prompts):
                raise ValueError(f"{name} has {len(values)} entries for {len(prompts)} prompts: give one each.")
        seqs = []
        for i, (prompt, limit) in enumerate(zip(prompts, limits)):
            limit = self.max_new_tokens if limit is None else int(limit)
            if limit < 1:
                raise ValueError(f"prompt {i} asks for max_new_tokens={limit}: it must be at least 1.")
            seqs.append(SequenceState(i, self._host(prompt), self._key(keys, i), limit, stop=stops[i]))
        self._run(seqs, scoring=False)
        self.finish_reasons = [s.finish_reason for s in seqs] if self.first else []
        return [s.generated for s in seqs] if self.first else None

    @torch.no_grad()
    def score(
        self, prompts: Sequence[torch.Tensor], continuations: Sequence[torch.Tensor]
    ) -> Optional[list[list[float]]]:
        """Log-probabilities of each continuation's tokens given its prompt (all stages call it alike).

        Each pair is prefilled once as ``prompt + continuation`` (in chunks when a
        planner is set); nothing is decoded. Entry ``j`` of pair ``i``'s result is
        ``log softmax(logits)[continuation[j]]`` of the logits at the position before
        that token, in fp32.

        Returns:
            On the first stage, one list of ``len(continuation)`` floats per pair;
            ``None`` on other stages.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: pass them in pairs.")
        seqs = []
        for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
            head, tail = self._host(prompt), torch.as_tensor(continuation, dtype=torch.long).flatten().cpu()
            if tail.numel() == 0:
                raise ValueError(f"continuation {i} is empty: give each prompt at least one token to score.")
            tokens = self.platform.pin(torch.cat([head, tail]))
            seqs.append(SequenceState(i, tokens, i, 1, score_from=head.numel()))
        self._run(seqs, scoring=True)
        return [s.logprobs for s in seqs] if self.first else None

    def _host(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.platform.pin(torch.as_tensor(prompt, dtype=torch.long).flatten().cpu())

    @staticmethod
    def _key(keys: Optional[Sequence[int]], i: int) -> int:
        return i if keys is None else int(keys[i])

    def _run(self, seqs: list[SequenceState], *, scoring: bool) -> None:
        m = self.num_slots
        for s in seqs:
            if s.tokens.numel() == 0:
                raise ValueError(f"prompt {s.seq_id} is empty: every sequence needs at least one token.")
        self._scoring = scoring
        self._by_id = {s.seq_id: s for s in seqs}
        self._scheduler = SlotScheduler(seqs, m, self.max_running)  # decides on the first stage only
        self._caches = [KVCache() for _ in self.parts.layers]
        self._members = SlotMembers()
        self._closed_at: dict[int, int] = {}
        self._awaiting: set[int] = set()
        # First stage: what each forward in flight carried, by forward index (the result
        # that comes back holds only tokens or log-probabilities, in this order).
        self._launched: dict[int, tuple[int, list[SequenceState], tuple[int, ...]]] = {}
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
            self.num_admitted += self._scheduler.num_admitted

    def _exists(self, g: int) -> bool:
        closed = self._closed_at.get(g % self.num_slots)
        return closed is None or g <= closed

    # -- first stage ------------------------------------------------------------------------------
    def _launch(self, g: int) -> Any:
        slot = g % self.num_slots
        if slot in self._awaiting:
            raise RuntimeError(f"slot {slot} launched before the tokens of its previous step came back.")
        live = self._scheduler.admit(slot)
        plan = plan_forward(live, self.planner, scoring=self._scoring)
        dp_rows: tuple[int, ...] = ()
        if self._attn_dp is not None:
            # One exchange per forward, on the first stage only: later stages read the
            # counts from the header. Padding to attention-TP multiples is not needed
            # (no reduce-scatter here), so only the counts and the decisions are used.
            info = gather_batch_info(sum(plan.num_new), dp_group=self._attn_dp, attn_tp_size=self.stage.attn_tp_size)
            dp_rows = info.global_num_tokens
            if not info.should_run:  # every rank's slot is empty: it closes everywhere at this g
                return self._forward(_Header(slot, g, True, dp_rows=dp_rows), None, None)
        elif not live:
            return self._forward(_Header(slot, g, True), None, None)
        # With no live sequences here but rows on a peer: an idle forward (zero rows).
        self._awaiting.add(slot)
        self.num_forwards += 1
        self._launched[g] = (slot, live, plan.scored)
        seq_ids = tuple(s.seq_id for s in live)
        header = _Header(slot, g, False, seq_ids, plan.num_new, plan.start, plan.sample, dp_rows)
        return self._forward(header, None, self.platform.pin(plan.host_ids))

    def _on_result(self, g: int, result: dict) -> None:
        launched = self._launched.pop(g, None)
        if launched is None:
            return  # a sentinel: the slot had nothing left
        slot, live, scored = launched
        self._awaiting.discard(slot)
        if self._scoring:
            values, offset = result["logprobs"].tolist(), 0
            for s, count in zip(live, scored):
                s.take_logprobs(values[offset : offset + count])
                offset += count
            return
        for s, token in zip(live, result["tokens"].tolist()):
            if token >= 0:  # -1: a prefill chunk before the prompt's last, nothing sampled
                s.take_token(token, self.eos)

    # -- every stage ------------------------------------------------------------------------------
    def _stage_fn(self, payload: dict) -> dict:
        return self._forward(self._read_header(payload), payload, None)

    def _finish(self, g: int, payload: dict) -> dict:
        return self._forward(self._read_header(payload), payload, None)

    @staticmethod
    def _read_header(payload: dict) -> _Header:
        # The one device-to-host copy of a forward on a later stage: the cache (which
        # sequences left, where each one's rows go) and the attention masks are
        # managed on the host, from these numbers.
        return _Header.unpack(payload["header"].tolist())

    def _forward(self, header: _Header, payload: Optional[dict], host_ids: Optional[torch.Tensor]) -> dict:
        """Runs this stage on one forward; returns the activation payload, or the result on the last stage.

        ``payload`` is what the previous stage sent (``None`` on the first stage,
        which built ``header`` itself and launches ``host_ids``).
        """
        slot, seq_ids = header.slot, header.seq_ids
        handovers, freed = self._members.update(slot, seq_ids)
        for cache in self._caches:  # sequences that left the slot (EOS, stop, length) free their cache here,
            for old, new in handovers:  # or hand their row to the prompt admitted into their lane
                cache.replace(old, new)
            if freed:
                cache.free(freed)
        if header.sentinel:
            self._closed_at[slot] = header.g
            if self.last:
                return {"tokens": torch.zeros(0, dtype=torch.long)}
            return {"header": self._packed(header, payload)}
        rows = header.rows()
        if not seq_ids:
            self.num_idle_forwards += 1
        if self.first:
            embed = self.parts.embed
            if embed is None:  # checked in __init__
                raise RuntimeError("the first stage has no `embed`.")
            hidden, residual = embed(resolve_input_ids(host_ids, self.stage.device, self.platform))
        else:
            assert payload is not None
            hidden, residual = payload["hidden"], payload["residual"]
        for layer, cache in zip(self.parts.layers, self._caches):
            hidden, residual = layer(hidden, residual, rows=rows, cache=cache)
        if not self.last:
            return {"header": self._packed(header, payload), "hidden": hidden, "residual": residual}
        if self._scoring:
            return {"logprobs": self._score(hidden, rows)}
        return {"tokens": self._sample(hidden, rows, header.sample)}

    def _packed(self, header: _Header, payload: Optional[dict]) -> torch.Tensor:
        """The header as the next stage receives it: the received tensor, passed on, or packed here."""
        if payload is not None:
            return payload["header"]
        return host_to_device(torch.tensor(header.pack(), dtype=torch.long), self.stage.device)

    def _head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        head = self.parts.head
        if head is None:  # checked in __init__
            raise RuntimeError("the last stage has no `head`.")
        return head

    def _sample(self, hidden: torch.Tensor, rows: StepRows, sample: Sequence[int]) -> torch.Tensor:
        """A token per sequence from its last row, ``-1`` where the rows end mid-prompt.

        Only the rows that pick a token go through the head. An idle forward has
        no sequences and gives no tokens.
        """
        picked = [i for i, flag in enumerate(sample) if flag]
        if not picked:
            return torch.full((len(sample),), -1, dtype=torch.long, device=hidden.device)
        ends = list(itertools.accumulate(rows.num_new))
        index = host_to_device(torch.tensor([ends[i] - 1 for i in picked], dtype=torch.long), hidden.device)
        logits = self._head()(hidden[index])
        keys = [self._by_id[rows.seq_ids[i]].key for i in picked]
        positions = [rows.ends[i] for i in picked]  # where each picked token will sit
        tokens = sample_tokens(logits, self.sampling, keys, positions)
        if len(picked) == len(sample):
            return tokens
        out = torch.full((len(sample),), -1, dtype=torch.long, device=tokens.device)
        return out.index_copy_(0, host_to_device(torch.tensor(picked, dtype=torch.long), out.device), tokens)

    def _score(self, hidden: torch.Tensor, rows: StepRows) -> torch.Tensor:
        """Scoring: the log-probability of each continuation token these rows predict, in row order (fp32)."""
        row_index, targets, offset = [], [], 0
        for seq_id, start, n in zip(rows.seq_ids, rows.start, rows.num_new):
            s = self._by_id[seq_id]
            lo, hi = s.scored_positions(start, n)
            row_index.append(torch.arange(offset + lo - start, offset + hi - start))
            targets.append(s.tokens[lo + 1 : hi + 1])
            offset += n
        if not row_index:
            return torch.zeros(0, dtype=torch.float32, device=hidden.device)
        index = host_to_device(torch.cat(row_index), hidden.device)
        target = host_to_device(torch.cat(targets), hidden.device)
        head, out = self._head(), []
        # In blocks of rows: a [rows, vocab] fp32 matrix of a long continuation can be large.
        for rows_block, target_block in zip(index.split(_SCORE_BLOCK), target.split(_SCORE_BLOCK)):
            logprobs = torch.log_softmax(head(hidden[rows_block]).float(), dim=-1)
            out.append(logprobs.gather(1, target_block[:, None]).squeeze(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float32, device=hidden.device)


#: Rows of logits scored at once (bounds the ``[rows, vocab]`` fp32 matrix of a long continuation).
_SCORE_BLOCK = 1024
