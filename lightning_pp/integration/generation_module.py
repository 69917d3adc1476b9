"""``trainer.predict`` for text generation: a LightningModule around a :class:`DecoderLM`.

::

    model = GenerationModule.from_pretrained(ckpt_dir, max_new_tokens=64)   # weights + the directory's tokenizer
    loader = DataLoader(PromptDataset(texts, model.tokenizer), batch_size=8, collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PPStrategy(),
                        callbacks=[StreamingPredictionWriter("out/run")])
    trainer.predict(model, loader, return_predictions=False)   # rows {"text", "token_ids", "finish_reason"}

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
list with one entry per prompt: with a tokenizer (the module's, or the
:class:`PromptDataset`'s, taken over at setup) a dict ``{"text": ..., "token_ids":
[...], "finish_reason": "eos" | "stop" | "length"}``, the text decoded and cut
before any stop string (:mod:`lightning_pp.generation.text`); without one, the
generated id list (EOS included); with ``mode="score"`` the per-token
log-probabilities of each (prompt, continuation) pair::

    scorer = GenerationModule(lm, mode="score")
    loader = DataLoader(ScoreDataset([(prompt_ids, continuation_ids), ...]), batch_size=8,
                        collate_fn=collate_prompts)
    logprobs = L.Trainer(...).predict(scorer, loader)   # [[log p(c_0 | prompt), log p(c_1 | prompt, c_0), ...], ...]

Sampling (``temperature``, ``top_k``, ``top_p``, ``seed``) draws the token of a
prompt at a position from a random number fixed by the seed, the prompt's dataset
index (:attr:`PromptItem.index`) and the position, so the same seed gives the same
tokens on one device, through a pipeline of any depth, and with data-parallel
attention. Bare tensors take their index from the order the module sees them in.

Continuous batching (``max_running=N``): the batch is the window prompts are
admitted from; at most ``N`` run at once and a finished one's place goes to a
waiting one in the next forward (:mod:`lightning_pp.generation.scheduler`). The
prediction of a batch is still one entry per prompt, in the batch's order.

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

import os
import warnings
from typing import Any, Optional, Sequence, Union

import lightning as L
import torch
from torch import nn
from torch.utils.data import Subset, default_collate

from lightning_pp.distributed.topology import RankTopology
from lightning_pp.generation.chunking import ChunkPlanner
from lightning_pp.generation.engine import (
    PipelineGenerator,
    StageContext,
    StageParts,
    init_chunk_planner,
)
from lightning_pp.generation.prompt_checks import PromptRules
from lightning_pp.generation.prompts import PromptDataset, PromptItem, ScoreDataset, collate_prompts
from lightning_pp.generation.sampling import SamplingParams
from lightning_pp.generation.scheduler import check_max_running
from lightning_pp.generation.text import StopStrings, check_stop_strings, has_tokenizer, load_tokenizer
from lightning_pp.models.llama import DecoderLM, shard_layers
from lightning_pp.models.tp_block import BlockGroups
from lightning_pp.parallel.dp_attention import gather_shared_outputs, share_prompts

__all__ = ["MODES", "GenerationModule", "PromptDataset", "PromptItem", "ScoreDataset", "collate_prompts"]

#: What :meth:`GenerationModule.from_pretrained` does about a tokenizer by default: the directory's own, if any.
_FROM_DIRECTORY = "auto"

#: What :class:`GenerationModule` does with each prompt.
MODES = ("generate", "score")


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
        tokenizer: decodes the outputs into text (then each prompt's output is a
            ``{"text", "token_ids", "finish_reason"}`` dict); ``None`` takes the
            :class:`PromptDataset`'s tokenizer, if it has one.
        stop: stop strings of every prompt that does not set its own (needs a tokenizer).
        truncate: a prompt that would run past the model's ``max_position_embeddings``
            keeps its last tokens, as many as leave room for its ``max_new_tokens``,
            instead of being refused.
        max_running: continuous batching: at most this many sequences of a batch in
            flight (per pipeline; with attention-DP, per attention-DP rank), and when
            one finishes a waiting prompt of the batch takes its place at once (longest
            ``max_new_tokens`` first, see :mod:`lightning_pp.generation.scheduler`).
            Give the DataLoader a ``batch_size`` several times larger: the batch is
            the window prompts are admitted from. ``None`` (the default): the whole
            batch starts at once, and the batch ends with its longest sequence. At
            least the number of microbatches. Outputs do not change, only their speed.
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
        tokenizer: Any = None,
        stop: Union[str, Sequence[str], None] = None,
        truncate: bool = False,
        max_running: Optional[int] = None,
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
        if mode == "score" and (stop is not None or truncate):
            raise ValueError("mode='score' decodes nothing and cuts nothing: drop stop and truncate.")
        self.mode = mode
        self.sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        self.tokenizer = tokenizer
        self.stop = check_stop_strings(stop, "GenerationModule(stop=...)")
        self.truncate = truncate
        check_max_running(max_running, 1)  # against the microbatches once the stage is known
        self.max_running = max_running
        #: Prompts admitted into a finished sequence's place so far (continuous batching), and
        #: forwards launched, on this rank's first stage (0 on later stages).
        self.num_admitted = self.num_forwards = 0
        #: Where :meth:`from_pretrained` read the model (named in errors about a missing tokenizer).
        self.checkpoint_dir: Optional[str] = None
        #: Prompts finished and tokens generated so far, on the rank that returns the outputs.
        self.num_prompts_done = 0
        self.num_tokens_generated = 0
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

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        tokenizer: Any = _FROM_DIRECTORY,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> "GenerationModule":
        """A module for a local Hugging Face checkpoint directory: its weights and, when it has one, its tokenizer.

        Args:
            path: the directory (``config.json``, ``*.safetensors``, tokenizer files);
                nothing is downloaded.
            tokenizer: ``"auto"`` (the default): the directory's tokenizer if it has
                one, else none (token-id prompts; a :class:`PromptDataset`'s tokenizer
                is still taken over). A tokenizer object or another local directory,
                or ``None`` for none.
            dtype: the weights' dtype.
            kwargs: the other arguments of :class:`GenerationModule`.

        Raises:
            FileNotFoundError: no ``config.json``/safetensors, or ``tokenizer`` names a
                directory without a tokenizer.
            ValueError: an architecture :class:`DecoderLM` does not implement (the
                message lists those it does).
        """
        lm = DecoderLM.from_pretrained(path, dtype=dtype)
        if isinstance(tokenizer, str) and tokenizer == _FROM_DIRECTORY:
            tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        module = cls(lm, tokenizer=tokenizer, **kwargs)
        module.checkpoint_dir = os.fspath(path)
        return module

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
        """Checks the prompts' loader before the first batch, and takes over a :class:`PromptDataset`'s tokenizer.

        Every rank runs this alike, so a refusal here stops every rank before any of
        them waits for another.
        """
        if stage != "predict":
            return
        # NOTE: the loader given to trainer.predict, before Lightning iterates it. Lightning
        # 2.6 keeps it on the predict loop's data source; a datamodule's loader is not
        # built here (that would build it twice).
        source = getattr(getattr(self.trainer, "predict_loop", None), "_data_source", None)
        loaders = getattr(source, "instance", None)
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            dataset = getattr(loader, "dataset", None)
            while isinstance(dataset, Subset):  # StreamingPredictionWriter.pending() wraps the dataset
                dataset = dataset.dataset
            encoder = getattr(dataset, "tokenizer", None)
            if self.tokenizer is None and encoder is not None:
                self.tokenizer = encoder  # the one that encoded the prompts decodes the outputs
            wants_stop = bool(self.stop) or any(getattr(dataset, "stop", None) or ())
            if wants_stop and self.tokenizer is None:
                where = f"{self.checkpoint_dir} has no tokenizer" if self.checkpoint_dir else "there is no tokenizer"
                raise ValueError(
                    f"Stop strings are found in the decoded text, but {where}: pass GenerationModule(tokenizer=...) "
                    "or PromptDataset(prompts, tokenizer)."
                )
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
        PromptRules(
            vocab_size=self.config.vocab_size,
            max_positions=self.config.max_position_embeddings,
            mode=self.mode,
            max_new_tokens=self.max_new_tokens,
            default_stop=bool(self.stop),
            has_tokenizer=self.tokenizer is not None,
            truncate=self.truncate,
        ).check(items, batch_idx)

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
    ) -> Optional[list[Any]]:
        """Per prompt: its generation (a text record with a tokenizer, else ids), or its scores (``"score"``).

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
            max_running=self.max_running,
        )
        dp = stage.attn_dp_group
        shared = items if dp is None or dp.size == 1 else share_prompts(items, dp.rank, dp.size)
        outputs: Optional[list] = self._run(generator, shared)
        if dp is not None and dp.size > 1 and outputs is not None:  # first stage: attention-DP rank 0 gets all
            outputs = gather_shared_outputs(outputs, dp)
        self.num_idle_forwards += generator.num_idle_forwards
        self.num_admitted += generator.num_admitted
        self.num_forwards += generator.num_forwards
        topology, _ = self._topology()
        if topology is not None and topology.coords.tp != 0:
            return None  # tensor-parallel peers hold copies of rank 0's outputs
        if outputs is not None and self.mode == "generate":
            self.num_prompts_done += len(outputs)
            self.num_tokens_generated += sum(len(o["token_ids"] if isinstance(o, dict) else o) for o in outputs)
        return outputs

    def _stop_strings(self, item: PromptItem) -> Optional[StopStrings]:
        if self.tokenizer is None:
            return None
        return StopStrings(self.tokenizer, self.stop if item.stop is None else item.stop)

    def _run(self, generator: PipelineGenerator, items: list[PromptItem]) -> Optional[list]:
        prompts = [item.input_ids for item in items]
        if self.mode == "score":
            return generator.score(prompts, [item.continuation for item in items])  # type: ignore[misc]
        stoppers = [self._stop_strings(item) for item in items]
        generated = generator.generate(
            prompts,
            keys=[item.index for item in items],
            max_new_tokens=[item.max_new_tokens for item in items],
            stop=[s.checker() if s is not None else None for s in stoppers],
        )
        if generated is None or self.tokenizer is None:
            return generated
        # The text leaves out an EOS token that ended the sequence, whether or not the
        # tokenizer marks it special; the ids keep it.
        return [
            {"text": stopper.finish(ids[:-1] if reason == "eos" else ids), "token_ids": ids, "finish_reason": reason}
            for ids, reason, stopper in zip(generated, generator.finish_reasons, stoppers)
            if stopper is not None
        ]
