"""The KV cache grows by doubling, and one batched attention call equals the per-sequence loop.

No processes, no transformers: the reference for attention is the loop that
``CachedAttention`` ran before (one einsum softmax per sequence, fp32), copied here.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_pp.generation.engine import _Header
from lightning_pp.generation.kv_cache import KVCache, StepRows
from lightning_pp.models.llama import DecoderConfig, DecoderLM, attend

HKV, D = 2, 8


def _loop_attention(q, k, v, start):
    """The previous per-sequence attention: queries at positions ``start..`` over keys ``0..``, fp32 softmax."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    q_pos = torch.arange(start, start + q.shape[0])
    k_pos = torch.arange(k.shape[0])
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


# -- growth -----------------------------------------------------------------------------------------
def test_one_token_at_a_time_copies_the_cache_only_when_it_doubles():
    cache = KVCache(min_capacity=4)
    g = torch.Generator().manual_seed(0)
    written_k, pointers = [], []
    for position in range(100):
        k, v = torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g)
        cache.write(StepRows((7,), (1,), (position,)), k, v)
        written_k.append(k)
        pointers.append((cache.capacity, cache.keys.data_ptr()))
    # Capacities 4, 8, ..., 128: six reallocations for 100 tokens (log2), none in between.
    assert [c for c, _ in dict.fromkeys(pointers)] == [4, 8, 16, 32, 64, 128]
    assert cache.num_reallocations == 5
    for capacity in (4, 8, 16, 32, 64, 128):  # within a capacity, the storage never moved
        assert len({ptr for c, ptr in pointers if c == capacity}) == 1
    keys, _ = cache.sequence(7)
    assert torch.equal(keys, torch.cat(written_k))  # every token kept, in order, across the copies
    assert keys.data_ptr() == cache.keys.data_ptr()  # a view of the slab, not a copy


def test_rows_are_reused_and_the_slab_released_when_every_sequence_left():
    cache = KVCache()
    kv = torch.ones(5, HKV, D)
    cache.write(StepRows((0, 1, 2), (2, 2, 1), (0, 0, 0)), kv, kv)
    assert [cache.row(s) for s in (0, 1, 2)] == [0, 1, 2] and cache.num_rows == 3
    cache.free([1])
    assert 1 not in cache and cache.length(1) == 0
    cache.write(StepRows((9,), (3,), (0,)), kv[:3], kv[:3])
    assert cache.row(9) == 1 and cache.num_rows == 3  # the freed row, no new one
    # Two new sequences together get consecutive rows: past the end, as no free pair exists.
    cache.write(StepRows((10, 11), (1, 1), (0, 0)), kv[:2], kv[:2])
    assert (cache.row(10), cache.row(11)) == (3, 4) and cache.num_rows == 6  # doubled
    cache.free([0, 2, 9, 10, 11])
    assert cache.keys is None and cache.values is None and cache.num_rows == 0


def test_a_forward_whose_sequences_hold_consecutive_rows_reads_a_view():
    cache = KVCache()
    kv = torch.randn(6, HKV, D)
    cache.write(StepRows((0, 1, 2), (2, 2, 2), (0, 0, 0)), kv, kv)
    keys, _ = cache.batch((0, 1, 2), 2)
    assert keys.data_ptr() == cache.keys.data_ptr() and keys.shape == (3, HKV, 2, D)
    keys, _ = cache.batch((0, 2), 2)  # not consecutive: one gather of those rows
    assert keys.data_ptr() != cache.keys.data_ptr()
    assert torch.equal(keys[1], kv[4:6].transpose(0, 1))


def test_a_write_at_the_wrong_position_and_a_bad_truncation_are_refused():
    cache = KVCache()
    kv = torch.zeros(2, HKV, D)
    cache.write(StepRows((3,), (2,), (0,)), kv, kv)
    with pytest.raises(RuntimeError, match="sequence 3 has 2 cached tokens but its rows start at position 1"):
        cache.write(StepRows((3,), (1,), (1,)), kv[:1], kv[:1])
    cache.truncate(3, 1)
    assert cache.length(3) == 1
    with pytest.raises(ValueError, match="cannot truncate sequence 3 of 1 tokens to 4"):
        cache.truncate(3, 4)


# -- batched attention against the loop -------------------------------------------------------------
CASES = {
    # name: (num_new, start) per sequence
    "ragged prefill and prefixes": ((5, 1, 3, 7), (0, 4, 9, 2)),
    "decode, ragged lengths": ((1, 1, 1, 1), (3, 0, 11, 6)),
    "decode, equal lengths": ((1, 1, 1), (5, 5, 5)),
    "fresh prompts of one length": ((4, 4), (0, 0)),
    "equal chunks after different prefixes": ((3, 3, 3), (0, 6, 2)),
    "one sequence": ((6,), (10,)),
}


@pytest.mark.parametrize("heads", [4, 2])  # grouped-query (4 query heads over 2 kv heads) and plain
@pytest.mark.parametrize("case", list(CASES))
def test_one_sdpa_call_equals_the_per_sequence_loop(case, heads):
    num_new, start = CASES[case]
    g = torch.Generator().manual_seed(len(case) + heads)
    seq_ids = tuple(range(10, 10 + len(num_new)))
    cache = KVCache()
    # Prefixes first, one forward per sequence in reverse order, so rows are not in forward order.
    prefixes = {}
    for seq_id, s in reversed(list(zip(seq_ids, start))):
        if s:
            k, v = torch.randn(s, HKV, D, generator=g), torch.randn(s, HKV, D, generator=g)
            cache.write(StepRows((seq_id,), (s,), (0,)), k, v)
            prefixes[seq_id] = (k, v)
    rows = StepRows(seq_ids, num_new, start)
    q = torch.randn(rows.num_rows, heads, D, generator=g)
    k, v = torch.randn(rows.num_rows, HKV, D, generator=g), torch.randn(rows.num_rows, HKV, D, generator=g)
    cache.write(rows, k, v)
    got = attend(q, *cache.batch(seq_ids, max(rows.ends)), rows)
    expected, offset = [], 0
    for seq_id, n, s in zip(seq_ids, num_new, start):
        pk, pv = prefixes.get(seq_id, (k[:0], v[:0]))
        sl = slice(offset, offset + n)
        expected.append(_loop_attention(q[sl], torch.cat([pk, k[sl]]), torch.cat([pv, v[sl]]), s))
        offset += n
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_no_forward_rows_give_no_output():
    rows = StepRows((), (), ())
    assert attend(torch.zeros(0, 4, D), torch.zeros(0, 0, HKV, D), torch.zeros(0, 0, HKV, D), rows).shape == (0, 4, D)


def test_a_batch_of_full_sequences_equals_each_sequence_alone():
    """Padding and masks do not leak across sequences: the model on a batch equals it per row."""
    torch.manual_seed(0)
    lm = DecoderLM(DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                 num_kv_heads=2))
    ids = torch.randint(0, 50, (3, 9))
    together = lm(ids)
    for i in range(3):
        torch.testing.assert_close(together[i], lm(ids[i : i + 1])[0], rtol=1e-5, atol=1e-5)


# -- the header -------------------------------------------------------------------------------------
def test_the_header_packs_into_one_tensor_and_back():
    header = _Header(2, 17, False, (4, 9), (3, 1), (0, 12), (1, 1), (4, 0))
    values = header.pack()
    assert values[:5] == [2, 17, 0, 2, 2] and len(values) == 5 + 4 * 2 + 2
    assert _Header.unpack(torch.tensor(values).tolist()) == header
    sentinel = _Header(1, 5, True)
    assert _Header.unpack(sentinel.pack()) == sentinel and sentinel.rows().num_rows == 0
    with pytest.raises(RuntimeError, match="says it holds 2 sequences"):
        _Header.unpack(values[:-1])


class _RecordingPlatform:
    device_type = "meta"

    def __init__(self):
        self.calls = []

    def pin(self, tensor):
        self.calls.append("pin")
        return tensor

    def to_device(self, tensor, device):
        self.calls.append("to_device")
        return tensor.to(device)


def test_host_built_indices_reach_a_device_through_a_pinned_queued_copy():
    """A plain .to(device) from pageable memory would wait for the device's queue (CUDA's memcpy_and_sync)."""
    from lightning_pp.generation.kv_cache import host_to_device
    from lightning_pp.platform import use_platform

    host = torch.arange(4)
    assert host_to_device(host, torch.device("cpu")) is host  # nothing to copy on the CPU
    with use_platform(_RecordingPlatform()) as platform:
        rows = StepRows((0, 1), (3, 1), (0, 5))
        assert rows.positions(torch.device("meta")).device.type == "meta"
        assert platform.calls == ["pin", "to_device"]
        rows.positions(torch.device("meta"))  # built once per forward, shared by its layers
        assert platform.calls == ["pin", "to_device"]
