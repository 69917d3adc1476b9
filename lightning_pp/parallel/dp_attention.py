"""Batch sync for data-parallel attention: token counts, idle batches, padding.

With data-parallel attention (SGLang's "DP attention"), each attention-DP rank runs
attention on its own batch, but the MLP that follows is tensor-parallel over all
of them: every rank must join the MLP's collectives at every step. So, before a
forward, the ranks exchange token counts and decide:

* who runs: a rank with no tokens while a peer has some runs an *idle batch*
  (zero rows) so it still joins every collective; when nobody has tokens, nobody
  runs;
* how many rows each rank runs after padding: a multiple of the attention-TP size
  (so a reduce-scatter over attention-TP divides evenly), and at least its own
  count.

In a :class:`~lightning_pp.distributed.topology.RankTopology`, the attention-DP group is the
``cp`` group when the block runs its ``cp`` ranks on separate batches (see
``lightning_pp.models.tp_block``).

:func:`plan_padding` is the pure rule; :func:`gather_batch_info` adds the one
all-gather, skipped entirely when the group has a single rank. The padding still
happens then: SGLang once skipped it together with the gather (fixed in its
dp=1 idle-batch PR), leaving token counts unaligned to attention-TP.

Requests reach the ranks by :func:`share_prompts` (each attention-DP rank takes
every ``C``-th prompt of a batch) and come back in batch order by
:func:`gather_shared_outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from lightning_pp.distributed.collectives import GroupLike, device_group_of, group_size
from lightning_pp.distributed.errors import named_failures
from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.platform import current_platform, distributed_backend_for

__all__ = [
    "PAD_MODES",
    "BatchInfo",
    "IdleBatch",
    "gather_batch_info",
    "gather_shared_outputs",
    "make_idle_batch",
    "plan_padding",
    "share_prompts",
]

PAD_MODES = ("ceil", "max_len")


@dataclass(frozen=True)
class BatchInfo:
    """What one attention-DP rank knows after the batch sync.

    Attributes:
        global_num_tokens: every attention-DP rank's token count, in group-rank order.
        dp_rank: this rank's position in ``global_num_tokens``.
        need_idle_batch: this rank has no tokens but a peer has some, so it must
            run an idle batch (:func:`make_idle_batch`).
        padded_num_tokens: rows this rank runs after padding.
    """

    global_num_tokens: tuple[int, ...]
    dp_rank: int
    need_idle_batch: bool
    padded_num_tokens: int

    @property
    def num_tokens(self) -> int:
        """This rank's own (unpadded) count."""
        return self.global_num_tokens[self.dp_rank]

    @property
    def should_run(self) -> bool:
        """Whether this rank runs a forward this step (real or idle)."""
        return any(n > 0 for n in self.global_num_tokens)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_padding(
    global_num_tokens: Sequence[int],
    dp_rank: int,
    *,
    attn_tp_size: int,
    pad_mode: str = "ceil",
) -> BatchInfo:
    """The pure batch-sync rule (no communication).

    Args:
        global_num_tokens: every attention-DP rank's token count, in group-rank order.
        dp_rank: this rank's position in that list.
        attn_tp_size: attention tensor-parallel size; padded counts are its multiples.
        pad_mode: ``"ceil"`` pads this rank's count up to the next multiple;
            ``"max_len"`` pads every rank to the largest count, rounded up, so all
            ranks run the same number of rows.
    """
    counts = tuple(int(n) for n in global_num_tokens)
    if not counts:
        raise ValueError("global_num_tokens is empty: pass one count per attention-DP rank.")
    if any(n < 0 for n in counts):
        raise ValueError(f"token counts must be non-negative, got {counts}.")
    if not 0 <= dp_rank < len(counts):
        raise ValueError(f"dp_rank {dp_rank} is outside {len(counts)} attention-DP ranks.")
    if attn_tp_size < 1:
        raise ValueError(f"attn_tp_size must be at least 1, got {attn_tp_size}.")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.")
    own = counts[dp_rank]
    # With one rank there is no peer to keep in step: no idle batch (SGLang's dp=1 fix).
    need_idle = len(counts) > 1 and own == 0 and max(counts) > 0
    padded = _round_up(max(counts) if pad_mode == "max_len" else own, attn_tp_size)
    return BatchInfo(global_num_tokens=counts, dp_rank=dp_rank, need_idle_batch=need_idle, padded_num_tokens=padded)


def _control_group(group: GroupLike) -> tuple[Any, torch.device]:
    """The group and device for a small integer exchange: the CPU twin when there is one."""
    if isinstance(group, ParallelGroup) and group.cpu_group is not None:
        return group.cpu_group, torch.device("cpu")
    device_group = device_group_of(group)
    if dist.get_backend(device_group) == distributed_backend_for("cpu"):
        return device_group, torch.device("cpu")
    platform = current_platform()
    return device_group, platform.device(torch.accelerator.current_device_index())


def gather_batch_info(
    num_tokens: int,
    *,
    dp_group: GroupLike,
    attn_tp_size: int,
    pad_mode: str = "ceil",
) -> BatchInfo:
    """Exchanges token counts over the attention-DP group and plans this step.

    Collective over ``dp_group`` (one all-gather of one integer per rank, on the
    CPU twin when ``dp_group`` is a :class:`ParallelGroup`), except for a group of
    one rank, which issues nothing.

    Args:
        num_tokens: this rank's token count.
        dp_group: the attention-DP group.
        attn_tp_size: attention tensor-parallel size.
        pad_mode: ``"ceil"`` or ``"max_len"`` (see :func:`plan_padding`).
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}.")
    size = group_size(dp_group)
    if size == 1:
        return plan_padding((num_tokens,), 0, attn_tp_size=attn_tp_size, pad_mode=pad_mode)
    group, device = _control_group(dp_group)
    mine = torch.tensor([num_tokens], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    with named_failures("exchange token counts over the attention data-parallel group", group):
        dist.all_gather(everyone, mine, group=group)
    counts = [int(t.item()) for t in everyone]
    dp_rank = dp_group.rank if isinstance(dp_group, ParallelGroup) else dist.get_rank(group)
    return plan_padding(counts, dp_rank, attn_tp_size=attn_tp_size, pad_mode=pad_mode)


@dataclass(frozen=True)
class IdleBatch:
    """A zero-token batch: empty hidden states and residual, no positions."""

    hidden: torch.Tensor
    residual: torch.Tensor
    positions: torch.Tensor


def make_idle_batch(
    hidden_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> IdleBatch:
    """An idle batch for a rank with no tokens.

    Its forward through a tensor-parallel block issues the same collectives as a
    real batch (every gather, all-reduce and fused all-reduce, with zero rows of
    its own), so peers with tokens never wait for it.
    """
    return IdleBatch(
        hidden=torch.zeros(0, hidden_size, dtype=dtype, device=device),
        residual=torch.zeros(0, hidden_size, dtype=dtype, device=device),
        positions=torch.zeros(0, dtype=torch.long, device=device),
    )


# -- dealing requests: each attention-DP rank runs its share ---------------------------------------
def share_prompts(prompts: Sequence[Any], dp_rank: int, dp_size: int) -> list[Any]:
    """This attention-DP rank's share of a batch's prompts: every ``dp_size``-th, from ``dp_rank``.

    Dealt round-robin so long and short prompts spread over the ranks; a rank may
    get none (fewer prompts than ranks) and then runs idle forwards only.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside {dp_size} attention-DP ranks.")
    return list(prompts[dp_rank::dp_size])


def gather_shared_outputs(outputs: list[Any], group: ParallelGroup) -> Optional[list[Any]]:
    """Puts the outputs of every rank's :func:`share_prompts` share back in prompt order.

    Collective over ``group`` (its CPU twin: the outputs are small host lists).
    Returns the whole batch's outputs on group rank 0, ``None`` elsewhere.
    """
    if group.size == 1:
        return list(outputs)
    control, _ = _control_group(group)
    gathered: Optional[list[Any]] = [None] * group.size if group.rank == 0 else None
    dist.gather_object(list(outputs), gathered, dst=group.global_rank_of(0), group=control)
    if gathered is None:
        return None
    merged: list[Any] = [None] * sum(len(share) for share in gathered)
    for dp_rank, share in enumerate(gathered):
        merged[dp_rank::group.size] = share
    return merged
