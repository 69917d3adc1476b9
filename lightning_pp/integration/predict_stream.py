"""Lightning glue for streaming pipelined ``trainer.predict``.

Lightning calls ``predict_step`` once per batch, on every rank in lockstep. To
keep the pipeline full across batch boundaries the first stage must start batch
``k + 1`` while batch ``k`` drains, before Lightning has handed it over. So:

* :class:`PredictFeed` wraps the predict dataloader (``Strategy.process_dataloader``)
  and lets the pipeline read batches ahead of Lightning; Lightning still receives
  every batch, in order, from the same feed.
* :class:`PredictStream` (one per dataloader) turns batches into stream
  microbatches and drives :class:`~lightning_pp.pipeline.streaming.StreamingPipeline`:
  ``predict_step(k)`` runs ticks until batch ``k``'s last microbatch is back on
  the first stage, which returns batch ``k``'s output; the microbatches of the
  next batches are already in flight.

Lightning's batch hooks run once per batch, in order, when the pipeline reads the
batch (so possibly before Lightning reaches it): ``on_before_batch_transfer``,
``transfer_batch_to_device``, ``on_after_batch_transfer``. Where the user overrides
neither of the last two, inputs instead stay on the host (pinned where the
platform can copy asynchronously) until their microbatch launches, and only then
are copied to the device. Lightning's own calls of the hooks for the batch it hands
to ``predict_step`` are skipped (``PredictMixin``), and Lightning gets the batch the
hooks made. No code path reads a microbatch that is not there: a missing one raises.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_pp.distributed.p2p import PipeComm
from lightning_pp.pipeline.block_stage import BlockPipeline
from lightning_pp.pipeline.executor import run_step_to_end, run_step_to_first_stage
from lightning_pp.pipeline.microbatch import batch_rows, split_microbatches
from lightning_pp.pipeline.step_outputs import OutputRows, concat_outputs, join_rows, split_rows
from lightning_pp.pipeline.streaming import StreamingPipeline
from lightning_pp.platform import Platform
from lightning_pp.tree import map_tensors

__all__ = ["PredictFeed", "PredictStream", "gather_replica_predictions", "mute_prediction_writers"]


class PredictFeed:
    """A predict dataloader that the pipeline may read ahead of Lightning.

    Iterating it (Lightning does) yields the loader's batches in order. While an
    iteration is open, :meth:`get` returns batch ``i`` for the pipeline, reading
    from the loader as far as needed; a batch is dropped once both sides had it.
    Other attributes (``batch_sampler``, ``dataset``, ...) are the loader's, so
    Lightning still finds the batch indices it gives prediction writers.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.limit: float = float("inf")
        self._iterator: Optional[Iterator[Any]] = None
        self._batches: dict[int, Any] = {}
        self._num_read = 0
        self._exhausted = False
        self._delivered = 0  # batches Lightning has taken
        self._taken = 0  # batches the pipeline has taken

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        """Starts a new pass over the loader (for Lightning and the pipeline alike)."""
        self._iterator = iter(self.loader)
        self._batches.clear()
        self._num_read, self._delivered, self._taken = 0, 0, 0
        self._exhausted = False
        return _FeedIterator(self)

    def _next(self) -> Any:
        if not self._has(self._delivered):
            raise StopIteration
        batch = self._batches[self._delivered]
        self._delivered += 1
        self._forget()
        return batch

    def get(self, index: int) -> Optional[Any]:
        """Batch ``index`` for the pipeline, or ``None`` past the end (or Lightning's limit)."""
        if not self._has(index):
            return None
        batch = self._batches[index]
        self._taken = max(self._taken, index + 1)
        self._forget()
        return batch

    def _has(self, index: int) -> bool:
        if self._iterator is None:
            raise RuntimeError("PredictFeed.get() before Lightning started iterating the predict dataloader.")
        while self._num_read <= index and not self._exhausted and self._num_read < self.limit:
            try:
                self._batches[self._num_read] = next(self._iterator)
                self._num_read += 1
            except StopIteration:
                self._exhausted = True
        return index < self._num_read

    def _forget(self) -> None:
        for i in [i for i in self._batches if i < min(self._delivered, self._taken)]:
            del self._batches[i]


class _FeedIterator:
    """Lightning's side of a pass: ``iter()`` on it must not start the pass over."""

    def __init__(self, feed: PredictFeed) -> None:
        self.feed = feed

    def __iter__(self) -> "_FeedIterator":
        return self

    def __next__(self) -> Any:
        return self.feed._next()


class PredictStream:
    """Streams one predict dataloader's batches through the pipeline.

    Args:
        feed: the wrapped dataloader.
        stage: this rank's pipeline stage.
        pipelined: the module's ``PipelinedSequential`` (its ``handler`` answers the user's call).
        user_step: the LightningModule's ``predict_step``.
        step_args: builds the step's extra positional args for batch ``k`` (batch index, dataloader index).
        prepare: Lightning's batch hooks, run once per batch when it is read (``convert_input``,
            ``on_before_batch_transfer``, and the transfer hooks unless ``defer_copy``).
        num_microbatches: microbatches per batch (fewer for a batch with fewer rows).
        pp_rank, pp_size, comm: the pipeline.
        device: where microbatches run.
        platform: pins host inputs and copies them to ``device``.
        sequential_name: how the user knows the Sequential, for error messages.
        blocks: for a model pipelined by its block list, this rank's
            :class:`~lightning_pp.pipeline.block_stage.BlockPipeline` (``pipelined`` is then
            unused): every stage runs each microbatch's step, as that stage, so every
            stage reads the batches (values between blocks are recomputed from them).
        defer_copy: ``prepare`` leaves the batch on the host: pin each microbatch and
            copy it to ``device`` when it launches. ``False``: ``prepare`` moved it.
    """

    def __init__(
        self,
        feed: PredictFeed,
        *,
        stage: torch.nn.Module,
        pipelined: Any,
        user_step: Callable[..., Any],
        step_args: Callable[[int], tuple],
        prepare: Callable[[Any], Any],
        num_microbatches: int,
        pp_rank: int,
        pp_size: int,
        comm: Optional[PipeComm],
        device: torch.device,
        platform: Platform,
        sequential_name: str,
        blocks: Optional[BlockPipeline] = None,
        defer_copy: bool = True,
    ) -> None:
        self.feed = feed
        self.pipelined = pipelined
        self.user_step, self.step_args, self.prepare = user_step, step_args, prepare
        self.num_microbatches = num_microbatches
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.device, self.platform = device, platform
        self.sequential_name = sequential_name
        self.defer_copy = defer_copy
        self.blocks = blocks
        self._needs_data = blocks is not None or pp_rank in (0, pp_size - 1)
        self._starts: list[int] = [0]  # _starts[k] = first stream microbatch of batch k
        # stream microbatch -> its input (first/last rank): on the host when the copy is deferred
        self._host: dict[int, Any] = {}
        self._rows: dict[int, int] = {}  # stream microbatch -> its rows (first rank joins outputs by them)
        self._prepared: dict[int, Any] = {}  # batch -> what the hooks made of it, until Lightning takes it
        self._results: dict[int, Any] = {}
        self._done = False
        self._next_batch = 0  # the batch predict_step expects next
        self.pipeline = StreamingPipeline(
            stage,
            pp_rank,
            pp_size,
            comm,
            exists=self._exists,
            launch=self._launch,
            finish=self._finish,
            on_result=self._results.__setitem__,
            middle=self._middle if blocks is not None else None,
            platform=platform,
        )

    # -- reading ahead -------------------------------------------------------------------
    def _read_batch(self) -> bool:
        """Reads the next batch from the feed and registers its microbatches."""
        k = len(self._starts) - 1
        batch = None if self._done else self.feed.get(k)
        if batch is None:
            self._done = True
            return False
        batch = self.prepare(batch)
        self._prepared[k] = batch
        rows = batch_rows(batch)
        parts = split_microbatches(batch, min(self.num_microbatches, rows))
        for j, part in enumerate(parts):
            g = self._starts[k] + j
            if self.pp_rank == 0:
                self._rows[g] = batch_rows(part)
            if self._needs_data:
                self._host[g] = map_tensors(self.platform.pin, part) if self.defer_copy else part
        self._starts.append(self._starts[k] + len(parts))
        return True

    def prepared_batch(self, k: int) -> Any:
        """Batch ``k`` as Lightning's batch hooks made it (read now if the pipeline has not yet), handed over once.

        Lightning passes it to ``predict_step`` and the batch callbacks, as one device does.
        """
        while len(self._starts) - 1 <= k and self._read_batch():
            pass
        if k not in self._prepared:
            raise RuntimeError(
                f"PPStrategy's streaming predict has no batch {k} on pipeline rank {self.pp_rank}: it is missing "
                "from the predict dataloader or was already handed to Lightning."
            )
        return self._prepared.pop(k)

    def _exists(self, g: int) -> bool:
        while g >= self._starts[-1]:
            if not self._read_batch():
                return False
        return True

    def _batch_of(self, g: int) -> int:
        lo, hi = 0, len(self._starts) - 2
        while lo < hi:  # last k with _starts[k] <= g
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= g:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # -- running the user's step -----------------------------------------------------------
    def _device_microbatch(self, g: int) -> Any:
        """Deferred host-to-device copy: a microbatch reaches the device only when it launches."""
        if g not in self._host:
            raise RuntimeError(
                f"pipeline rank {self.pp_rank}: stream microbatch {g} has no input on the host; it was either never "
                "read or already released."
            )
        # Each of the first and last rank runs a microbatch's step once: the host copy goes now.
        microbatch = self._host.pop(g)
        if not self.defer_copy:  # the user's transfer hooks already put it where they want it
            return microbatch
        return map_tensors(lambda t: self.platform.to_device(t, self.device), microbatch)

    def _launch(self, g: int) -> Any:
        microbatch = self._device_microbatch(g)
        args = self.step_args(self._batch_of(g))
        if self.blocks is not None:
            return self._run_block_stage(microbatch, args, None)

        def run(handler: Callable[[Any], Any]) -> Any:
            return self._run_with(microbatch, args, handler)

        if self.pp_size == 1:
            return run_step_to_end(run, self.pipeline.stage, self.sequential_name)
        return run_step_to_first_stage(run, self.pipeline.stage, self.sequential_name)

    def _finish(self, g: int, activation: Any) -> Any:
        microbatch = self._device_microbatch(g)
        args = self.step_args(self._batch_of(g))
        if self.blocks is not None:
            return self._run_block_stage(microbatch, args, activation)

        def run(handler: Callable[[Any], Any]) -> Any:
            return self._run_with(microbatch, args, handler)

        return run_step_to_end(run, lambda _first_stage_input: self.pipeline.stage(activation), self.sequential_name)

    def _middle(self, g: int, activation: Any) -> Any:
        return self._run_block_stage(self._device_microbatch(g), self.step_args(self._batch_of(g)), activation)

    def _run_block_stage(self, microbatch: Any, args: tuple, activation: Any) -> Any:
        """Microbatch's step as this rank's stage of the block list: its output, or the step's result (last)."""
        assert self.blocks is not None
        last = self.pp_rank == self.pp_size - 1
        return self.blocks.run_stage(
            self.pp_rank, activation, lambda: self.user_step(microbatch, *args), stop=not last
        )

    def _run_with(self, microbatch: Any, args: tuple, handler: Callable[[Any], Any]) -> Any:
        self.pipelined.handler = handler
        try:
            return self.user_step(microbatch, *args)
        finally:
            self.pipelined.handler = None

    def close(self) -> None:
        """Stops the pipeline's communication thread."""
        self.pipeline.close()
        self._prepared.clear()

    # -- one Lightning step --------------------------------------------------------------
    @property
    def next_batch(self) -> int:
        """The batch index :meth:`step` expects next."""
        return self._next_batch

    def step(self, batch_idx: int) -> Any:
        """Runs until batch ``batch_idx`` is complete; returns its output on the first rank, else ``None``."""
        if batch_idx != self._next_batch:
            raise RuntimeError(
                f"PPStrategy's streaming predict expected batch {self._next_batch} but Lightning asked for "
                f"{batch_idx}. "
                "Batches must be predicted in order, each once."
            )
        self._next_batch += 1
        if not self._exists(self._starts[batch_idx]):
            raise RuntimeError(
                f"batch {batch_idx} is missing from the predict dataloader on pipeline rank {self.pp_rank}"
            )
        first, end = self._starts[batch_idx], self._starts[batch_idx + 1]
        last_tick = self.pipeline.completion_tick(end - 1)
        if self.pp_rank == 0:
            # Rank 0 needs the batch's last result, which the last rank makes in the same tick.
            # It computes one tick more before it waits for that result, so the wait overlaps
            # compute instead of holding the ring's source (and with it every rank) still.
            self.pipeline.run_until(last_tick + 1, wait=False)
            self.pipeline.wait_for_exchange(last_tick)
        else:
            # The others go straight on to the next batch while their sends complete.
            self.pipeline.run_until(last_tick, wait=False)
        for g in range(first, end):
            self._host.pop(g, None)
        if self.pp_rank != 0:
            return None
        outputs = [self._results.pop(g) for g in range(first, end)]
        return concat_outputs(outputs, [self._rows.pop(g) for g in range(first, end)])


# -- writers and data-parallel results ---------------------------------------------------------
def mute_prediction_writers(callbacks: Sequence[Any]) -> list[Any]:
    """Silences ``BasePredictionWriter`` callbacks on a rank that holds no predictions.

    Returns the writers muted, for :func:`unmute_prediction_writers`.
    """
    muted = []
    for callback in callbacks:
        if isinstance(callback, BasePredictionWriter):
            callback.write_on_batch_end = _skip  # type: ignore[method-assign]
            callback.write_on_epoch_end = _skip  # type: ignore[method-assign]
            muted.append(callback)
    return muted


def unmute_prediction_writers(writers: Sequence[Any]) -> None:
    for writer in writers:
        for name in ("write_on_batch_end", "write_on_epoch_end"):
            writer.__dict__.pop(name, None)


def _skip(*_: Any, **__: Any) -> None:
    return None


def gather_replica_predictions(
    replicas: Sequence[tuple[list[Any], list[list[int]]]], batch_size: Optional[int]
) -> list[Any]:
    """Merges data-parallel replicas' predictions into what one device returns.

    Rows are cut and joined by the rule of :mod:`lightning_pp.pipeline.step_outputs`
    (tensors along dim 0, lists with one entry per row, through tuples and dicts).

    Args:
        replicas: per replica, its per-batch outputs and the dataset indices of each batch.
        batch_size: the one-device batch size (``None``: the largest batch seen).

    Returns:
        Per-batch outputs over the whole dataset in dataset-index order, each index
        once (a distributed sampler's padding duplicates are dropped), batched as one
        device batches them.

    Raises:
        ValueError: the rows cannot be regrouped (no dataset indices, a value that is
            not per row, shapes that do not concatenate); the message says what works.
    """
    for replica, (outputs, indices) in enumerate(replicas):
        if len(outputs) != len(indices):
            raise ValueError(
                f"Data-parallel replica {replica} has {len(outputs)} batches of predictions but dataset indices for "
                f"{len(indices)}, so PPStrategy cannot put its rows back in dataset order. Use a map-style dataset "
                "(Lightning records each batch's indices through its batch sampler), or write each replica's "
                "predictions with a BasePredictionWriter and call trainer.predict(..., return_predictions=False)."
            )
    outputs = [output for replica_outputs, _ in replicas for output in replica_outputs]
    indices = [batch for _, replica_indices in replicas for batch in replica_indices]
    size = batch_size or max((len(batch) for batch in indices), default=0)
    num_rows = len({i for batch in indices for i in batch})
    if all(output is None for output in outputs):  # nothing to regroup: one None per one-device batch
        return [None] * -(-num_rows // size) if size else []
    # Every batch is read alike (which lists are per-row), then cut into rows by dataset index.
    rows: dict[int, OutputRows] = {}
    for part, batch_indices in zip(split_rows(outputs, [len(batch) for batch in indices]), indices):
        for i, index in enumerate(batch_indices):
            if index not in rows:  # a distributed sampler's padding repeats rows
                rows[index] = part.take(i, i + 1)
    ordered = [rows[i] for i in sorted(rows)]
    return [join_rows(ordered[j : j + size]) for j in range(0, len(ordered), size)]
