"""A restartable prediction writer for offline jobs: JSONL rows, written as batches complete.

An offline job that streams a large dataset through a pipeline may be killed
half-way (preempted node, OOM, Ctrl-C). :class:`StreamingPredictionWriter`
appends each batch's rows to ``<dir>/part-<global rank>.jsonl`` as soon as
``predict_step`` returns them, flushed and ``fsync``-ed, so what is on disk is
what was computed. A restarted job asks :meth:`StreamingPredictionWriter.pending`
for the dataset rows not written yet and predicts only those; every row ends up
on disk exactly once::

    writer = StreamingPredictionWriter("out/preds")
    loader = DataLoader(writer.pending(dataset), batch_size=64)   # every rank, before predict
    trainer = L.Trainer(strategy=PPStrategy(), callbacks=[writer], ...)
    trainer.predict(model, loader, return_predictions=False)
    rows = read_predictions("out/preds")                           # [{"index": i, "prediction": ...}]

A kill can tear the last line of a file. Readers ignore a line without its
newline, and the writer cuts it off before it appends again, so the torn row is
simply predicted again. Under ``PPStrategy`` only the first stage of each replica
writes (the rank that holds the predictions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset, Subset

from lightning_pp.pipeline.step_outputs import split_rows
from lightning_pp.tree import map_tensors, tree_unflatten

__all__ = ["StreamingPredictionWriter", "read_predictions", "rows_of", "written_indices"]

RowsFn = Callable[[Any, int], Sequence[Any]]


def rows_of(prediction: Any, num_rows: int) -> list[Any]:
    """Splits a batch's prediction into JSON-ready rows, by the row rule of :mod:`lightning_pp.pipeline.step_outputs`.

    Tensors give their row along dim 0 (as nested lists; a 0-d tensor its number), a
    list with one entry per row gives that entry, tuples and dicts keep their
    structure, and values of the whole batch are repeated in every row.
    """
    rows = split_rows([prediction], [num_rows])[0]
    out = []
    for i in range(num_rows):
        row = rows.take(i, i + 1)
        leaves = [leaf if whole else leaf[0] for leaf, whole in zip(row.leaves, row.whole)]
        out.append(map_tensors(lambda t: t.tolist(), tree_unflatten(row.spec, leaves)))
    return out


def _complete_lines(path: Path) -> tuple[list[str], int]:
    """The file's complete lines and the byte length they span (a torn last line is left out)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode().splitlines(), end


def _part_files(output_dir: Union[str, Path]) -> list[Path]:
    directory = Path(output_dir)
    return sorted(directory.glob("part-*.jsonl")) if directory.is_dir() else []


def read_predictions(output_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """Every row written so far, by dataset index, each index once."""
    rows: dict[int, dict[str, Any]] = {}
    for path in _part_files(output_dir):
        for line in _complete_lines(path)[0]:
            record = json.loads(line)
            rows.setdefault(int(record["index"]), record)
    return [rows[i] for i in sorted(rows)]


def written_indices(output_dir: Union[str, Path]) -> set[int]:
    """Dataset indices already on disk."""
    return {record["index"] for record in read_predictions(output_dir)}


class StreamingPredictionWriter(BasePredictionWriter):
    """Writes each batch's predictions to JSONL as the batch completes; restarts skip what is written.

    Args:
        output_dir: directory of the ``part-*.jsonl`` files (created if missing).
        to_rows: ``to_rows(prediction, num_rows)`` returns one JSON-serialisable value
            per row; default :func:`rows_of`.
        fsync: force each batch to disk before going on (a kill then loses no
            finished batch); turn off for speed on scratch storage.
    """

    def __init__(self, output_dir: Union[str, Path], *, to_rows: Optional[RowsFn] = None, fsync: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.to_rows = to_rows or rows_of
        self.fsync = fsync
        self._index_map: Optional[list[int]] = None
        self._written: set[int] = set()
        self._file: Optional[Any] = None
        self.rows_written = 0

    def pending(self, dataset: Dataset) -> Dataset:
        """The rows of ``dataset`` not on disk yet, as a ``Subset``; predict this instead of ``dataset``.

        Call it on every rank before ``trainer.predict`` (every rank must get the same subset).
        """
        self._written = written_indices(self.output_dir)
        keep = [i for i in range(len(dataset)) if i not in self._written]  # type: ignore[arg-type]
        self._index_map = keep
        return Subset(dataset, keep)

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not batch_indices:
            raise RuntimeError(
                "StreamingPredictionWriter needs each batch's dataset indices, which Lightning knows only for a "
                "torch DataLoader with a batch sampler. Predict from a DataLoader."
            )
        lines = []
        for position, row in zip(batch_indices, self.to_rows(prediction, len(batch_indices))):
            index = self._index_map[position] if self._index_map is not None else int(position)
            if index in self._written:
                continue  # a sampler's padding repeats rows; each is written once
            self._written.add(index)
            lines.append(json.dumps({"index": index, "prediction": row}) + "\n")
        handle = self._open(trainer.global_rank)
        handle.write("".join(lines))
        handle.flush()
        if self.fsync:
            os.fsync(handle.fileno())
        self.rows_written += len(lines)

    def _open(self, global_rank: int) -> Any:
        if self._file is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / f"part-{global_rank:05d}.jsonl"
            if path.exists():
                # A killed job may have torn the last line: cut it before appending.
                _, end = _complete_lines(path)
                with open(path, "r+b") as f:
                    f.truncate(end)
            self._file = open(path, "a", encoding="utf-8")
        return self._file

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
