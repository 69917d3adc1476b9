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

from lightning_pp.distributed.topology import RankCoords, rank_of
from lightning_pp.integration.strategy_state import PipelineStrategyState
from lightning_pp.platform import platform_for

__all__ = ["PredictMixin", "drives_own_pipeline"]


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
        )

    # -- streaming predict ------------------------------------------------------------------
    #: Stream predict batches across batch boundaries (``False``: one forward-only
    #: schedule per batch, the fill/drain bubble every batch; benchmarks compare both).
    _predict_streaming: bool = True
    _predict_streams: Optional[dict] = None
    _muted_writers: Optional[list] = None

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
        """The stream for this ``predict_step`` call (created on a dataloader's first batch), and the batch index."""
        from lightning.pytorch.utilities.signature_utils import (
            is_param_in_hook_signature,
        )

        from lightning_pp.integration.predict_stream import PredictStream

        module = self.module
        assert self._pipelined is not None and self._predict_streams is not None
        trainer = module.trainer
        combined = trainer.predict_loop._combined_loader
        multiple = combined is not None and len(combined.flattened) > 1
        takes_batch_idx = is_param_in_hook_signature(module.predict_step, "batch_idx", min_args=2)
        rest = args[1:]
        dataloader_idx = int(rest[-1]) if multiple and rest else 0
        feed = self._predict_feed(dataloader_idx)
        if feed is None:
            return None, 0
        stream = self._predict_streams.get(dataloader_idx)
        if stream is None or stream.feed is not feed:
            feed.limit = trainer.predict_loop.max_batches[dataloader_idx]
            tail = (dataloader_idx,) if multiple else ()

            def step_args(k: int) -> tuple:
                return ((k,) if takes_batch_idx else ()) + tail

            def prepare(batch: Any) -> Any:
                batch = self.precision_plugin.convert_input(batch)
                return module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)

            stream = PredictStream(
                feed,
                stage=self._pipelined.stages[self.pp_rank],
                pipelined=self._pipelined,
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
            )
            self._predict_streams[dataloader_idx] = stream
        batch_idx = int(rest[0]) if takes_batch_idx else stream.next_batch
        return stream, batch_idx

    @override
    def process_dataloader(self, dataloader: object) -> object:
        from lightning_pp.integration.predict_stream import PredictFeed

        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if drives_own_pipeline(module):
            return dataloader
        if self._predict_streaming and self.virtual_stages == 1 and trainer is not None and trainer.predicting:
            return PredictFeed(dataloader)
        return super().process_dataloader(dataloader)

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        if self._predict_feed(dataloader_idx) is not None or drives_own_pipeline(self._lightning_module):
            # Deferred host-to-device copy: the pipeline copies each microbatch when it
            # launches, from pinned memory where the platform can do so asynchronously.
            return batch
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def on_predict_start(self) -> None:
        from lightning_pp.integration.predict_stream import mute_prediction_writers

        self._predict_streams = {}
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
        if self.dp_size > 1:
            self._gather_replica_predictions()

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
            if merged is None:
                merged = [batch for replica in replicas for batch in replica[i][0]]
            # In place: the loop already handed this list to `trainer.predict` as its result.
            predictions[:] = merged
