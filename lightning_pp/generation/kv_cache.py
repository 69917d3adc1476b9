"""Per-sequence key/value cache and the description of a packed forward's rows.

Both the models layer (:mod:`lightning_pp.models.llama`, whose attention reads
and extends the cache) and the generation loop (:mod:`lightning_pp.generation.engine`,
which decides which rows a forward carries and frees finished sequences) need
these two types. They live here, below both, so that the generation loop does
not import the models layer: the package's layers only look down.

The cache is a *slab* per layer and tensor, ``[rows, Hkv, capacity, D]``: each
live sequence owns one row, and its tokens sit at their positions in it, head by
head (each head's keys contiguous, the layout attention reads fastest). Writing a
token is an indexed copy of that token alone; the slab is reallocated only when a
sequence outgrows ``capacity`` or more sequences are live than there are rows,
and then to twice the size, so the copies cost amortised O(1) per token instead of
the O(length) of concatenating the whole cache every step. The sequences of one
forward are given consecutive rows when they arrive together (a slot's prefill),
so attention reads their keys as a view of the slab, with no copy at all.
Memory is ``rows x capacity``: the sequences are padded to the longest, as in a
padded batch; freed rows are reused, and the slab is released when every row is free.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from lightning_pp.platform import platform_for

__all__ = ["DecodeSplit", "KVCache", "StepRows", "host_to_device"]


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies a small host tensor built for a forward (indices, masks) to ``device`` without a stall.

    A plain ``.to(device)`` from pageable memory waits for the device's queue to
    drain (a host round trip per copy); from page-locked memory the copy is queued
    behind the work already there. On the CPU it is the tensor itself.
    """
    if device.type == "cpu" or tensor.device == device:
        return tensor
    platform = platform_for(device)
    return platform.to_device(platform.pin(tensor), device)


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
    # Tensors derived from the rows (positions, masks, indices), built once per forward
    # and shared by every layer of it; not part of the value.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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

    @property
    def ends(self) -> tuple[int, ...]:
        """Each sequence's length after this forward (``start + num_new``)."""
        return tuple(s + n for s, n in zip(self.start, self.num_new))

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``, once per ``key`` for this forward (the layers of a stage share it)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def positions(self, device: torch.device) -> torch.Tensor:
        """Each row's position (``[rows]``, long, on ``device``)."""
        return self.memo(("positions", device), lambda: host_to_device(self._host_positions(), device))

    def sequence_index(self, device: torch.device) -> torch.Tensor:
        """Each row's sequence, as an index into ``seq_ids`` (``[rows]``, long, on ``device``)."""

        def build() -> torch.Tensor:
            counts = torch.tensor(self.num_new, dtype=torch.long)
            return host_to_device(torch.repeat_interleave(torch.arange(len(self.num_new)), counts), device)

        return self.memo(("sequence_index", device), build)

    def decode_split(self, device: torch.device) -> Optional["DecodeSplit"]:
        """How to attend a forward mixing one-token decode steps and multi-row prefills without padding.

        ``None`` unless the forward mixes them: some sequences bring one row and
        others several. Padding every decode row to the longest prefill, as one
        padded batch does, multiplies the decode rows' attention by the prefill's
        length, and continuous batching mixes them in most forwards (a prompt
        admitted beside the others' decode steps).
        """
        return self.memo(("decode_split", device), lambda: self._decode_split(device))

    def _decode_split(self, device: torch.device) -> Optional["DecodeSplit"]:
        if not self.num_new or max(self.num_new) == 1 or min(self.num_new) > 1:
            return None
        last = list(itertools.accumulate(self.num_new))  # one past each sequence's last packed row
        decode = [i for i, n in enumerate(self.num_new) if n == 1]
        prefill = [i for i, n in enumerate(self.num_new) if n > 1]
        prefill_rows = [r for i in prefill for r in range(last[i] - self.num_new[i], last[i])]
        return DecodeSplit(
            last=StepRows(self.seq_ids, (1,) * len(self.seq_ids), tuple(e - 1 for e in self.ends)),
            last_rows=host_to_device(torch.tensor(last, dtype=torch.long) - 1, device),
            decode_seqs=host_to_device(torch.tensor(decode, dtype=torch.long), device),
            decode_rows=host_to_device(torch.tensor([last[i] - 1 for i in decode], dtype=torch.long), device),
            prefill=StepRows(
                tuple(self.seq_ids[i] for i in prefill),
                tuple(self.num_new[i] for i in prefill),
                tuple(self.start[i] for i in prefill),
            ),
            prefill_seqs=host_to_device(torch.tensor(prefill, dtype=torch.long), device),
            prefill_rows=host_to_device(torch.tensor(prefill_rows, dtype=torch.long), device),
        )

    def _host_positions(self) -> torch.Tensor:
        if not self.num_new:
            return torch.zeros(0, dtype=torch.long)
        counts = torch.tensor(self.num_new, dtype=torch.long)
        offsets = torch.cumsum(counts, 0) - counts  # first row of each sequence
        first = torch.repeat_interleave(torch.tensor(self.start, dtype=torch.long) - offsets, counts)
        return first + torch.arange(self.num_rows)


@dataclass(frozen=True)
class DecodeSplit:
    """A mixed forward's attention in two parts (:meth:`StepRows.decode_split`).

    Every sequence's *last* row attends as a decode step would (``last``: one
    query per sequence, at its last position), which is all a one-row sequence
    needs; the multi-row sequences attend again on their own (``prefill``), over
    their keys alone. Index tensors are on the forward's device.

    Attributes:
        last: one row per sequence, at its last position.
        last_rows: each sequence's last packed row.
        decode_seqs: the one-row sequences, as indices into the forward's sequences.
        decode_rows: their packed rows.
        prefill: the multi-row sequences' own rows.
        prefill_seqs: those sequences, as indices into the forward's sequences.
        prefill_rows: their packed rows, in order.
    """

    last: StepRows
    last_rows: torch.Tensor
    decode_seqs: torch.Tensor
    decode_rows: torch.Tensor
    prefill: StepRows
    prefill_seqs: torch.Tensor
    prefill_rows: torch.Tensor


class KVCache:
    """Keys and values of one layer, per sequence, in two slabs that grow by doubling.

    ``keys``/``values`` are ``[rows, Hkv, capacity, D]`` (``None`` until the first
    write); sequence ``seq_id`` owns row :meth:`row` and its first :meth:`length`
    positions. See the module docstring for the growth rule.

    Args:
        min_capacity: positions of the first slab (at least); later capacities are
            powers of two.
    """

    def __init__(self, *, min_capacity: int = 16) -> None:
        self.min_capacity = max(int(min_capacity), 1)
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self._row: dict[int, int] = {}
        self._length: dict[int, int] = {}
        self._used: list[bool] = []  # per row of the slab
        #: Slab reallocations so far (each copies the live cache once).
        self.num_reallocations = 0

    # -- reading --------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Positions per row of the slab (0 before the first write)."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def num_rows(self) -> int:
        """Rows of the slab, live or free."""
        return len(self._used)

    def length(self, seq_id: int) -> int:
        """Cached tokens of ``seq_id`` (0 for a sequence the cache does not hold)."""
        return self._length.get(seq_id, 0)

    def row(self, seq_id: int) -> int:
        """The slab row of a cached sequence."""
        return self._row[seq_id]

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._row

    def sequence(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of one sequence, ``[length, Hkv, D]`` each (views, no copy)."""
        keys, values = self._slabs()
        row, n = self._row[seq_id], self._length[seq_id]
        return keys[row, :, :n].transpose(0, 1), values[row, :, :n].transpose(0, 1)

    def batch(self, seq_ids: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of each sequence's row, ``[len(seq_ids), Hkv, length, D]`` each.

        A view of the slab when the sequences hold consecutive rows in this order;
        otherwise one gather of exactly those rows. Positions past a sequence's own
        length hold zeros or a freed sequence's old values (finite either way):
        attention masks them.
        """
        keys, values = self._slabs()
        rows = [self._row[s] for s in seq_ids]
        if not rows:
            return keys[:0, :, :length], values[:0, :, :length]
        first = rows[0]
        if rows == list(range(first, first + len(rows))):
            last = first + len(rows)
            return keys[first:last, :, :length], values[first:last, :, :length]
        index = host_to_device(torch.tensor(rows, dtype=torch.long), keys.device)
        return keys[:, :, :length].index_select(0, index), values[:, :, :length].index_select(0, index)

    # -- writing --------------------------------------------------------------------------------
    def write(self, rows: StepRows, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the packed new keys and values (``[rows.num_rows, Hkv, D]``) of one forward.

        Sequence ``rows.seq_ids[i]`` must hold exactly ``rows.start[i]`` tokens; new
        sequences (``start`` 0) get rows, consecutive ones where the slab has them.

        Raises:
            RuntimeError: a sequence's cached length differs from its ``start``.
        """
        for seq_id, start in zip(rows.seq_ids, rows.start):
            if self.length(seq_id) != start:
                raise RuntimeError(
                    f"sequence {seq_id} has {self.length(seq_id)} cached tokens but its rows start at position {start}."
                )
        if not rows.seq_ids:
            return
        self._reserve(rows.seq_ids, max(rows.ends), k)
        keys, values = self._slabs()
        kv_heads, capacity, device = keys.shape[1], keys.shape[2], keys.device
        seq_rows = tuple(self._row[s] for s in rows.seq_ids)

        def flat_index() -> torch.Tensor:
            # Where token i's head h goes in the slab seen as [rows * Hkv * capacity, D]:
            # (row_i * Hkv + h) * capacity + position_i, in k's order (token-major, heads inner).
            base = host_to_device(torch.tensor(seq_rows, dtype=torch.long) * (kv_heads * capacity), device)
            token = base[rows.sequence_index(device)] + rows.positions(device)
            heads = torch.arange(kv_heads, device=device) * capacity
            return (token[:, None] + heads[None, :]).flatten()

        index = rows.memo(("kv_write", seq_rows, kv_heads, capacity, device), flat_index)
        head_dim = keys.shape[-1]
        keys.view(-1, head_dim).index_copy_(0, index, k.to(keys.dtype).reshape(-1, head_dim))
        values.view(-1, head_dim).index_copy_(0, index, v.to(values.dtype).reshape(-1, head_dim))
        for seq_id, end in zip(rows.seq_ids, rows.ends):
            self._length[seq_id] = end

    def extend(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends one sequence's new keys and values; returns all of its keys and values (views)."""
        self.write(StepRows((seq_id,), (k.shape[0],), (self.length(seq_id),)), k, v)
        return self.sequence(seq_id)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forgets ``seq_id``'s positions from ``length`` on (its row keeps them, unread)."""
        if seq_id not in self._row and length == 0:
            return
        if not 0 <= length <= self.length(seq_id):
            raise ValueError(f"cannot truncate sequence {seq_id} of {self.length(seq_id)} tokens to {length}.")
        self._length[seq_id] = length

    def replace(self, old: int, new: int) -> None:
        """Hands ``old``'s row to ``new``, with nothing cached yet: ``old`` finished and ``new`` takes its place.

        Continuous batching admits a prompt into a finished sequence's lane; giving
        it that sequence's row too keeps a full slot on the consecutive rows it was
        prefilled into, so :meth:`batch` still reads it as a view. A plain
        :meth:`free` then a write would put the newcomer on the first free rows
        instead, and two newcomers, needing two *consecutive* free rows, on new ones.
        """
        if new in self._row:
            raise ValueError(f"sequence {new} already holds row {self._row[new]}; it cannot take {old}'s.")
        row = self._row.pop(old, None)
        self._length.pop(old, None)
        if row is not None:
            self._row[new], self._length[new] = row, 0

    def free(self, seq_ids: Sequence[int]) -> None:
        """Returns the rows of ``seq_ids`` for reuse; releases the slabs once no row is live."""
        for seq_id in seq_ids:
            row = self._row.pop(seq_id, None)
            self._length.pop(seq_id, None)
            if row is not None:
                self._used[row] = False
        if not self._row:
            self.keys = self.values = None
            self._used = []

    # -- inside ---------------------------------------------------------------------------------
    def _slabs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            raise RuntimeError("the cache holds no sequence yet.")
        return self.keys, self.values

    def _reserve(self, seq_ids: Sequence[int], length: int, like: torch.Tensor) -> None:
        """Rows for the new ``seq_ids`` and room for ``length`` positions, reallocating at most once."""
        new = [s for s in seq_ids if s not in self._row]
        run = self._free_run(len(new)) if new else 0
        rows_needed = max(self.num_rows, run + len(new))
        if length > self.capacity or rows_needed > self.num_rows or self.keys is None:
            self._reallocate(rows_needed, length, like)
        for i, seq_id in enumerate(new):
            self._row[seq_id] = run + i
            self._length[seq_id] = 0
            self._used[run + i] = True

    def _free_run(self, count: int) -> int:
        """The first row of ``count`` consecutive free rows (past the end if there are none)."""
        streak = 0
        for row, used in enumerate(self._used):
            streak = 0 if used else streak + 1
            if streak == count:
                return row - count + 1
        return len(self._used) - streak  # the trailing free rows, continued past the end

    def _reallocate(self, num_rows: int, length: int, like: torch.Tensor) -> None:
        """Doubles whatever is too small (rows, capacity, or both) and copies the live cache once."""
        old_k, old_v = self.keys, self.values
        rows = max(num_rows, 2 * self.num_rows) if num_rows > self.num_rows else self.num_rows
        capacity = self.capacity
        if length > capacity:
            capacity = max(self.min_capacity, 2 * capacity, 1 << (length - 1).bit_length())
        shape = (rows, like.shape[1], capacity, like.shape[2])  # like: [tokens, Hkv, D]
        # Zeros, not empty: attention multiplies masked positions' values by a zero
        # probability, and uninitialised memory may hold NaN (0 * NaN = NaN).
        self.keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if old_k is not None and old_v is not None:
            self.keys[: old_k.shape[0], :, : old_k.shape[2]] = old_k
            self.values[: old_v.shape[0], :, : old_v.shape[2]] = old_v
            self.num_reallocations += 1
        self._used += [False] * (rows - len(self._used))
