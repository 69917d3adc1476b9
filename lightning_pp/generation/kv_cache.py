"""Per-sequence key/value cache and the description of a packed forward's rows.

Both the models layer (:mod:`lightning_pp.models.llama`, whose attention reads
and extends the cache) and the generation loop (:mod:`lightning_pp.generation.engine`,
which decides which rows a forward carries and frees finished sequences) need
these two types. They live here, below both, so that the generation loop does
not import the models layer: the package's layers only look down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

__all__ = ["KVCache", "StepRows"]


@dataclass(frozen=True)
class StepRows:
    """Which sequences the packed rows of one forward call belong to.

    Rows ``[offsets[i], offsets[i] + num_new[i])`` are the new tokens of sequence
    ``seq_ids[i]``, at positions ``start[i], start[i] + 1, ...`` (``start[i]`` tokens
    of it are already cached). A forward with no sequences is an *idle* forward:
    zero rows that still join every collective of the layers.

    Attributes:
        seq_ids: the sequences, in row order.
        num_new: new rows per sequence.
        start: cached tokens per sequence before this forward.
        dp_num_rows: with data-parallel attention, every attention-DP rank's row
            count for this forward, in attention-DP group-rank order (this rank's
            own count included); ``None`` without it. The layers gather the rows of
            all attention-DP ranks for the MLP and need every count to do so.
    """

    seq_ids: tuple[int, ...]
    num_new: tuple[int, ...]
    start: tuple[int, ...]
    dp_num_rows: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not len(self.seq_ids) == len(self.num_new) == len(self.start):
            raise ValueError("seq_ids, num_new and start must have one entry per sequence.")
        if self.dp_num_rows is not None and self.num_rows not in self.dp_num_rows:
            raise ValueError(
                f"dp_num_rows {self.dp_num_rows} does not contain this forward's own {self.num_rows} rows: "
                "pass every attention-DP rank's row count, this rank's included."
            )

    @property
    def num_rows(self) -> int:
        return sum(self.num_new)

    def positions(self, device: torch.device) -> torch.Tensor:
        parts = [torch.arange(s, s + n, device=device) for s, n in zip(self.start, self.num_new)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


@dataclass
class KVCache:
    """Keys and values of one layer, per sequence: ``seq_id -> ([len, Hkv, D], [len, Hkv, D])``."""

    entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def length(self, seq_id: int) -> int:
        entry = self.entries.get(seq_id)
        return 0 if entry is None else entry[0].shape[0]

    def extend(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old = self.entries.get(seq_id)
        if old is not None:
            k, v = torch.cat([old[0], k]), torch.cat([old[1], v])
        self.entries[seq_id] = (k, v)
        return k, v

    def free(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.entries.pop(seq_id, None)
