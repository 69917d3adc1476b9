"""``PPStrategy``'s prediction hooks: streaming ``trainer.predict`` and self-driven generation.

Kept apart from the training strategy so each file does one job. The mixin reads
the strategy's pipeline state (``pp_rank``, ``_pipelined``, ``_comm``, ...) and
drives :mod:`lightning_pp.integration.predict_stream` (streaming batch inference) or, for modules
that run their own loop (``GenerationModule``), :mod:`lightning_pp.generation.engine`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from typing_extensions import override

from lightning_pp.distributed.objects import all_gather_int
from lightning_pp.distributed.topology import RankCoords, rank_of
from lightning_pp.integration.shuffling import agree_on_shuffling
from lightning_pp.integration.strategy_state import PipelineStrategyState
from lightning_pp.platform import platform_for

__all__ = ["PredictMixin", "drives_own_pipeline"]

#: Batch hooks that make the deferred per-microbatch copy impossible: overriding either
#: means the whole batch is moved (and changed) as one device does it.
_TRANSFER_HOOKS = ("transfer_batch_to_device", "on_after_batch_transfer")


def _overrides_batch_hook(trainer: Any, name: str) -> bool:
    """Whether the LightningModule or DataModule whose ``name`` hook Lightning calls overrides it."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    selector = trainer._data_connector._datahook_selector
    instance = selector.get_instance(name) if selector is not None else trainer.lightning_module
    return is_overridden(name, instance)


def drives_own_pipeline(module: Any) -> bool:
    """A module (e.g. ``GenerationModule``) whose ``predict_step`` runs the stages itself."""
    trainer = getattr(module, "_trainer", None) if module is not None else None
    return bool(getattr(module, "drives_own_pipeline", False)) and trainer is not None and trainer.predicting


class PredictMixin(PipelineStrategyState):
    """Prediction hooks of :class:`~lightning_pp.integration.strategy.PPStrategy`."""

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """Streams batches through the pipeline; returns batch ``k``'s output on each replica's first stage.

        Other stages return ``None`` (prediction writers are muted there). See
        :mod:`lightning_pp.integration.predict_stream`.
        """
        if drives_own_pipeline(self._lightning_module):
            # Generation runs its own loop over the stages (lightning_pp.generation.engine).
            with self.precision_plugin.predict_step_context():
                return self.module.predict_step(*args, stage=self._generation_stage(), **kwargs)
        stream, batch_idx = self._predict_stream(args)
        if stream is None:
            return self._eval_step("predict_step", args, kwargs, combine="concat")
        with self.precision_plugin.predict_step_context():
            return stream.step(batch_idx)

    def _generation_stage(self) -> Any:
        """This rank's place in the pipeline, for modules that drive their own pipeline loop."""
        from lightning_pp.generation.engine import StageContext

        assert self._comm is not None and self.topology is not None
        # With data-parallel attention the cp ranks of a stage run separate sequences.
        data_parallel_attention = self.attention_mode == "data" and self.topology.cp.size > 1
        return StageContext(
            pp_rank=self.pp_rank,
            pp_size=self.pp_size,
            comm=self._comm if self.pp_size > 1 else None,
            device=self.root_device,
            platform=platform_for(self.root_device),
            control_group=self._pp_cpu_group if self._pp_cpu_group is not None else self._pp_group,
            first_stage_rank=self._comm.global_rank(0),
            attn_dp_group=self.topology.cp if data_parallel_attention else None,
            attn_tp_size=self.topology.tp.size,
            num_microbatches=self._requested_microbatches,
        )

    # -- streaming predict ------------------------------------------------------------------
    #: Stream predict batches across batch boundaries (``False``: one forward-only
    #: schedule per batch, the fill/drain bubble every batch; benchmarks compare both).
    _predict_streaming: bool = True
    _predict_streams: Optional[dict] = None
    _muted_writers: Optional[list] = None
    _takes_batch_idx = False  # whether predict_step takes batch_idx: read once, when a stream is made

    def _predict_feed(self, dataloader_idx: int) -> Any:
        """The read-ahead feed of predict dataloader ``dataloader_idx``, or ``None`` when not streaming."""
        from lightning_pp.integration.predict_stream import PredictFeed

        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is None or not trainer.predicting or self._predict_streams is None:
            return None
        combined = trainer.predict_loop._combined_loader
        if combined is None or not 0 <= dataloader_idx < len(combined.flattened):
            return None
        feed = combined.flattened[dataloader_idx]
        return feed if isinstance(feed, PredictFeed) else None

    def _predict_stream(self, args: tuple) -> tuple[Any, int]:
        """The stream for this ``predict_step`` call, and the batch index (``None, 0`` when not streaming)."""
        rest = args[1:]
        dataloader_idx = int(rest[-1]) if self._predicts_several_loaders() and rest else 0
        stream = self._stream_for(dataloader_idx)
        if stream is None:
            return None, 0
        batch_idx = int(rest[0]) if self._takes_batch_idx else stream.next_batch
        return stream, batch_idx

    def _predicts_several_loaders(self) -> bool:
        combined = self.module.trainer.predict_loop._combined_loader
        return combined is not None and len(combined.flattened) > 1

    def _stream_for(self, dataloader_idx: int) -> Any:
        """The stream of predict dataloader ``dataloader_idx`` (created on its first batch), or ``None``."""
        from lightning.pytorch.utilities.signature_utils import (
            is_param_in_hook_signature,
        )

        from lightning_pp.integration.predict_stream import PredictStream

        feed = self._predict_feed(dataloader_idx)
        if feed is None:
            return None
        assert (self._pipelined or self._blocks) is not None and self._predict_streams is not None
        stream = self._predict_streams.get(dataloader_idx)
        if stream is not None and stream.feed is feed:
            return stream
        module = self.module
        trainer = module.trainer
        feed.limit = trainer.predict_loop.max_batches[dataloader_idx]
        takes_batch_idx = is_param_in_hook_signature(module.predict_step, "batch_idx", min_args=2)
        self._takes_batch_idx = takes_batch_idx  # for _predict_stream, at every batch
        tail = (dataloader_idx,) if self._predicts_several_loaders() else ()
        defer_copy = not any(_overrides_batch_hook(trainer, name) for name in _TRANSFER_HOOKS)
        before_batch_transfer = type(module)._on_before_batch_transfer  # not the guard set in on_predict_start

        def step_args(k: int) -> tuple:
            return ((k,) if takes_batch_idx else ()) + tail

        def prepare(batch: Any) -> Any:
            # Lightning's three batch hooks, in its order, once per batch (`_predict_step` in
            # lightning/pytorch/loops/prediction_loop.py); see `_guard_batch_hooks`.
            batch = self.precision_plugin.convert_input(batch)
            batch = before_batch_transfer(module, batch, dataloader_idx=dataloader_idx)
            if defer_copy:  # default transfer (copied per microbatch at launch), no on_after_batch_transfer
                return batch
            return module._apply_batch_transfer_handler(batch, device=self.root_device, dataloader_idx=dataloader_idx)

        stage: torch.nn.Module
        if self._pipelined is not None:
            stage = self._pipelined.stages[self.pp_rank]
        else:  # a block list: each stage runs the user's step as that stage (blocks=...)
            assert self._blocks is not None
            stage = self._blocks.container
        stream = PredictStream(
            feed,
            stage=stage,
            pipelined=self._pipelined,
            blocks=self._blocks,
            user_step=module.predict_step,
            step_args=step_args,
            prepare=prepare,
            num_microbatches=self.num_microbatches,
            pp_rank=self.pp_rank,
            pp_size=self.pp_size,
            comm=self._comm if self.pp_size > 1 else None,
            device=self.root_device,
            platform=platform_for(self.root_device),
            sequential_name=f"self.{self._pipelined_attr}",
            defer_copy=defer_copy,
        )
        self._predict_streams[dataloader_idx] = stream
        return stream

    def _guard_batch_hooks(self) -> None:
        """Makes Lightning's own ``on_before_batch_transfer`` call a no-op for streamed batches.

        The stream runs the batch hooks when it reads a batch, ahead of Lightning; the
        loop would run ``on_before_batch_transfer`` a second time on the batch it hands
        to ``predict_step`` (the transfer hooks go through :meth:`batch_to_device`).
        The guard delegates to the module's hook whenever the batch is not streamed,
        so one left behind by a failed ``predict`` changes nothing for ``fit``.
        """
        module = self.module
        hook = type(module)._on_before_batch_transfer

        def on_before_batch_transfer_once(batch: Any, dataloader_idx: int = 0) -> Any:
            if self._predict_feed(dataloader_idx) is not None:
                return batch
            return hook(module, batch, dataloader_idx=dataloader_idx)

        module._on_before_batch_transfer = on_before_batch_transfer_once  # type: ignore[method-assign]

    @override
    def process_dataloader(self, dataloader: object) -> object:
        from lightning_pp.integration.predict_stream import PredictFeed

        if self.pp_size > 1 and self.topology is not None:
            # Every stage reads the batches: a shuffled loader must give each the same order.
            agree_on_shuffling(dataloader, self._first_stage_value)
        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if drives_own_pipeline(module):
            return dataloader
        streams = self._predict_streaming and self.virtual_stages == 1
        if streams and trainer is not None and trainer.predicting:
            return PredictFeed(dataloader)
        return super().process_dataloader(dataloader)

    def _first_stage_value(self, value: int) -> int:
        """``value`` as the pipeline's first stage has it (a collective over the pipeline's ranks)."""
        assert self.topology is not None
        return all_gather_int(
            value,
            self.topology.pp.cpu_group,
            operation="agree on the order of shuffled batches over the pipeline",
            timeout=self._timeout,
        )[0]

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        stream = self._stream_for(dataloader_idx)
        if stream is not None:
            # The stream already ran the batch hooks on this batch when it read it (the
            # copy itself may be deferred to each microbatch's launch): Lightning's
            # `predict_step` and batch callbacks get what the hooks made, as on one device.
            return stream.prepared_batch(stream.next_batch)
        if drives_own_pipeline(self._lightning_module):
            # Generation copies each microbatch to its device when it launches.
            return batch
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def on_predict_start(self) -> None:
        from lightning_pp.integration.predict_stream import mute_prediction_writers

        # Every stage of a replica must run the same batches, or a stage waits forever for
        # a transfer its peer never makes: fail here, before any rank blocks.
        self._check_same_on_pipeline("predict batches", self.module.trainer.num_predict_batches)
        self._predict_streams = {}
        self._guard_batch_hooks()
        coords = self.topology.coords if self.topology is not None else None
        if self.pp_rank != 0 or (coords is not None and (coords.cp, coords.tp) != (0, 0)):
            # Only the first stage of a replica holds its predictions; its other cp/tp
            # ranks hold copies (tensor parallelism) or a share (data-parallel attention).
            # Trainer.callbacks is assigned by Lightning's callback connector, so mypy cannot see it.
            self._muted_writers = mute_prediction_writers(self.module.trainer.callbacks)  # type: ignore[attr-defined]

    @override
    def on_predict_end(self) -> None:
        from lightning_pp.integration.predict_stream import unmute_prediction_writers

        unmute_prediction_writers(self._muted_writers or [])
        self._muted_writers = None
        for stream in (self._predict_streams or {}).values():
            stream.close()
        self._predict_streams = None
        self.module.__dict__.pop("_on_before_batch_transfer", None)  # the guard of on_predict_start
        if self.dp_size > 1:
            self._gather_replica_predictions()

    @override
    def teardown(self) -> None:
        # A predict that failed never reached on_predict_end: its hook guard goes here.
        if self._lightning_module is not None:
            self._lightning_module.__dict__.pop("_on_before_batch_transfer", None)
        super().teardown()

    def _gather_replica_predictions(self) -> None:
        """Global rank 0 gets every replica's predictions, as one device would return them."""
        from lightning_pp.integration.predict_stream import gather_replica_predictions

        loop = self.module.trainer.predict_loop
        if not loop.return_predictions:
            return
        combined = loop._combined_loader
        per_loader = []
        for i, predictions in enumerate(loop._predictions):
            sampler = getattr(combined.flattened[i], "batch_sampler", None) if combined is not None else None
            indices = list(getattr(sampler, "seen_batch_indices", []))[: len(predictions)]
            per_loader.append((list(predictions), indices, getattr(sampler, "batch_size", None)))
        payload = per_loader if self.pp_rank == 0 else None
        gathered: Optional[list[Any]] = [None] * dist.get_world_size() if self.global_rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if gathered is None:
            return
        # Each replica's answer is on its first stage's first cp/tp rank.
        assert self.topology is not None, "the mesh exists from setup to teardown"
        shape = self.topology.shape
        replicas = [gathered[rank_of(RankCoords(pp=0, dp=d, cp=0, tp=0), shape)] for d in range(self.dp_size)]
        for i, predictions in enumerate(loop._predictions):
            merged = gather_replica_predictions(
                [(replica[i][0], replica[i][1]) for replica in replicas], per_loader[i][2]
            )
            # In place: the loop already handed this list to `trainer.predict` as its result.
            predictions[:] = merged
