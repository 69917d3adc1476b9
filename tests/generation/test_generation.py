"""Llama decoder against transformers, and greedy generation on one device and through the pipeline.

References are independent: logits and greedy continuations come from
``transformers``' own LlamaForCausalLM on the same saved weights; pipelined
generation is compared token for token with a one-device ``trainer.predict``.
Several pipeline cases share one spawn to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_pp.generation.chunking import (
    ChunkPlanner,
    FitError,
    LatencyModel,
    fit_latency,
    plan_chunks,
    profile_grid,
    profile_latency,
    share_latency_model,
)
from lightning_pp.integration.generation_module import (
    GenerationModule,
    PromptDataset,
    collate_prompts,
)
from lightning_pp.models.llama import DecoderConfig, DecoderLM

from blocking import RendezvousTransport
from lit_models import trainer_kwargs
from multirank import run_on_ranks

transformers = pytest.importorskip("transformers")

VOCAB = 96
PROMPTS = [
    [5, 17, 33, 2, 9, 41, 8, 60, 12, 71, 3, 3, 19],
    [44, 7],
    [11, 80, 23, 5, 6],
    [90],
    [30, 31, 32, 33, 34, 35, 36, 37],
    [64, 1, 77],
    [15, 25, 35, 45, 55, 65, 75, 85, 95, 5, 15, 25, 35, 45, 55, 65, 75, 85],
]


def _hf_config(**overrides):
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def _save_random_llama(path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():  # random norms too, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    return str(path), _save_random_llama(path)


# -- the decoder against transformers ---------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_theta": 500.0}]
)
def test_logits_equal_transformers(tmp_path, overrides):
    hf = _save_random_llama(tmp_path, seed=1, **overrides)
    lm = DecoderLM.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(lm(ids), expected, rtol=1e-5, atol=1e-5)


def test_unsupported_configs_are_refused():
    base = _hf_config().to_dict()
    with pytest.raises(ValueError, match="mlp_bias"):
        DecoderConfig.from_hf({**base, "mlp_bias": True})
    with pytest.raises(ValueError, match="rope type"):
        DecoderConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})


def _hf_greedy(hf, prompt, max_new_tokens, eos=None):
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt):].tolist()


def _one_device(path, prompts, **kw):
    model = GenerationModule(DecoderLM.from_pretrained(path), **kw)
    loader = DataLoader(PromptDataset(prompts), batch_size=kw.pop("batch_size", 4), collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=1, **trainer_kwargs())
    return [seq for batch in trainer.predict(model, loader) for seq in batch]


def test_one_device_greedy_equals_transformers_generate(checkpoint):
    path, hf = checkpoint
    new = 6
    expected = [_hf_greedy(hf, p, new) for p in PROMPTS]
    assert _one_device(path, PROMPTS, max_new_tokens=new, eos_token_ids=()) == expected
    # EOS: a token the first prompt produces third ends it there (kept), others may stop too.
    eos = expected[0][2]
    with_eos = [_hf_greedy(hf, p, new, eos=eos) for p in PROMPTS]
    with_eos = [seq[: seq.index(eos) + 1] if eos in seq else seq for seq in with_eos]  # drop HF's padding
    assert with_eos[0] == expected[0][:3]
    got = _one_device(path, PROMPTS, max_new_tokens=new, eos_token_ids=(eos,), num_microbatches=3)
    assert got == with_eos


def test_chunked_prefill_equals_unchunked(checkpoint):
    path, _ = checkpoint
    whole = _one_device(path, PROMPTS, max_new_tokens=4, eos_token_ids=())
    assert _one_device(path, PROMPTS, max_new_tokens=4, eos_token_ids=(), prefill_chunk=3) == whole
    # Predictor on: whatever the profile gives (or a fallback), the tokens are the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _one_device(path, PROMPTS, max_new_tokens=4, eos_token_ids=(), prefill_chunk=4, chunk_predictor=True)
    assert got == whole


# -- the latency predictor --------------------------------------------------------------------------
def test_fit_recovers_a_quadratic_and_refuses_bad_samples():
    sizes = list(range(8, 129, 8))
    truth = LatencyModel(2e-6, 3e-4, 5e-3)
    noisy = [truth(n) * (1 + 0.01 * math.sin(n)) for n in sizes]
    fit = fit_latency(sizes, noisy)
    assert fit.a == pytest.approx(truth.a, rel=0.2) and fit.b == pytest.approx(truth.b, rel=0.2)
    with pytest.raises(FitError, match="not positive"):
        fit_latency(sizes, [1.0 - 1e-5 * n * n for n in sizes])  # concave
    with pytest.raises(FitError, match="decreases between"):
        fit_latency(sizes, [5e-3 + 1e-6 * n * n - 2e-4 * n for n in sizes])  # falls before it rises
    with pytest.raises(FitError, match="three or more"):
        fit_latency([8, 8, 16], [1.0, 1.0, 2.0])
    with pytest.raises(FitError, match="three or more"):
        fit_latency([8, 16, 8], [1.0, 2.0, 1.0], prefixes=[0, 0, 0])
    with pytest.raises(FitError, match="cannot separate"):  # one size at three prefixes: n and 1 are collinear
        fit_latency([8, 8, 8], [1.0, 2.0, 3.0], prefixes=[0, 8, 16])
    with pytest.raises(FitError, match="NaN"):
        fit_latency([1, 2, 3], [1.0, float("nan"), 2.0])


def _noisy(model, points, seed, rel=0.05):
    g = torch.Generator().manual_seed(seed)
    return [model.chunk_cost(p, n) * (1 + rel * (2 * torch.rand(1, generator=g).item() - 1)) for p, n in points]


def test_prefixed_samples_pin_down_the_attention_term_that_fresh_chunks_cannot():
    """A CPU-like model: the linear term dominates fresh chunks, the n·p term shows only after a prefix."""
    truth = LatencyModel(2e-8, 3e-5, 1e-3)
    sizes = list(range(64, 513, 64))
    points = profile_grid(sizes, [0, 512, 1024])
    assert points[:2] == [(0, 64), (0, 128)] and points[-1] == (1024, 512) and len(points) == 24
    fit = fit_latency([n for _, n in points], _noisy(truth, points, seed=0), prefixes=[p for p, _ in points])
    assert fit.a == pytest.approx(truth.a, rel=0.1) and fit.b == pytest.approx(truth.b, rel=0.1)
    fresh = [(0, n) for n in sizes]
    fresh_fit = fit_latency(sizes, _noisy(truth, fresh, seed=0))
    assert abs(fresh_fit.a / truth.a - 1) > 3 * abs(fit.a / truth.a - 1)  # same noise, far worse curvature
    # Planned from the noisy fit, chunks cost the same under the *true* model.
    chunks = plan_chunks(fit, 1536, first_chunk=256)
    prefix, costs = 0, []
    for n in chunks[:-1]:
        costs.append(truth.chunk_cost(prefix, n))
        prefix += n
    assert chunks[1] < chunks[0] and max(costs) / min(costs) < 1.05
    fixed = [truth.chunk_cost(p, 256) for p in range(0, 1536, 256)]
    assert max(fixed) / min(fixed) > 1.5  # what equal-token chunks would cost instead


def test_profile_times_each_point_after_an_untimed_setup():
    calls = []
    ps, ns, ys = profile_latency(
        lambda p, n: calls.append(("run", p, n)),
        [(0, 4), (8, 4), (8, 2)],
        setup=lambda p, n: calls.append(("setup", p, n)),
    )
    assert (ps, ns) == ([0, 8, 8], [4, 4, 2]) and len(ys) == 3 and all(y >= 0 for y in ys)
    warm_up_and_first = [("setup", 0, 4), ("run", 0, 4)] * 2
    assert calls == warm_up_and_first + [("setup", 8, 4), ("run", 8, 4), ("setup", 8, 2), ("run", 8, 2)]


def test_chunks_take_equal_predicted_time_as_the_prefix_grows():
    model = LatencyModel(1e-5, 1e-4, 1e-3)
    chunks = plan_chunks(model, 2000, first_chunk=256)
    assert sum(chunks) == 2000 and chunks[0] == 256
    assert all(a >= b for a, b in zip(chunks[:-2], chunks[1:-1])) and chunks[1] < chunks[0]  # shrinking
    prefix, costs = 0, []
    for n in chunks[:-1]:  # the last chunk is whatever remains
        costs.append(model.chunk_cost(prefix, n))
        prefix += n
    assert max(costs) / min(costs) < 1.1  # integer chunk lengths round the costs
    fixed = plan_chunks(None, 1000, first_chunk=256)
    assert fixed == [256, 256, 256, 232]
    assert ChunkPlanner(256, model).next_chunk(256, 5000) == chunks[1]
    aligned = plan_chunks(model, 2000, first_chunk=256, align=16)
    assert all(n % 16 == 0 for n in aligned[:-1])


# -- pipelines ----------------------------------------------------------------------------------------
def _share(rank, world_size):
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")
    outcomes = []
    for fit_ok in (True, False):
        model = LatencyModel(1.0, 2.0, 3.0) if (rank == 0 and fit_ok) else None
        outcomes.append(share_latency_model(model, src=0, group=group))
    return outcomes


def test_predictor_is_shared_or_every_rank_falls_back():
    """Success flag first: a failed fit on rank 0 leaves every rank on fixed chunks, none waiting."""
    assert run_on_ranks(_share, 3, timeout=60) == [[LatencyModel(1.0, 2.0, 3.0), None]] * 3


class _RecordingPlatform:
    """Pins and copies like a device platform and records the calls (``to_device`` refuses ``None``)."""

    def __init__(self):
        self.calls = []

    def pin(self, tensor):
        self.calls.append(("pin", tensor.numel()))
        return tensor

    def to_device(self, tensor, device):
        assert tensor is not None and tensor.device.type == "cpu"
        self.calls.append(("to_device", tensor.numel()))
        return tensor.clone()

    def synchronize(self, device=None):
        pass


def test_token_ids_cross_to_the_device_only_when_launched_and_profiler_uses_the_same_step(checkpoint):
    from lightning_pp.generation.engine import (
        PipelineGenerator,
        StageContext,
        init_chunk_planner,
    )

    platform = _RecordingPlatform()
    module = GenerationModule(DecoderLM.from_pretrained(checkpoint[0]), eos_token_ids=())
    stage = StageContext(platform=platform)
    parts = module._parts(stage)
    prompts = [torch.tensor(p) for p in PROMPTS[:3]]
    generator = PipelineGenerator(parts, stage, max_new_tokens=2, planner=ChunkPlanner(4), num_microbatches=2)
    out = generator.generate(prompts)
    copied = [n for op, n in platform.calls if op == "to_device"]
    # step 0: both slots' first chunks (slot 0 holds prompts 0 and 2); then the rest, one forward at a time.
    assert copied[:2] == [4 + 4, 2] and sum(copied) == sum(len(p) for p in PROMPTS[:3]) + 3 * 1
    assert all(len(seq) == 2 for seq in out)
    platform.calls.clear()
    planner, why = init_chunk_planner(parts, stage, first_chunk=4, profile_sizes=[2, 4, 8, 16], profile_prefixes=[0, 8])
    # Warm-up, each size fresh, the 8-token prefix prefilled in chunks of 4 (once), each size after it.
    assert [n for op, n in platform.calls if op == "to_device"] == [2, 2, 4, 8, 16, 4, 4, 2, 4, 8, 16]
    assert (planner.model is None) == (why is not None)


CASES = {
    "eos": dict(max_new_tokens=6, num_microbatches=4, batch_size=7),
    "batches-chunked": dict(max_new_tokens=5, num_microbatches=4, batch_size=3, prefill_chunk=4),
    "failed-predictor": dict(max_new_tokens=4, num_microbatches=4, batch_size=7, prefill_chunk=4,
                             chunk_predictor=True, profile_sizes=[4, 4, 8], profile_prefixes=[0]),
}


def _generate(path, case, eos, devices, strategy):
    kw = dict(CASES[case])
    batch_size = kw.pop("batch_size")
    model = GenerationModule(DecoderLM.from_pretrained(path), eos_token_ids=(eos,), **kw)
    loader = DataLoader(PromptDataset(PROMPTS), batch_size=batch_size, collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = trainer.predict(model, loader)
    return out, model.predictor_fallback


def _pp_rank(rank, world_size, path, eos, runs):
    from lightning_pp import PPStrategy

    out = {}
    for case, blocking in runs:
        transport = RendezvousTransport(timeout=30) if blocking else None
        preds, fallback = _generate(path, case, eos, world_size, PPStrategy(transport=transport))
        out[(case, blocking)] = (preds, fallback, transport.num_sends if blocking else None)
    return out


@pytest.fixture(scope="module")
def eos_and_references(checkpoint):
    path, hf = checkpoint
    eos = _hf_greedy(hf, PROMPTS[0], 3)[2]
    return eos, {case: _generate(path, case, eos, 1, "auto")[0] for case in CASES}


def _check(results, world_size, runs, references):
    for key in runs:
        case, blocking = key
        preds, fallback, sends = results[0][key]
        assert preds == references[case], f"{key}: pipeline output differs from one device"
        assert any(len(seq) < CASES[case]["max_new_tokens"] for batch in preds for seq in batch), "EOS never hit"
        for rank in range(1, world_size):
            assert results[rank][key][0] == [None] * len(preds)
        fallbacks = [r[key][1] for r in results]
        if CASES[case].get("chunk_predictor"):
            assert all(f is not None for f in fallbacks), "a failed profile must turn the predictor off everywhere"
        if blocking:
            assert all(r[key][2] > 0 for r in results)


pytestmark = pytest.mark.slow


def test_two_stages_generate_what_one_device_generates(checkpoint, eos_and_references):
    runs = [("eos", False), ("batches-chunked", False), ("failed-predictor", False), ("eos", True)]
    eos, refs = eos_and_references
    results = run_on_ranks(_pp_rank, 2, checkpoint[0], eos, runs, init_process_group=False, timeout=150)
    _check(results, 2, runs, refs)


def test_three_stages_with_blocking_sends(checkpoint, eos_and_references):
    runs = [("eos", True), ("batches-chunked", True)]
    eos, refs = eos_and_references
    results = run_on_ranks(_pp_rank, 3, checkpoint[0], eos, runs, init_process_group=False, timeout=150)
    _check(results, 3, runs, refs)


def test_four_stages_with_blocking_sends(checkpoint, eos_and_references):
    runs = [("eos", True)]
    eos, refs = eos_and_references
    results = run_on_ranks(_pp_rank, 4, checkpoint[0], eos, runs, init_process_group=False, timeout=150)
    _check(results, 4, runs, refs)


# -- bad input: errors that name the fix, before any generation -----------------------------------
def _predict_one_device(path, prompts, collate=collate_prompts, **kw):
    model = GenerationModule(DecoderLM.from_pretrained(path), **kw)
    kwargs = {"collate_fn": collate} if collate is not None else {}
    loader = DataLoader(PromptDataset(prompts), batch_size=4, **kwargs)
    return L.Trainer(accelerator="cpu", devices=1, **trainer_kwargs()).predict(model, loader)


def test_ragged_prompts_without_collate_prompts_say_so(checkpoint):
    with pytest.raises(ValueError, match="Pass collate_fn=collate_prompts"):
        _predict_one_device(checkpoint[0], PROMPTS, collate=None, max_new_tokens=2)


def test_token_ids_outside_the_vocabulary_are_named(checkpoint):
    with pytest.raises(ValueError, match=rf"prompt 1 of batch 0 holds token id {VOCAB}, outside .* {VOCAB} ids"):
        _predict_one_device(checkpoint[0], [[1, 2], [3, VOCAB]], max_new_tokens=2)
    with pytest.raises(ValueError, match="holds token id -1"):
        _predict_one_device(checkpoint[0], [[1, -1]], max_new_tokens=2)


def test_positions_past_the_model_are_refused(checkpoint):
    # The checkpoint's max_position_embeddings is 256.
    with pytest.raises(ValueError, match=r"has 250 tokens; with max_new_tokens=10 .* max_position_embeddings=256"):
        _predict_one_device(checkpoint[0], [[1] * 250], max_new_tokens=10)
    assert len(_predict_one_device(checkpoint[0], [[1] * 250], max_new_tokens=6)[0][0]) == 6


def _strategy_microbatches(rank, world_size, path, eos):
    from lightning_pp import PPStrategy

    model = GenerationModule(DecoderLM.from_pretrained(path), eos_token_ids=(eos,), max_new_tokens=5)
    loader = DataLoader(PromptDataset(PROMPTS), batch_size=7, collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(num_microbatches=3),
                        **trainer_kwargs())
    out = trainer.predict(model, loader)
    conflicting = GenerationModule(DecoderLM.from_pretrained(path), num_microbatches=2)
    try:
        trainer.predict(conflicting, loader)
    except ValueError as error:
        return out, str(error)
    return out, "no error"


def test_strategy_microbatches_reach_generation(checkpoint, eos_and_references):
    path, _ = checkpoint
    eos, _ = eos_and_references
    reference = _predict_one_device(path, PROMPTS, eos_token_ids=(eos,), max_new_tokens=5, num_microbatches=3)
    results = run_on_ranks(_strategy_microbatches, 2, path, eos, init_process_group=False, timeout=180)
    assert [seq for batch in results[0][0] for seq in batch] == [seq for batch in reference for seq in batch]
    for _, message in results:
        assert "GenerationModule(num_microbatches=2) and PPStrategy(num_microbatches=3) disagree" in message
