"""Continuous batching: prompts join the running batch as others finish, and nothing they produce changes.

References: the same prompts generated with every prompt of a batch started at
once (``max_running=None``, the path that existed before), token for token, with
the same finish reasons and, through the streaming writer, the same rows in
dataset order. Sequences end at different times (per-prompt ``max_new_tokens``,
an EOS token, stop strings), so lanes free up at different steps, and sampled runs
check that a prompt's random stream does not depend on when it was admitted.
The scheduler's bookkeeping (lanes, the cache rows they hand over) is checked
as tables first.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_pp.generation import engine
from lightning_pp.generation.chunking import ChunkPlanner
from lightning_pp.generation.engine import PipelineGenerator, StageContext
from lightning_pp.generation.kv_cache import KVCache, StepRows
from lightning_pp.generation.sampling import SamplingParams
from lightning_pp.generation.scheduler import SequenceState, SlotMembers, SlotScheduler, check_max_running
from lightning_pp.integration.generation_module import GenerationModule, PromptDataset, collate_prompts
from lightning_pp.integration.writer import StreamingPredictionWriter, read_predictions
from lightning_pp.models.llama import DecoderLM

from lit_models import trainer_kwargs
from multirank import run_on_ranks

transformers = pytest.importorskip("transformers")

from test_text import TEXTS, save_text_checkpoint  # noqa: E402

from test_generation import VOCAB, _save_random_llama  # noqa: E402 - after the importorskip

PROMPTS = [[(7 * i + 3 * j) % VOCAB for j in range(1 + (5 * i) % 11)] for i in range(10)]
LIMITS = [12, 3, 9, 1, 14, 5, 7, 2, 11, 4]  # per prompt: lanes free up at different steps
TEXT_LIMITS = [9, 3, 12, 5, 7]
SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("continuous_llama")
    _save_random_llama(path)
    # An EOS that one prompt's greedy continuation reaches midway (others may reach it too).
    ref = _generator(str(path), max_running=None)[0]
    return str(path), ref[0][2]


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("continuous_text")
    _, tok = save_text_checkpoint(path)
    # Stop strings: a piece of the greedy text of prompts 0 and 2 and of the sampled text of prompts 1 and 3
    # (found by decoding here), so both kinds of run stop some sequences early; prompt 4 never stops.
    runs = [_predict(_text_module(path, None, sampled), PromptDataset(TEXTS, tok), batch_size=len(TEXTS))
            for sampled in (False, True)]
    stops = [[runs[i % 2][i]["text"][2:5]] if i < 4 else ["\u2603never"] for i in range(len(TEXTS))]
    return str(path), stops


# -- the bookkeeping, as tables ---------------------------------------------------------------------
def _seqs(n):
    return [SequenceState(i, torch.tensor([i]), i, 1) for i in range(n)]


def test_lanes_refill_in_dataset_order_and_keep_their_place():
    seqs = _seqs(7)
    sched = SlotScheduler(seqs, num_slots=2, max_running=4)  # slot 0: lanes 0, 2; slot 1: lanes 1, 3; 4.. wait
    ids = lambda lanes: [s.seq_id for s in lanes]  # noqa: E731
    assert ids(sched.admit(0)) == [0, 2] and ids(sched.admit(1)) == [1, 3] and sched.num_waiting == 3
    seqs[0].done = True
    assert ids(sched.admit(0)) == [4, 2]  # the next waiting prompt, in the finished one's lane
    seqs[3].done = seqs[1].done = True
    assert ids(sched.admit(1)) == [5, 6] and sched.num_waiting == 0 and sched.num_admitted == 3
    seqs[2].done = True
    assert ids(sched.admit(0)) == [4]  # nobody waits: the lane is dropped
    seqs[4].done = seqs[5].done = seqs[6].done = True
    assert sched.admit(0) == [] and sched.admit(1) == []  # both slots close
    # Longest max_new_tokens first (ties in dataset order), so no long prompt is left to run alone at the end.
    seqs = [SequenceState(i, torch.tensor([i]), i, n) for i, n in enumerate([2, 9, 2, 5, 9])]
    sched = SlotScheduler(seqs, num_slots=1, max_running=2)
    assert ids(sched.admit(0)) == [1, 4]
    seqs[4].done = True
    assert ids(sched.admit(0)) == [1, 3]
    seqs[1].done = True
    assert ids(sched.admit(0)) == [0, 3]
    # Without a cap every prompt starts at once, dealt round-robin as before.
    sched = SlotScheduler(_seqs(5), num_slots=2)
    assert ids(sched.admit(0)) == [0, 2, 4] and ids(sched.admit(1)) == [1, 3] and sched.num_waiting == 0


def test_a_cap_that_leaves_a_slot_without_a_lane_is_refused(tiny_llama):
    check_max_running(None, 4)
    check_max_running(2, 2)
    for bad, message in ((0, "max_running must be an integer >= 1"), (True, "an integer"), (2.0, "an integer"),
                         (1, r"max_running=1 is fewer than the 2 microbatch slots .* Pass max_running >= 2")):
        with pytest.raises(ValueError, match=message):
            check_max_running(bad, 2)
    with pytest.raises(ValueError, match="max_running must be an integer >= 1"):
        GenerationModule(DecoderLM.from_pretrained(tiny_llama[0]), max_running=0)
    model = GenerationModule(DecoderLM.from_pretrained(tiny_llama[0]), max_running=1, num_microbatches=2)
    with pytest.raises(ValueError, match=r"max_running=1 is fewer than the 2 microbatch slots"):
        _predict(model, PromptDataset(PROMPTS), batch_size=4)


def test_a_newcomer_takes_its_leavers_cache_row_so_a_full_slot_reads_a_view():
    members, cache = SlotMembers(), KVCache()
    assert members.update(0, (10, 11, 12)) == ([], [])
    kv = torch.randn(6, 1, 2)
    cache.write(StepRows((10, 11, 12), (2, 2, 2), (0, 0, 0)), kv, kv)
    handovers, freed = members.update(0, (10, 20, 21))  # 11 and 12 finished, 20 and 21 took their lanes
    assert handovers == [(11, 20), (12, 21)] and freed == []
    for old, new in handovers:
        cache.replace(old, new)
    assert [cache.row(s) for s in (10, 20, 21)] == [0, 1, 2] and cache.length(20) == 0
    cache.write(StepRows((10, 20, 21), (1, 3, 1), (2, 0, 0)), torch.randn(5, 1, 2), torch.randn(5, 1, 2))
    keys, _ = cache.batch((10, 20, 21), 3)
    assert keys.data_ptr() == cache.keys.data_ptr() and cache.num_rows == 3  # a view, and no new row
    assert members.update(0, (20,)) == ([], [10, 21])  # nobody waits: freed
    with pytest.raises(ValueError, match="already holds row"):
        cache.replace(10, 20)


# -- one device --------------------------------------------------------------------------------------
class _RowRecordingCache(KVCache):
    """Records the slab's rows after every write (instances kept, per layer)."""

    made: list = []

    def __init__(self, **kw):
        super().__init__(**kw)
        self.rows_seen: list[int] = []
        _RowRecordingCache.made.append(self)

    def write(self, rows, k, v):
        super().write(rows, k, v)
        self.rows_seen.append(self.num_rows)


def _generator(path, *, max_running, eos=(), sampling=None, planner=None, num_microbatches=None):
    module = GenerationModule(DecoderLM.from_pretrained(path), eos_token_ids=eos)
    gen = PipelineGenerator(
        module._parts(StageContext()), StageContext(), max_new_tokens=8, eos_token_ids=eos, planner=planner,
        num_microbatches=num_microbatches, sampling=sampling, max_running=max_running,
    )
    out = gen.generate([torch.tensor(p) for p in PROMPTS], keys=[100 + i for i in range(len(PROMPTS))],
                       max_new_tokens=LIMITS)
    return out, gen.finish_reasons, gen.num_admitted


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generator_with_a_cap_equals_every_prompt_at_once(tiny_llama, monkeypatch, sampled):
    path, eos = tiny_llama
    sampling = SamplingParams(**SAMPLING) if sampled else None
    for slots, planner, cap in ((None, None, 3), (2, ChunkPlanner(4), 2), (3, None, 5)):
        kw = dict(eos=(eos,), sampling=sampling, planner=planner, num_microbatches=slots)
        expected, reasons, _ = _generator(path, max_running=None, **kw)
        assert {"eos", "length"} <= set(reasons)
        monkeypatch.setattr(engine, "KVCache", _RowRecordingCache)
        _RowRecordingCache.made = []
        got, got_reasons, admitted = _generator(path, max_running=cap, **kw)
        monkeypatch.undo()
        assert (got, got_reasons) == (expected, reasons), (slots, planner, cap)
        assert admitted == len(PROMPTS) - cap
        # Newcomers reuse their leavers' rows: the slab has the rows of the first step, never more.
        first_step = _RowRecordingCache.made[0].rows_seen[: slots or 1]
        assert max(_RowRecordingCache.made[0].rows_seen) == first_step[-1] <= 2 * cap


def _predict(model, dataset, *, batch_size, devices=1, strategy="auto", callbacks=(), **kw):
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=list(callbacks),
                        **trainer_kwargs(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = trainer.predict(model, loader)
    return None if out is None or out[0] is None else [row for batch in out for row in batch]


def _text_module(path, max_running, sampled):
    return GenerationModule.from_pretrained(path, max_new_tokens=12, max_running=max_running,
                                            **(SAMPLING if sampled else {}))


def test_text_with_stop_strings_and_the_writer_resume_equal_whole_batches(text_checkpoint, tmp_path):
    path, stops = text_checkpoint
    for sampled in (False, True):
        model = _text_module(path, None, sampled)
        data = PromptDataset(TEXTS, model.tokenizer, stop=stops, max_new_tokens=TEXT_LIMITS)
        expected = _predict(model, data, batch_size=2)
        assert {row["finish_reason"] for row in expected} == {"stop", "length"}, f"sampled={sampled}"
        continuous = _text_module(path, 2, sampled)
        assert _predict(continuous, data, batch_size=len(TEXTS)) == expected, f"sampled={sampled}"
        assert continuous.num_admitted == len(TEXTS) - 2
    # The writer: one batch (the window) written, the run killed, the rest resumed; no duplicates.
    writer = StreamingPredictionWriter(tmp_path / "out")
    _predict(_text_module(path, 2, True), writer.pending(data), batch_size=3, callbacks=[writer],
             limit_predict_batches=1)
    assert [r["index"] for r in read_predictions(tmp_path / "out")] == [0, 1, 2]
    writer = StreamingPredictionWriter(tmp_path / "out")
    rest = writer.pending(data)
    assert len(rest) == 2
    _predict(_text_module(path, 2, True), rest, batch_size=3, callbacks=[writer])
    rows = read_predictions(tmp_path / "out")
    assert [r["index"] for r in rows] == list(range(len(TEXTS))) and [r["prediction"] for r in rows] == expected


# -- two ranks: a pipeline, and attention-DP, in one job ----------------------------------------------
TWO_RANK_CASES = {  # name: PPStrategy arguments, GenerationModule arguments
    "pp=2 greedy, 3 microbatches": (dict(), dict(num_microbatches=3, max_running=4)),
    "pp=2 sampled": (dict(), dict(max_running=2, **SAMPLING)),
    "attention-DP=2 sampled": (dict(pipeline_parallel_size=1, attention_data_parallel_size=2),
                               dict(max_running=2, **SAMPLING)),
}


def _module(path, eos, kw):
    return GenerationModule(DecoderLM.from_pretrained(path), max_new_tokens=8, eos_token_ids=(eos,), **kw)


def _two_ranks(rank, world_size, path, eos, text_path, stops):
    from lightning_pp import PPStrategy

    out = {}
    data = PromptDataset(PROMPTS, max_new_tokens=LIMITS)
    for name, (strategy_kw, kw) in TWO_RANK_CASES.items():
        model = _module(path, eos, kw)
        out[name] = (_predict(model, data, batch_size=len(PROMPTS), devices=2, strategy=PPStrategy(**strategy_kw)),
                     model.num_admitted)
    model = _text_module(text_path, 2, True)
    text = PromptDataset(TEXTS, model.tokenizer, stop=stops, max_new_tokens=TEXT_LIMITS)
    out["pp=2 sampled text with stops"] = (_predict(model, text, batch_size=len(TEXTS), devices=2,
                                                    strategy=PPStrategy()), model.num_admitted)
    return out


@pytest.mark.slow
def test_two_ranks_with_a_cap_equal_one_device_with_whole_batches(tiny_llama, text_checkpoint):
    path, eos = tiny_llama
    text_path, stops = text_checkpoint
    data = PromptDataset(PROMPTS, max_new_tokens=LIMITS)
    results = run_on_ranks(_two_ranks, 2, path, eos, text_path, stops, init_process_group=False, timeout=300)
    for name, (_, kw) in TWO_RANK_CASES.items():
        reference = {k: v for k, v in kw.items() if k not in ("max_running", "num_microbatches")}
        expected = _predict(_module(path, eos, reference), data, batch_size=3)
        assert results[0][name][0] == expected, f"{name}: differs from one device without continuous batching"
        assert results[0][name][1] > 0 and results[1][name][0] is None, name
    model = _text_module(text_path, None, True)
    text = PromptDataset(TEXTS, model.tokenizer, stop=stops, max_new_tokens=TEXT_LIMITS)
    assert results[0]["pp=2 sampled text with stops"][0] == _predict(model, text, batch_size=2)


@pytest.mark.parametrize("window", [None, 4])
def test_decode_rows_beside_prefills_attend_as_each_sequence_alone(window):
    """A mixed forward attends its decode rows and its prefills apart (no padding); each equals its sequence alone."""
    from lightning_pp.models.llama import attend

    g = torch.Generator().manual_seed(0)
    num_new, start = (1, 6, 1, 1, 3), (7, 0, 2, 9, 4)
    seq_ids = tuple(range(len(num_new)))
    rows = StepRows(seq_ids, num_new, start)
    assert rows.decode_split(torch.device("cpu")) is not None and StepRows((0,), (6,), (0,)).decode_split("cpu") is None
    cache = KVCache()
    for seq_id, s in zip(seq_ids, start):
        if s:
            cache.write(StepRows((seq_id,), (s,), (0,)), *torch.randn(2, s, 2, 8, generator=g))
    q, k, v = torch.randn(rows.num_rows, 4, 8, generator=g), *torch.randn(2, rows.num_rows, 2, 8, generator=g)
    cache.write(rows, k, v)
    got = attend(q, *cache.batch(seq_ids, max(rows.ends)), rows, window=window)
    offset = 0
    for seq_id, n, s in zip(seq_ids, num_new, start):
        alone = StepRows((seq_id,), (n,), (s,))
        expected = attend(q[offset : offset + n], *cache.batch((seq_id,), s + n), alone, window=window)
        torch.testing.assert_close(got[offset : offset + n], expected, rtol=1e-5, atol=1e-6)
        offset += n
