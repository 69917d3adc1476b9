"""``trainer.predict`` for text generation: a LightningModule around a :class:`DecoderLM`.

::

    model = GenerationModule(DecoderLM.from_pretrained("path/to/llama"), max_new_tokens=64)
    loader = DataLoader(PromptDataset(prompts), batch_size=8, collate_fn=collate_prompts)
    outputs = L.Trainer(accelerator="cpu", devices=2, strategy=PPStrategy()).predict(model, loader)

The decoder layers are the module's one direct ``nn.Sequential`` (``layers``), so
:class:`~lightning_pp.integration.strategy.PPStrategy` splits them over the pipeline ranks as
for any other model. Generation then does not go through the strategy's
streaming predict: ``PPStrategy.predict_step`` sees ``drives_own_pipeline`` and
hands this module the rank's :class:`~lightning_pp.generation.engine.StageContext`, and
:class:`~lightning_pp.generation.engine.PipelineGenerator` runs the stages. On one
device (any other strategy) the same generator runs with a single stage.

Each batch is a list of prompts of any lengths: :class:`PromptItem` s (what
:class:`PromptDataset` and :class:`ScoreDataset` give, with ``collate_fn=collate_prompts``)
or bare 1-D token-id tensors. The prediction of a batch, on the first stage, is a
list of generated id lists (EOS included), or with ``mode="score"`` a list of
per-token log-probability lists, one per (prompt, continuation) pair::

    scorer = GenerationModule(lm, mode="score")
    loader = DataLoader(ScoreDataset([(prompt_ids, continuation_ids), ...]), batch_size=8,
                        collate_fn=collate_prompts)
    logprobs = L.Trainer(...).predict(scorer, loader)   # [[log p(c_0 | prompt), log p(c_1 | prompt, c_0), ...], ...]

Sampling (``temperature``, ``top_k``, ``top_p``, ``seed``) draws the token of a
prompt at a position from a random number fixed by the seed, the prompt's dataset
index (:attr:`PromptItem.index`) and the position, so the same seed gives the same
tokens on one device, through a pipeline of any depth, and with data-parallel
attention. Bare tensors take their index from the order the module sees them in.

Tensor parallelism and data-parallel attention (``PPStrategy(tensor_parallel_size=...,
attention_data_parallel_size=...)``): pass the full model as usual;
:meth:`GenerationModule.configure_model` replaces the layers by this rank's shards
for the strategy's topology. Every attention-DP rank reads the same batches and
runs its share of each batch's prompts; the first stage of attention-DP rank 0
(tensor-parallel rank 0) returns the whole batch's outputs in prompt order, and
every other rank ``None``, so ``trainer.predict`` on global rank 0 returns what
one device returns.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from lightning_pp.distributed.topology import RankTopology
from lightning_pp.generation.chunking import ChunkPlanner
from lightning_pp.generation.engine import (
    PipelineGenerator,
    StageContext,
    StageParts,
    init_chunk_planner,
)
from lightning_pp.generation.sampling import SamplingParams
from lightning_pp.models.llama import DecoderLM, shard_layers
from lightning_pp.models.tp_block import BlockGroups
from lightning_pp.parallel.dp_attention import gather_shared_outputs, share_prompts

__all__ = ["MODES", "GenerationModule", "PromptDataset", "PromptItem", "ScoreDataset", "collate_prompts"]

#: What :class:`GenerationModule` does with each prompt.
MODES = ("generate", "score")


def _ids(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).flatten()


class PromptItem:
    """One prompt of a batch: its token ids, its dataset index, and what to do with it.

    A plain object (not a tensor, list or dataclass), so Lightning's batch transfer
    leaves it on the host, where the generator keeps prompts until they launch.

    Attributes:
        input_ids: the prompt, 1-D ``long``.
        index: its position in the dataset; seeds its random stream when sampling,
            so it must not depend on the batch or the rank.
        max_new_tokens: this prompt's own limit (``None``: the module's).
        continuation: with ``mode="score"``, the tokens whose log-probabilities to return.
    """

    __slots__ = ("input_ids", "index", "max_new_tokens", "continuation")

    def __init__(
        self,
        input_ids: Union[torch.Tensor, Sequence[int]],
        index: int,
        *,
        max_new_tokens: Optional[int] = None,
        continuation: Union[torch.Tensor, Sequence[int], None] = None,
    ) -> None:
        self.input_ids = _ids(input_ids)
        self.index = int(index)
        self.max_new_tokens = max_new_tokens
        self.continuation = None if continuation is None else _ids(continuation)

    def __repr__(self) -> str:
        extra = f", max_new_tokens={self.max_new_tokens}" if self.max_new_tokens is not None else ""
        extra += f", continuation={self.continuation.tolist()}" if self.continuation is not None else ""
        return f"PromptItem({self.input_ids.tolist()}, index={self.index}{extra})"


class PromptDataset(Dataset):
    """Token-id prompts (lists or 1-D tensors) as :class:`PromptItem` s carrying their index.

    Args:
        prompts: one token-id sequence per prompt.
        max_new_tokens: optionally, each prompt's own limit (``None`` entries: the module's).
    """

    def __init__(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: Optional[Sequence[Optional[int]]] = None
    ) -> None:
        self.prompts = [_ids(p) for p in prompts]
        limits = list(max_new_tokens) if max_new_tokens is not None else [None] * len(self.prompts)
        if len(limits) != len(self.prompts):
            raise ValueError(
                f"max_new_tokens has {len(limits)} entries for {len(self.prompts)} prompts: give one each."
            )
        self.max_new_tokens = limits

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> PromptItem:
        return PromptItem(self.prompts[i], i, max_new_tokens=self.max_new_tokens[i])


class ScoreDataset(Dataset):
    """``(prompt, continuation)`` token-id pairs to score (``GenerationModule(mode="score")``)."""

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
        self.pairs = [(_ids(prompt), _ids(continuation)) for prompt, continuation in pairs]
        # The prompts alone, as PromptDataset names them (the collate check reads them).
        self.prompts = [prompt for prompt, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PromptItem:
        prompt, continuation = self.pairs[i]
        return PromptItem(prompt, i, continuation=continuation)


def collate_prompts(items: list[Any]) -> list[Any]:
    """Keeps ragged prompts as a list (no padding: the generator packs rows itself)."""
    return list(items)


class GenerationModule(L.LightningModule):
    """Generation (greedy or sampled) or scoring with a KV cache, on one device or through a PPStrategy pipeline.

    Args:
        lm: the decoder; its pieces are taken over (``lm`` itself is not kept).
        mode: ``"generate"`` continues each prompt; ``"score"`` returns the
            log-probabilities of each :class:`ScoreDataset` pair's continuation
            given its prompt (one prefill per pair, nothing decoded).
        max_new_tokens: longest continuation per prompt (a :class:`PromptItem` may set its own).
        eos_token_ids: tokens that stop a sequence; the model config's by default,
            ``()`` for none.
        temperature: ``None`` or ``0`` (the default): greedy. Above 0: sample.
        top_k: sample among the ``top_k`` most likely tokens only (``None``: all).
        top_p: sample among the most likely tokens whose mass reaches ``top_p``, in ``(0, 1]``.
        seed: with each prompt's dataset index, fixes every sampled token.
        num_microbatches: slots of sequences in flight; default the number of stages.
            Set it explicitly to make a pipeline pack rows exactly as one device does.
            ``PPStrategy(num_microbatches=...)`` sets the same thing; giving both
            different values is an error.
        prefill_chunk: prefill long prompts in chunks of this many tokens (first chunk
            when the predictor is on); ``None`` prefills a prompt in one forward.
        chunk_predictor: size chunks after the first for equal predicted latency
            (profiled once, at the first batch, on the first stage).
        profile_sizes: chunk sizes to profile (default around ``prefill_chunk``).
        profile_prefixes: cached prefix lengths to profile each size after (default
            ``0``, ``2`` and ``4`` times ``prefill_chunk``); cover the prompt lengths
            you expect, since the fit is extrapolated beyond them.
    """

    #: Tells PPStrategy to hand ``predict_step`` the stage context instead of streaming.
    drives_own_pipeline = True

    def __init__(
        self,
        lm: DecoderLM,
        *,
        mode: str = "generate",
        max_new_tokens: int = 32,
        eos_token_ids: Optional[Sequence[int]] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        num_microbatches: Optional[int] = None,
        prefill_chunk: Optional[int] = None,
        chunk_predictor: bool = False,
        profile_sizes: Optional[Sequence[int]] = None,
        profile_prefixes: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if chunk_predictor and prefill_chunk is None:
            raise ValueError("chunk_predictor=True sizes chunks from a first chunk: pass prefill_chunk as well.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        if mode == "score" and (temperature or top_k is not None or top_p is not None):
            raise ValueError(
                "mode='score' returns the log-probabilities of given continuations and samples nothing: "
                "drop temperature, top_k and top_p (or use mode='generate')."
            )
        self.mode = mode
        self.sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        self.config = lm.config
        self.embed_tokens, self.input_norm, self.lm_head = lm.embed_tokens, lm.input_norm, lm.lm_head
        # nn.Sequential here; under PPStrategy a PipelinedSequential (iterated by its .stages).
        self.layers: nn.Sequential = lm.layers
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = tuple(lm.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.num_microbatches = num_microbatches
        self.prefill_chunk, self.chunk_predictor = prefill_chunk, chunk_predictor
        self.profile_sizes, self.profile_prefixes = profile_sizes, profile_prefixes
        self.planner: Optional[ChunkPlanner] = None
        #: Why the predictor is off (``None`` when on, or not requested).
        self.predictor_fallback: Optional[str] = None
        #: Forwards this rank ran with no rows of its own (data-parallel attention), all batches so far.
        self.num_idle_forwards = 0
        self._sharded_for: Optional[tuple] = None
        # The index the next bare-tensor prompt takes (PromptItems carry their own).
        self._next_index = 0

    # -- model parallelism ------------------------------------------------------------------------
    def _topology(self) -> tuple[Optional[RankTopology], str]:
        """The strategy's mesh and attention mode, when it has tensor- or attention-DP groups."""
        trainer = getattr(self, "_trainer", None)
        strategy = getattr(trainer, "strategy", None) if trainer is not None else None
        topology = getattr(strategy, "topology", None)
        if not isinstance(topology, RankTopology) or topology.cp.size * topology.tp.size == 1:
            return None, "context"
        return topology, str(getattr(strategy, "attention_mode", "context"))

    def configure_model(self) -> None:
        """Replaces the full decoder layers by this rank's shards (tensor parallel, attention-DP).

        Lightning calls this after the strategy built its process groups and before
        it splits the layers over the pipeline; without such groups it does nothing.

        Raises:
            ValueError: the strategy uses context parallelism (a KV cache keeps whole
                sequences), or the layers were sharded before for another layout.
        """
        topology, mode = self._topology()
        if topology is None:
            return
        groups = BlockGroups.from_topology(topology)
        layout = (groups.attn_tp.ranks, groups.cp.ranks, groups.mlp_tp.ranks, mode)
        if self._sharded_for is not None:
            if self._sharded_for != layout:
                raise ValueError(
                    f"the layers were sharded for {self._sharded_for} and cannot be re-sharded for {layout}: "
                    "build a new GenerationModule from the full model for another parallel layout."
                )
            return  # a later trainer.predict with the same layout: already this rank's shards
        self.layers = shard_layers(list(self.layers), self.config, groups, attention_mode=mode)
        self._sharded_for = layout

    # -- input checks -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Fails before the first batch when the loader's default collate_fn cannot batch the prompts."""
        if stage != "predict":
            return
        # NOTE: the loader given to trainer.predict, before Lightning iterates it. Lightning
        # 2.6 keeps it on the predict loop's data source; a datamodule's loader is not
        # built here (that would build it twice).
        source = getattr(getattr(self.trainer, "predict_loop", None), "_data_source", None)
        loaders = getattr(source, "instance", None)
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            dataset = getattr(loader, "dataset", None)
            collates = getattr(loader, "collate_fn", None) is default_collate
            if collates and isinstance(dataset, (PromptDataset, ScoreDataset)):
                ragged = len({len(p) for p in dataset.prompts}) > 1
                raise ValueError(
                    f"The DataLoader's default collate_fn cannot batch {type(dataset).__name__}'s PromptItems"
                    + (" (and would stack prompts of different lengths)" if ragged else "")
                    + ". Pass collate_fn=collate_prompts (from lightning_pp.integration.generation_module), "
                    "which keeps each batch a list of prompts."
                )

    def on_predict_start(self) -> None:
        self._next_index = 0  # bare-tensor prompts are numbered per trainer.predict

    def _items(self, batch: Any, batch_idx: int) -> list[PromptItem]:
        """The batch as :class:`PromptItem` s; bare tensors are numbered in the order they come."""
        if isinstance(batch, (PromptItem, torch.Tensor)) and not (isinstance(batch, torch.Tensor) and batch.dim() == 2):
            batch = [batch]  # a DataLoader without batching (batch_size=None) hands over single items
        items = []
        for i, prompt in enumerate(batch):
            if isinstance(prompt, PromptItem):
                items.append(prompt)
                continue
            if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1:
                raise ValueError(
                    f"prompt {i} of batch {batch_idx} is {type(prompt).__name__}"
                    f"{tuple(getattr(prompt, 'shape', ()))}: each prompt must be a PromptItem or a non-empty 1-D "
                    "tensor of token ids (PromptDataset or ScoreDataset + collate_fn=collate_prompts make them)."
                )
            items.append(PromptItem(prompt, self._next_index + i))
        self._next_index += sum(1 for p in batch if not isinstance(p, PromptItem))
        return items

    def _check_prompts(self, items: list[PromptItem], batch_idx: int) -> None:
        """Token ids inside the vocabulary, a continuation exactly when scoring, room for every position."""
        limit = self.config.max_position_embeddings
        for i, item in enumerate(items):
            where = f"prompt {i} of batch {batch_idx}"
            self._check_ids(item.input_ids, where)
            if self.mode == "score":
                if item.continuation is None:
                    raise ValueError(
                        f"{where} has no continuation to score: mode='score' takes (prompt, continuation) pairs, "
                        "e.g. ScoreDataset(pairs) with collate_fn=collate_prompts."
                    )
                self._check_ids(item.continuation, f"the continuation of {where}")
                total = len(item.input_ids) + len(item.continuation)
                if limit is not None and total > limit:
                    raise ValueError(
                        f"{where} and its continuation hold {total} tokens, past the model's "
                        f"max_position_embeddings={limit}. Shorten the prompt or the continuation."
                    )
                continue
            if item.continuation is not None:
                raise ValueError(
                    f"{where} carries a continuation to score, but this module generates: "
                    "build it with GenerationModule(..., mode='score') to score continuations."
                )
            new = self.max_new_tokens if item.max_new_tokens is None else item.max_new_tokens
            if isinstance(new, bool) or not isinstance(new, int) or new < 1:
                raise ValueError(f"{where} asks for max_new_tokens={new!r}: give an integer >= 1 (or None).")
            if limit is not None and len(item.input_ids) + new > limit:
                raise ValueError(
                    f"{where} has {len(item.input_ids)} tokens; with max_new_tokens={new} it would reach "
                    f"position {len(item.input_ids) + new}, past the model's max_position_embeddings={limit}. "
                    "Shorten the prompt or lower max_new_tokens."
                )

    def _check_ids(self, ids: torch.Tensor, where: str) -> None:
        vocab = self.config.vocab_size
        if ids.numel() == 0:
            raise ValueError(f"{where} is empty: every prompt and continuation needs at least one token.")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"{where} holds token id {bad}, outside the model's vocabulary of {vocab} ids (0..{vocab - 1}): "
                "was it encoded with another model's tokenizer?"
            )

    def _microbatches(self, stage: StageContext) -> Optional[int]:
        """The one microbatch count, whether set here or on the strategy."""
        mine, strategy = self.num_microbatches, stage.num_microbatches
        if mine is not None and strategy is not None and mine != strategy:
            raise ValueError(
                f"GenerationModule(num_microbatches={mine}) and PPStrategy(num_microbatches={strategy}) disagree: "
                "set it in one place."
            )
        return mine if mine is not None else strategy

    def _parts(self, stage: StageContext) -> StageParts:
        stages = getattr(self.layers, "stages", None)  # a PipelinedSequential under PPStrategy
        layers = list(stages[stage.pp_rank]) if stages is not None else list(self.layers)

        def embed(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.embed_tokens(ids)
            return self.input_norm(x), x

        return StageParts(layers=layers, embed=embed, head=self.lm_head, vocab_size=self.config.vocab_size)

    def _planner(self, parts: StageParts, stage: StageContext) -> Optional[ChunkPlanner]:
        if self.prefill_chunk is None:
            return None
        if self.planner is None:
            if self.chunk_predictor:
                self.planner, self.predictor_fallback = init_chunk_planner(
                    parts,
                    stage,
                    first_chunk=self.prefill_chunk,
                    profile_sizes=self.profile_sizes,
                    profile_prefixes=self.profile_prefixes,
                )
                if self.predictor_fallback is not None and stage.pp_rank == 0:
                    warnings.warn(f"chunk predictor off, using fixed chunks: {self.predictor_fallback}", stacklevel=2)
            else:
                self.planner = ChunkPlanner(self.prefill_chunk)
        return self.planner

    @torch.no_grad()
    def predict_step(
        self,
        batch: Sequence[Union[PromptItem, torch.Tensor]],
        batch_idx: int = 0,
        dataloader_idx: int = 0,
        *,
        stage: Optional[StageContext] = None,
    ) -> Optional[Union[list[list[int]], list[list[float]]]]:
        """Generated ids (``mode="generate"``) or continuation log-probabilities (``"score"``) per prompt.

        ``None`` on pipeline ranks other than the first, and with data-parallel
        attention or tensor parallelism on every rank but the first stage's first
        attention-DP and tensor-parallel rank.
        """
        stage = stage or StageContext(device=self.device)
        items = self._items(batch, batch_idx)
        self._check_prompts(items, batch_idx)
        parts = self._parts(stage)
        generator = PipelineGenerator(
            parts,
            stage,
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            planner=self._planner(parts, stage),
            num_microbatches=self._microbatches(stage),
            sampling=self.sampling,
        )
        dp = stage.attn_dp_group
        shared = items if dp is None or dp.size == 1 else share_prompts(items, dp.rank, dp.size)
        outputs: Optional[list] = self._run(generator, shared)
        if dp is not None and dp.size > 1 and outputs is not None:  # first stage: attention-DP rank 0 gets all
            outputs = gather_shared_outputs(outputs, dp)
        self.num_idle_forwards += generator.num_idle_forwards
        topology, _ = self._topology()
        if topology is not None and topology.coords.tp != 0:
            return None  # tensor-parallel peers hold copies of rank 0's outputs
        return outputs

    def _run(self, generator: PipelineGenerator, items: list[PromptItem]) -> Optional[list]:
        prompts = [item.input_ids for item in items]
        if self.mode == "score":
            return generator.score(prompts, [item.continuation for item in items])  # type: ignore[misc]
        return generator.generate(
            prompts, keys=[item.index for item in items], max_new_tokens=[item.max_new_tokens for item in items]
        )
