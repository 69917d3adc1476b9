"""Joining predictions by rows, without any process: microbatches of a batch and replicas' batches.

Each case runs a "predict step" on a whole batch (what one device returns) and on
the batch's microbatches or on replicas' batches, and checks that joining the
parts gives the one-device output exactly.
"""

from __future__ import annotations

import pytest
import torch

from lightning_pp.integration.predict_stream import gather_replica_predictions
from lightning_pp.pipeline.microbatch import batch_rows, split_microbatches
from lightning_pp.pipeline.step_outputs import concat_outputs, is_row_list, join_rows, split_rows, weighted_mean

from compare import assert_same

WORDS = ["cat", "dog", "eel", "fox", "gnu", "hen", "ibis"]


def token_lists(batch):
    """Per-row token-id lists of different lengths (what generation returns)."""
    return [list(range(int(row[0]), int(row[0]) + 1 + int(row[0]) % 3)) for row in batch]


def words(batch):
    return [WORDS[int(row[0]) % len(WORDS)] for row in batch]


def mixed(batch):
    """Tensors, per-row lists and a constant in one dict, with a (tensor, list) tuple inside."""
    return {
        "ids": token_lists(batch),
        "text": words(batch),
        "score": batch.float().mean(1),
        "pair": (batch * 2, [int(row.sum()) for row in batch]),
        "version": 3,
    }


def group_list(batch):
    """A list that groups per-row tensors (not one entry per row), even when it has as many entries as rows."""
    return [batch.float(), batch.float() + 1]


def per_row_tensors(batch):
    """Ragged per-row tensors in a list."""
    return [torch.arange(int(row[0]) % 3 + 1) for row in batch]


STEPS = [token_lists, words, mixed, group_list, per_row_tensors]


def _batch(num_rows: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + num_rows).unsqueeze(1).repeat(1, 3)


def assert_same_exactly(actual, expected):
    assert_same(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("num_rows, num_microbatches", [(4, 2), (5, 3), (2, 2), (6, 4), (3, 1)])
def test_microbatch_outputs_join_into_the_one_device_output(step, num_rows, num_microbatches):
    batch = _batch(num_rows)
    parts = split_microbatches(batch, num_microbatches)
    joined = concat_outputs([step(part) for part in parts], [batch_rows(part) for part in parts])
    assert_same_exactly(joined, step(batch))


def test_per_row_lists_are_not_transposed_and_uneven_lists_join():
    # The cases: the old join gave [['cat', 'eel'], ['dog', 'fox']] and an IndexError.
    assert concat_outputs([["cat", "dog"], ["eel", "fox"]], [2, 2]) == ["cat", "dog", "eel", "fox"]
    assert concat_outputs([[[1, 2, 3], [4]], [[5]]], [2, 1]) == [[1, 2, 3], [4], [5]]
    assert concat_outputs([{"ids": [[1], [2, 3]]}, {"ids": [[4, 5, 6]]}], [2, 1]) == {"ids": [[1], [2, 3], [4, 5, 6]]}


def test_the_row_rule():
    t2 = torch.zeros(2, 5)
    assert is_row_list(["a", "b"], 2) and is_row_list([[1], [2, 3]], 2)
    assert is_row_list([torch.zeros(3), torch.zeros(4)], 2)  # ragged per-row tensors
    assert not is_row_list([t2, t2], 2)  # a group of per-row tensors
    assert not is_row_list(("a", "b"), 2)  # tuples are structure
    assert not is_row_list(["a", "b", "c"], 2)


def test_values_that_cannot_be_joined_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"output\['n'\] is a value of the whole batch.*num_microbatches=1"):
        concat_outputs([{"n": 2}, {"n": 1}], [2, 1])
    with pytest.raises(ValueError, match="num_microbatches=1"):
        concat_outputs([torch.tensor(0.5), torch.tensor(0.25)], [2, 2])
    with pytest.raises(ValueError, match="differ in structure"):
        concat_outputs([("a", "b"), ("a",)], [2, 2])
    with pytest.raises(ValueError, match=r"output\[1\] has shapes \[\(2, 3\), \(1, 4\)\].*pad them"):
        concat_outputs([(0, torch.zeros(2, 3)), (0, torch.zeros(1, 4))], [2, 1])
    with pytest.raises(ValueError, match=r"output has shapes \[\(2, 3\), \(1, 4\)\].*pad them"):  # bare tensors too
        concat_outputs([torch.zeros(2, 3), torch.zeros(1, 4)], [2, 1])
    # A Hugging Face output with use_cache on holds the KV cache, one object per microbatch.

    class DynamicCache:  # what transformers returns (by name; no transformers needed here)
        pass

    with pytest.raises(ValueError, match=r"output\['cache'\] .*key/value cache.*use_cache=False"):
        concat_outputs([{"logits": torch.zeros(2, 3), "cache": DynamicCache()}, {"logits": torch.zeros(1, 3),
                                                                                 "cache": DynamicCache()}], [2, 1])
    # A whole-batch value equal in every microbatch is kept; one microbatch is returned as is.
    assert concat_outputs([(torch.tensor(7), "tag"), (torch.tensor(7), "tag")], [1, 1])[1] == "tag"
    single = {"n": 5}
    assert concat_outputs([single], [4]) is single


def _replica_batches(num_items: int, dp: int, batch_size: int):
    """Dataset indices per batch of each replica, as Lightning's DistributedSampler (no shuffle) deals them."""
    total = -(-num_items // dp) * dp
    order = list(range(num_items)) + list(range(total - num_items))  # padding repeats the first items
    per_replica = [order[r::dp] for r in range(dp)]
    return [[indices[j : j + batch_size] for j in range(0, len(indices), batch_size)] for indices in per_replica]


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("num_items, dp, batch_size", [(11, 2, 4), (7, 2, 3), (6, 3, 2), (5, 1, 2)])
def test_replica_batches_regroup_into_the_one_device_batches(step, num_items, dp, batch_size):
    rows = _batch(num_items)
    dealt = _replica_batches(num_items, dp, batch_size)
    replicas = [([step(rows[indices]) for indices in batches], batches) for batches in dealt]
    merged = gather_replica_predictions(replicas, batch_size)
    expected = [step(rows[j : j + batch_size]) for j in range(0, num_items, batch_size)]
    assert_same_exactly(merged, expected)


def test_regrouping_fails_with_the_fix_when_rows_cannot_be_regrouped():
    with pytest.raises(ValueError, match=r"output\['n'\] is a value of the whole batch.*\(2 vs 1\).*return_predic"):
        gather_replica_predictions([([{"n": 2}, {"n": 1}], [[0, 1], [2]])], batch_size=3)
    with pytest.raises(ValueError, match=r"output is a tensor of shape \(6,\) for a batch of 2 rows"):
        gather_replica_predictions([([torch.zeros(6)], [[0, 1]])], batch_size=2)
    # A whole-batch value the same in every batch is kept (3 rows, one-device batches of 2).
    assert gather_replica_predictions([([{"n": 2}, {"n": 2}], [[0, 1], [2]])], batch_size=2) == [{"n": 2}] * 2
    with pytest.raises(ValueError, match="dataset indices for 0"):
        gather_replica_predictions([([torch.zeros(2, 1)], [])], batch_size=2)
    ragged = ([torch.zeros(1, 2), torch.zeros(1, 3)], [[0], [1]])
    with pytest.raises(ValueError, match="do not concatenate in dim 0"):
        gather_replica_predictions([ragged], batch_size=2)
    # Nothing returned: one None per one-device batch.
    assert gather_replica_predictions([([None, None], [[0, 2], [4]]), ([None, None], [[1, 3], [0]])], 2) == [None] * 3


def test_split_take_and_join_rows_round_trip():
    output = mixed(_batch(3))
    (part,) = split_rows([output], [3])
    assert_same_exactly(join_rows([part.take(0, 1), part.take(1, 3)]), output)


# -- logged values: microbatches combine as Lightning combines steps (reduce_fx) ------------------
def _logged_per_microbatch(batch: torch.Tensor, num_microbatches: int, log) -> dict:
    """What ``log(recorder, rows)`` logs for the whole batch, via microbatches and the recorder."""
    from lightning_pp.pipeline.step_outputs import LogRecorder

    recorder = LogRecorder()
    parts = torch.tensor_split(batch, num_microbatches)
    for part in parts:
        recorder.start_microbatch()
        log(recorder, part)
    combined = recorder.combined([len(part) / len(batch) for part in parts])
    return {name: value for name, (value, _) in combined.items()}


def _log_statistics(recorder, rows: torch.Tensor) -> None:
    recorder.log("mean", rows.mean())
    recorder.log("avg", rows.mean(), reduce_fx="avg")
    recorder.log("total", rows.sum(), reduce_fx="sum")
    recorder.log("total_by_fn", rows.sum(), reduce_fx=torch.sum)
    recorder.log("positives", (rows > 0).sum(), reduce_fx="sum")  # an integer count
    recorder.log("rows", len(rows), reduce_fx="sum")  # a Python int
    recorder.log("largest", rows.max(), reduce_fx="max")
    recorder.log("smallest", rows.min(), reduce_fx=torch.min)


@pytest.mark.parametrize("num_microbatches", [1, 3, 4])
def test_logged_values_are_the_whole_batchs_when_combined_by_their_reduce_fx(num_microbatches):
    batch = torch.randn(10, generator=torch.Generator().manual_seed(0))  # 10 rows: uneven microbatches
    whole = _logged_per_microbatch(batch, 1, _log_statistics)
    got = _logged_per_microbatch(batch, num_microbatches, _log_statistics)
    assert set(got) == set(whole)
    for name, value in whole.items():
        if isinstance(value, torch.Tensor):
            assert got[name].dtype == value.dtype, name  # a count stays an integer
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert got[name] == value, name
    assert got["rows"] == 10 and got["positives"].item() == int((batch > 0).sum())


def test_a_value_logged_by_some_microbatches_combines_over_those():
    def log(recorder, rows):
        if rows[0] > 0:  # only some microbatches log these
            recorder.log("count", len(rows), reduce_fx="sum")
            recorder.log("mean", rows.mean())

    batch = torch.tensor([1.0, 2.0, -1.0, -2.0, 3.0, 5.0])  # microbatches [1, 2], [-1, -2], [3, 5]
    got = _logged_per_microbatch(batch, 3, log)
    assert got["count"] == 4
    torch.testing.assert_close(got["mean"], torch.tensor(2.75))


def test_weighted_means_keep_complex_values_and_leave_out_weight_zero():
    mean = weighted_mean([torch.tensor(1 + 2j), torch.tensor(3 + 0j)], [0.5, 0.5])
    assert mean.dtype == torch.complex64 and complex(mean) == 2 + 1j
    # A microbatch with nothing to average over has a NaN mean and weight 0: it must not make the batch's NaN.
    assert float(weighted_mean([torch.tensor(float("nan")), torch.tensor(3.0)], [0.0, 1.0])) == 3.0
    assert weighted_mean([{"a": float("nan")}, {"a": 2.0}], [0.0, 1.0]) == {"a": 2.0}
