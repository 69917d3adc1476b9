"""The line that gives the model's size beside Lightning's summary of global rank 0's stage (pure logic).

The multi-rank check (real counts from a two-stage job, tied weights counted once) is in
``test_block_lists_more.py``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar

from lightning_pp.distributed.topology import MeshShape, RankCoords, coords_of
from lightning_pp.integration.stage_sizes import prints_model_summary, stage_sizes_message


def test_stage_sizes_sum_the_first_replicas_ranks_of_each_stage():
    shape = MeshShape(pp=2, dp=2, cp=1, tp=2)
    # Stage s, replica d, tensor-parallel rank t holds 1000 * (s + 1) + 100 * d + t parameters:
    # the other replica's counts (dp=1) must not enter; both shards of a stage must.
    counts = []
    for rank in range(8):
        c: RankCoords = coords_of(rank, shape)
        counts.append(1000 * (c.pp + 1) + 100 * c.dp + c.tp)
    message = stage_sizes_message(counts, shape)
    # Stage 0: 1000 + 1001 = 2.0 K; stage 1: 2000 + 2001 = 4.0 K; in all 6.0 K.
    assert message.startswith("PPStrategy: the model has 6.0 K parameters; by pipeline stage 2.0 K | 4.0 K. ")
    assert "summary counts global rank 0's share only" in message
    assert "outside the pipelined layers" not in message


def test_copies_outside_the_pipelined_layers_are_said_to_count_with_stage_0():
    message = stage_sizes_message([10, 20], MeshShape(pp=2, dp=1, cp=1, tp=1), shared_outside=True)
    assert "by pipeline stage 10 | 20 (those outside the pipelined layers, which every stage holds" in message


def test_the_line_is_given_only_where_a_summary_is_printed():
    assert prints_model_summary([TQDMProgressBar(), ModelSummary()])

    class Styled(ModelSummary):  # as RichModelSummary is
        pass

    assert prints_model_summary([Styled()])
    assert not prints_model_summary([TQDMProgressBar()])
