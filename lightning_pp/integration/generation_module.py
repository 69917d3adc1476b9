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

Each batch is a list of 1-D token-id tensors of any lengths; the prediction of a
batch, on the first stage, is a list of generated id lists (EOS included).

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
from typing import Optional, Sequence

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
from lightning_pp.models.llama import DecoderLM, shard_layers
from lightning_pp.models.tp_block import BlockGroups
from lightning_pp.parallel.dp_attention import gather_shared_outputs, share_prompts

__all__ = ["GenerationModule", "PromptDataset", "collate_prompts"]


class PromptDataset(Dataset):
    """Token-id prompts (lists or 1-D tensors) as 1-D ``long`` tensors."""

    def __init__(self, prompts: Sequence[Sequence[int]]) -> None:
        self.prompts = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.prompts[i]


def collate_prompts(items: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keeps ragged prompts as a list (no padding: the generator packs rows itself)."""
    return list(items)


class GenerationModule(L.LightningModule):
    """Greedy generation with a KV cache, on one device or through a PPStrategy pipeline.

    Args:
        lm: the decoder; its pieces are taken over (``lm`` itself is not kept).
        max_new_tokens: longest continuation per prompt.
        eos_token_ids: tokens that stop a sequence; the model config's by default,
            ``()`` for none.
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
        max_new_tokens: int = 32,
        eos_token_ids: Optional[Sequence[int]] = None,
        num_microbatches: Optional[int] = None,
        prefill_chunk: Optional[int] = None,
        chunk_predictor: bool = False,
        profile_sizes: Optional[Sequence[int]] = None,
        profile_prefixes: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if chunk_predictor and prefill_chunk is None:
            raise ValueError("chunk_predictor=True sizes chunks from a first chunk: pass prefill_chunk as well.")
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
        """Fails before the first batch when the loader would stack prompts of different lengths."""
        if stage != "predict":
            return
        # NOTE: the loader given to trainer.predict, before Lightning iterates it. Lightning
        # 2.6 keeps it on the predict loop's data source; a datamodule's loader is not
        # built here (that would build it twice).
        source = getattr(getattr(self.trainer, "predict_loop", None), "_data_source", None)
        loaders = getattr(source, "instance", None)
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            dataset = getattr(loader, "dataset", None)
            batch_size = getattr(loader, "batch_size", None) or 1
            stacks = getattr(loader, "collate_fn", None) is default_collate and batch_size > 1
            if stacks and isinstance(dataset, PromptDataset) and len({len(p) for p in dataset.prompts}) > 1:
                raise ValueError(
                    "The prompts have different lengths, and the DataLoader's default collate_fn would stack them "
                    "(torch: 'stack expects each tensor to be equal size'). Pass collate_fn=collate_prompts "
                    "(from lightning_pp.integration), which keeps each batch a list of prompts."
                )

    def _check_prompts(self, prompts: list[torch.Tensor], batch_idx: int) -> None:
        """Token ids inside the vocabulary and room for every generated position, or a ValueError."""
        vocab, limit = self.config.vocab_size, self.config.max_position_embeddings
        for i, prompt in enumerate(prompts):
            where = f"prompt {i} of batch {batch_idx}"
            if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1 or prompt.numel() == 0:
                raise ValueError(
                    f"{where} is {type(prompt).__name__}{tuple(getattr(prompt, 'shape', ()))}: each prompt must be a "
                    "non-empty 1-D tensor of token ids (PromptDataset + collate_fn=collate_prompts make them)."
                )
            low, high = int(prompt.min()), int(prompt.max())
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{where} holds token id {bad}, outside the model's vocabulary of {vocab} ids (0..{vocab - 1}): "
                    "was it encoded with another model's tokenizer?"
                )
            if limit is not None and len(prompt) + self.max_new_tokens > limit:
                raise ValueError(
                    f"{where} has {len(prompt)} tokens; with max_new_tokens={self.max_new_tokens} it would reach "
                    f"position {len(prompt) + self.max_new_tokens}, past the model's max_position_embeddings={limit}. "
                    "Shorten the prompt or lower max_new_tokens."
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
        batch: Sequence[torch.Tensor],
        batch_idx: int = 0,
        dataloader_idx: int = 0,
        *,
        stage: Optional[StageContext] = None,
    ) -> Optional[list[list[int]]]:
        """Generated ids for each prompt of ``batch``.

        ``None`` on pipeline ranks other than the first, and with data-parallel
        attention or tensor parallelism on every rank but the first stage's first
        attention-DP and tensor-parallel rank.
        """
        stage = stage or StageContext(device=self.device)
        prompts = list(batch)
        self._check_prompts(prompts, batch_idx)
        parts = self._parts(stage)
        generator = PipelineGenerator(
            parts,
            stage,
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            planner=self._planner(parts, stage),
            num_microbatches=self._microbatches(stage),
        )
        dp = stage.attn_dp_group
        if dp is None or dp.size == 1:
            outputs = generator.generate(prompts)
        else:
            outputs = generator.generate(share_prompts(prompts, dp.rank, dp.size))
            if outputs is not None:  # first stage: attention-DP rank 0 gets the whole batch
                outputs = gather_shared_outputs(outputs, dp)
        self.num_idle_forwards += generator.num_idle_forwards
        topology, _ = self._topology()
        if topology is not None and topology.coords.tp != 0:
            return None  # tensor-parallel peers hold copies of rank 0's outputs
        return outputs
