"""Seeded sampling and continuation scoring, on one device and through pipelines.

References: scores are transformers' own ``log_softmax(logits)`` gathered at the
continuation tokens; sampled tokens are compared with greedy decoding where a
filter leaves one token (``top_k=1``, a tiny ``top_p``), with the softmax where the
draws are counted, and, for pipelines and data parallelism, with one device's
``trainer.predict`` of the same seed, token for token.
"""

from __future__ import annotations

import collections

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_pp.generation.sampling import SamplingParams, sample_tokens, uniform
from lightning_pp.integration.generation_module import (
    GenerationModule,
    PromptDataset,
    PromptItem,
    ScoreDataset,
    collate_prompts,
)
from lightning_pp.models.llama import DecoderConfig, DecoderLM

from lit_models import trainer_kwargs
from multirank import run_on_ranks

transformers = pytest.importorskip("transformers")

from test_generation import PROMPTS, VOCAB, _save_random_llama  # noqa: E402 - after the importorskip

SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
NEW = 6
PAIRS = [(p, [(7 * i + j) % VOCAB for j in range(1 + i % 4)]) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_sampling")
    return str(path), _save_random_llama(path)


def _predict(path, dataset, *, batch_size=3, devices=1, strategy="auto", sampler=False, **kw):
    model = GenerationModule(DecoderLM.from_pretrained(path), eos_token_ids=(), **kw)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_prompts)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, **trainer_kwargs(use_distributed_sampler=sampler)
    )
    batches = trainer.predict(model, loader)
    return None if batches is None or batches[0] is None else [row for batch in batches for row in batch]


def _tiny_lm():
    return DecoderLM(DecoderConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2))


# -- bad input: at construction, naming the valid range ----------------------------------------------
@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=0.7, top_p=0.0), r"top_p must be in \(0, 1\] .* got 0.0"),
        (dict(temperature=0.7, top_p=1.5), r"top_p must be in \(0, 1\] .* got 1.5"),
        (dict(temperature=-0.1), r"temperature must be >= 0 .* got -0.1"),
        (dict(temperature=float("nan")), r"temperature must be >= 0"),
        (dict(temperature=0.7, top_k=0), r"top_k must be an integer >= 1 .* got 0"),
        (dict(top_p=0.9), r"temperature=None decodes greedily: pass a temperature > 0"),
        (dict(seed=1.5, temperature=1.0), r"seed must be an integer"),
        (dict(mode="score", temperature=0.7), r"mode='score' .* samples nothing"),
        (dict(mode="beam"), r"mode must be one of \('generate', 'score'\)"),
        (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1"),
    ],
)
def test_invalid_parameters_are_refused_naming_the_valid_range(kw, message):
    with pytest.raises(ValueError, match=message):
        GenerationModule(_tiny_lm(), **kw)


# -- the sampler alone --------------------------------------------------------------------------------
def test_the_random_numbers_depend_on_seed_prompt_and_position_only():
    draws = {(s, k, p): uniform(s, k, p) for s in (0, 1) for k in (0, 1, 2) for p in (0, 1, 2)}
    assert len(set(draws.values())) == len(draws) and all(0 <= u < 1 for u in draws.values())
    assert uniform(1, 2, 3) == uniform(1, 2, 3)
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=5)
    together = sample_tokens(logits, params, [3, 1, 4, 1], [9, 2, 6, 5])
    alone = [sample_tokens(logits[i : i + 1], params, [k], [p]).item() for i, (k, p) in enumerate(
        [(3, 9), (1, 2), (4, 6), (1, 5)])]
    assert together.tolist() == alone  # a row's token does not depend on the rows beside it


def test_draws_follow_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 6000

    def frequencies(**kw):
        params = SamplingParams(seed=3, **kw)
        tokens = [sample_tokens(logits, params, [key], [0]).item() for key in range(n)]
        counts = collections.Counter(tokens)
        return torch.tensor([counts[i] / n for i in range(logits.shape[1])])

    expected = torch.softmax(logits[0] / 0.8, dim=0)
    assert (frequencies(temperature=0.8) - expected).abs().max() < 0.025
    top2 = frequencies(temperature=1.0, top_k=2)
    assert top2[2:].sum() == 0 and abs(top2[0] - torch.softmax(logits[0, :2], 0)[0]) < 0.025
    probs = torch.softmax(logits[0], 0)  # 0.61, 0.22, 0.14, ...: a 0.8 nucleus is the first three
    nucleus = frequencies(temperature=1.0, top_p=0.8)
    assert nucleus[3:].sum() == 0 and (nucleus[:3] - probs[:3] / probs[:3].sum()).abs().max() < 0.025
    assert frequencies(temperature=1.0, top_k=1)[0] == 1 and frequencies(temperature=5.0, top_p=1e-6)[0] == 1


# -- one device ----------------------------------------------------------------------------------------
def test_top_k_1_and_a_tiny_top_p_sample_what_greedy_decodes(checkpoint):
    path, _ = checkpoint
    greedy = _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW)
    assert _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, temperature=0.7, top_k=1) == greedy
    assert _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, temperature=1.3, top_p=1e-6) == greedy
    sampled = _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, temperature=1.0)
    assert sampled != greedy and all(len(seq) == NEW for seq in sampled)


def test_seeded_sampling_does_not_depend_on_batching_slots_or_chunks(checkpoint):
    path, _ = checkpoint
    reference = _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, **SAMPLING)
    for kw in (dict(batch_size=7, num_microbatches=3), dict(batch_size=2, prefill_chunk=3), dict(batch_size=1)):
        assert _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, **SAMPLING, **kw) == reference, kw
    other_seed = _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, **{**SAMPLING, "seed": 99})
    assert other_seed != reference
    # A prompt's stream is its dataset index: a prompt moved to another index draws other tokens.
    moved = _predict(path, PromptDataset(PROMPTS[1:] + PROMPTS[:1]), max_new_tokens=NEW, **SAMPLING)
    assert moved[:-1] != reference[1:]


def test_each_prompt_may_ask_for_its_own_length(checkpoint):
    path, _ = checkpoint
    limits = [2, None, 5, 1, None, 3, 8]
    greedy = _predict(path, PromptDataset(PROMPTS), max_new_tokens=8)
    got = _predict(path, PromptDataset(PROMPTS, max_new_tokens=limits), max_new_tokens=4, num_microbatches=2)
    assert got == [seq[: (4 if n is None else n)] for seq, n in zip(greedy, limits)]


def _hf_scores(hf, pairs):
    out = []
    for prompt, continuation in pairs:
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
        out.append(logprobs[positions, torch.tensor(continuation)])
    return out


def test_scores_equal_transformers_log_softmax(checkpoint):
    path, hf = checkpoint
    expected = _hf_scores(hf, PAIRS)
    for kw in (dict(), dict(prefill_chunk=3, num_microbatches=2, batch_size=7)):
        got = _predict(path, ScoreDataset(PAIRS), mode="score", **kw)
        assert [len(row) for row in got] == [len(c) for _, c in PAIRS]
        for row, reference in zip(got, expected):
            torch.testing.assert_close(torch.tensor(row), reference, rtol=0, atol=1e-5)


def test_scoring_and_generating_items_are_told_apart(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=r"prompt 0 of batch 0 has no continuation to score: .* ScoreDataset"):
        _predict(path, PromptDataset(PROMPTS), mode="score")
    with pytest.raises(ValueError, match=r"carries a continuation to score.*mode='score'"):
        _predict(path, ScoreDataset(PAIRS), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the continuation of prompt 1 of batch 0 is empty"):
        _predict(path, ScoreDataset([([1, 2], [3]), ([4], [])]), mode="score")
    with pytest.raises(ValueError, match=r"and its continuation hold 257 tokens, past .*=256"):
        _predict(path, ScoreDataset([([1] * 200, [2] * 57)]), mode="score")
    with pytest.raises(ValueError, match=r"asks for max_new_tokens=0"):
        _predict(path, [PromptItem([1, 2], 0, max_new_tokens=0)])
    # Equal lengths too: the default collate_fn cannot batch PromptItems.
    model = GenerationModule(DecoderLM.from_pretrained(path), max_new_tokens=2)
    loader = DataLoader(PromptDataset([[1, 2], [3, 4]]), batch_size=2)
    with pytest.raises(ValueError, match="Pass collate_fn=collate_prompts"):
        L.Trainer(accelerator="cpu", devices=1, **trainer_kwargs()).predict(model, loader)


# -- several ranks: the same tokens and scores as one device -------------------------------------------
def _two_stages(rank, world_size, path):
    from lightning_pp import PPStrategy

    sampled = _predict(path, PromptDataset(PROMPTS), devices=2, strategy=PPStrategy(), max_new_tokens=NEW, **SAMPLING)
    scores = _predict(path, ScoreDataset(PAIRS), devices=2, strategy=PPStrategy(), mode="score", prefill_chunk=4)
    return sampled, scores


@pytest.mark.slow
def test_two_stages_sample_and_score_as_one_device(checkpoint):
    path, _ = checkpoint
    sampled = _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, **SAMPLING)
    scores = _predict(path, ScoreDataset(PAIRS), mode="score")
    results = run_on_ranks(_two_stages, 2, path, init_process_group=False, timeout=180)
    assert results[0][0] == sampled
    torch.testing.assert_close(
        torch.tensor([x for row in results[0][1] for x in row]), torch.tensor([x for row in scores for x in row]),
        rtol=0, atol=1e-5,
    )
    assert results[1] == (None, None)


LAYOUTS = {  # name: PPStrategy arguments, distributed sampler
    "pp=4": (dict(), False),
    "pp=2 x attention-DP=2": (dict(pipeline_parallel_size=2, attention_data_parallel_size=2), False),
    "pp=2 x 2 data-parallel replicas": (dict(pipeline_parallel_size=2), True),
}


def _four_ranks(rank, world_size, path):
    from lightning_pp import PPStrategy

    out = {}
    for name, (kw, sampler) in LAYOUTS.items():
        out[name] = _predict(
            path, PromptDataset(PROMPTS), devices=4, strategy=PPStrategy(**kw), sampler=sampler,
            max_new_tokens=NEW, **SAMPLING,
        )
    return out


@pytest.mark.slow
def test_four_ranks_sample_as_one_device_whatever_the_layout(checkpoint):
    """Prompts land on other ranks, batches and slots in each layout; each keeps its stream."""
    path, _ = checkpoint
    reference = _predict(path, PromptDataset(PROMPTS), max_new_tokens=NEW, **SAMPLING)
    results = run_on_ranks(_four_ranks, 4, path, init_process_group=False, timeout=300)
    for name in LAYOUTS:
        assert results[0][name] == reference, f"{name}: sampled tokens differ from one device"
