"""Greedy generation with data-parallel attention: pp=2 x attention-DP=2 equals one device.

Four gloo ranks: two pipelines of two stages, side by side; each stage's layers
gather the rows of both attention-DP ranks for their MLP (split over both). The
prompts of a batch are dealt over the two attention-DP ranks, which run out at
different times (prompt lengths differ, EOS ends some sequences early), so a rank
runs idle forwards while its peer still has rows; one batch has a single prompt,
so one rank gets no prompt at all. The reference is one device's greedy output,
token for token. Cases share one spawn per level (generator, Trainer) to keep the
suite fast on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.generation.chunking import ChunkPlanner
from lightning_pp.generation.engine import PipelineGenerator, StageContext, StageParts
from lightning_pp.generation.kv_cache import KVCache, StepRows
from lightning_pp.integration.generation_module import (
    GenerationModule,
    PromptDataset,
    collate_prompts,
)
from lightning_pp.models.llama import DecoderLM
from lightning_pp.models.tp_block import BlockGroups
from lightning_pp.parallel.dp_attention import gather_shared_outputs, share_prompts

from blocking import RendezvousTransport
from multirank import run_on_ranks

transformers = pytest.importorskip("transformers")

from test_generation import PROMPTS, _save_random_llama  # noqa: E402 - after the importorskip

# Nine prompts in batches of four: 4, 4, 1 (the last batch leaves attention-DP rank 1 without a prompt).
DP_PROMPTS = PROMPTS + [[7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [50, 51]]
BATCH_SIZE = 4
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_dp")
    _save_random_llama(path)
    return str(path)


def _one_device(path, eos, *, prefill_chunk=None):
    """One device, one stage, one attention rank: the reference, batch by batch."""
    module = GenerationModule(
        DecoderLM.from_pretrained(path), max_new_tokens=MAX_NEW, eos_token_ids=eos, prefill_chunk=prefill_chunk
    )
    prompts = PromptDataset(DP_PROMPTS).prompts
    return [module.predict_step(prompts[i:i + BATCH_SIZE]) for i in range(0, len(prompts), BATCH_SIZE)]


@pytest.fixture(scope="module")
def references(tiny_llama):
    """An EOS that ends some sequences early, and one device's outputs with it."""
    free = [seq for batch in _one_device(tiny_llama, ()) for seq in batch]
    eos = free[0][2]  # prompt 0's third token: it stops there, others may stop too
    refs = {chunk: _one_device(tiny_llama, (eos,), prefill_chunk=chunk) for chunk in (None, 3)}
    flat = [seq for batch in refs[None] for seq in batch]
    assert flat[0] == free[0][:3] and any(len(seq) == MAX_NEW for seq in flat), "EOS must stop some, not all"
    return eos, refs


# -- without processes --------------------------------------------------------------------------------
def test_kv_cache_and_step_rows_are_still_importable_from_llama():
    from lightning_pp.models import llama

    assert llama.KVCache is KVCache and llama.StepRows is StepRows
    with pytest.raises(ValueError, match="this rank's included"):
        StepRows((0,), (3,), (0,), dp_num_rows=(2, 5))


def test_context_mode_with_several_cp_ranks_is_refused(tiny_llama):
    # Two cp ranks named but no process group needed: the refusal comes before any shard is made.
    groups = BlockGroups(
        attn_tp=ParallelGroup.single("attn_tp"), cp=ParallelGroup("cp", (0, 1)), mlp_tp=ParallelGroup("mlp_tp", (0, 1))
    )
    config = DecoderLM.from_pretrained(tiny_llama).config
    with pytest.raises(ValueError, match="attention_mode='data'"):
        DecoderLM(config, groups)
    with pytest.raises(ValueError, match="attention_mode must be"):
        DecoderLM(config, attention_mode="sequence")


def test_share_prompts_deals_round_robin():
    assert share_prompts(list("abcdefg"), 1, 3) == ["b", "e"]
    assert share_prompts(["a"], 1, 2) == []
    assert gather_shared_outputs(["x", "y"], ParallelGroup.single("cp")) == ["x", "y"]
    with pytest.raises(ValueError, match="outside"):
        share_prompts(["a"], 2, 2)


def test_sharding_an_unsharded_model_with_groups_of_one_changes_nothing(tiny_llama):
    lm = DecoderLM.from_pretrained(tiny_llama)
    copy = lm.shard(BlockGroups.single(), attention_mode="data")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    assert torch.equal(copy(ids), lm(ids))
    assert copy.layers[0].attn.q_proj.weight.data_ptr() != lm.layers[0].attn.q_proj.weight.data_ptr()


# -- generator level: four ranks, no Lightning ------------------------------------------------------
# One case here (chunked prefill, blocking sends); the Trainer-level test below covers unchunked ones.
GENERATOR_CASES = [("chunked", True)]


def _generator_rank(rank, world_size, path, eos):
    from lightning_pp.distributed.p2p import PipeComm
    from lightning_pp.distributed.topology import MeshShape, build_topology

    topo = build_topology(MeshShape(pp=2, cp=2))
    groups = BlockGroups.from_topology(topo)
    full = DecoderLM.from_pretrained(path)
    lm = full.shard(groups, attention_mode="data")
    out = {"coords": (topo.coords.pp, topo.coords.cp)}
    # A layer without the peers' row counts says what is missing (before any collective).
    layer = lm.layers[0]
    hidden, residual = lm.embed(torch.tensor([1, 2]))
    try:
        layer(hidden, residual, rows=StepRows((0,), (2,), (0,)), cache=KVCache())
    except ValueError as error:
        out["no_counts"] = str(error)
    try:
        full.shard(groups, attention_mode="data").shard(groups, attention_mode="data")
    except ValueError as error:
        out["twice"] = str(error)

    pp_rank, half = topo.coords.pp, full.config.num_layers // 2
    parts = StageParts(
        layers=list(lm.layers)[pp_rank * half:(pp_rank + 1) * half],
        embed=lm.embed if pp_rank == 0 else None,
        head=lm.head if pp_rank == 1 else None,
        vocab_size=full.config.vocab_size,
    )
    prompts = [torch.tensor(p) for p in DP_PROMPTS]
    for case, blocking in GENERATOR_CASES:
        transport = RendezvousTransport(timeout=30) if blocking else None
        stage = StageContext(
            pp_rank=pp_rank,
            pp_size=2,
            comm=PipeComm(topo.pp.device_group, torch.device("cpu"), transport=transport),
            control_group=topo.pp.cpu_group,
            first_stage_rank=topo.pp.global_rank_of(0),
            attn_dp_group=topo.cp,
            attn_tp_size=topo.tp.size,
        )
        planner = ChunkPlanner(3) if case == "chunked" else None
        batches, idle = [], 0
        for i in range(0, len(prompts), BATCH_SIZE):
            gen = PipelineGenerator(parts, stage, max_new_tokens=MAX_NEW, eos_token_ids=(eos,), planner=planner)
            mine = gen.generate(share_prompts(prompts[i:i + BATCH_SIZE], topo.cp.rank, topo.cp.size))
            batches.append(gather_shared_outputs(mine, topo.cp) if mine is not None else None)
            idle += gen.num_idle_forwards
        out[(case, blocking)] = (batches, idle, transport.num_sends if blocking else None)
    return out


def _check_generator(results, refs):
    by_coords = {r["coords"]: r for r in results}
    for r in results:
        assert "dp_num_rows" in r["no_counts"] and "already sharded" in r["twice"]
    for key in GENERATOR_CASES:
        case, blocking = key
        expected = refs[3 if case == "chunked" else None]
        assert by_coords[(0, 0)][key][0] == expected, f"{key}: attention-DP output differs from one device"
        for coords in ((0, 1), (1, 0), (1, 1)):
            assert by_coords[coords][key][0] == [None] * len(expected)
        # Rank cp=1 had no prompt in the last batch, and ran out early in others: idle forwards on both stages.
        assert by_coords[(0, 1)][key][1] > 0 and by_coords[(1, 1)][key][1] > 0
        assert by_coords[(0, 1)][key][1] == by_coords[(1, 1)][key][1], "stages must agree on idle forwards"
        if blocking:
            assert all(r[key][2] > 0 for r in results)


@pytest.mark.slow
def test_pp2_x_attention_dp2_generator_equals_one_device(tiny_llama, references):
    eos, refs = references
    results = run_on_ranks(_generator_rank, 4, tiny_llama, eos, timeout=180)
    _check_generator(results, refs)


# -- Trainer level: PPStrategy(pipeline_parallel_size=..., attention_data_parallel_size=2, ...) ---------------
# (name, blocking sends, pp, tp): pp=2 x attention-DP=2, then pp=1 x attention-DP=2 x attention-TP=2, where an
# idle forward's zero rows also go through the attention-TP all-reduce.
TRAINER_CASES = [("plain", True, 2, 1), ("plain", False, 1, 2)]


def _trainer_rank(rank, world_size, path, eos):
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_pp import PPStrategy

    from lit_models import trainer_kwargs

    out = {}
    for key in TRAINER_CASES:
        case, blocking, pp, tp = key
        transport = RendezvousTransport(timeout=30) if blocking else None
        strategy = PPStrategy(
            pipeline_parallel_size=pp, attention_data_parallel_size=2, tensor_parallel_size=tp, transport=transport
        )
        model = GenerationModule(
            DecoderLM.from_pretrained(path),
            max_new_tokens=MAX_NEW,
            eos_token_ids=(eos,),
            prefill_chunk=3 if case == "chunked" else None,
        )
        loader = DataLoader(PromptDataset(DP_PROMPTS), batch_size=BATCH_SIZE, collate_fn=collate_prompts)
        trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, **trainer_kwargs())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preds = trainer.predict(model, loader)
        coords = strategy.topology.coords
        out[key] = {
            "coords": (coords.pp, coords.cp, coords.tp),
            "preds": preds,
            "idle": model.num_idle_forwards,
            "sends": transport.num_sends if blocking else None,
            "mlp_rows": model.layers.stages[coords.pp][0].mlp.gate_proj.weight.shape[0],
        }
    return out


@pytest.mark.slow
def test_trainer_predict_with_attention_dp2_equals_one_device(tiny_llama, references):
    eos, refs = references
    results = run_on_ranks(_trainer_rank, 4, tiny_llama, eos, init_process_group=False, timeout=300)
    ffn = DecoderLM.from_pretrained(tiny_llama).config.intermediate_size
    for key in TRAINER_CASES:
        case, blocking, pp, tp = key
        expected = refs[3 if case == "chunked" else None]
        assert results[0][key]["coords"] == (0, 0, 0)
        assert results[0][key]["preds"] == expected, f"{key}: trainer.predict on rank 0 differs from one device"
        for r in results[1:]:
            assert r[key]["preds"] == [None] * len(expected)
        assert all(r[key]["mlp_rows"] == ffn // (2 * tp) for r in results), "the MLP is split over cp x tp"
        idle = {r[key]["coords"]: r[key]["idle"] for r in results}
        # Attention-DP rank 1 had no prompt in the last batch: idle forwards on each of its stages and tp ranks.
        assert all(n > 0 for (_, cp, _), n in idle.items() if cp == 1)
        assert len({n for (_, cp, _), n in idle.items() if cp == 1}) == 1, "stages and tp ranks agree on idle forwards"
        if blocking:
            assert all(r[key]["sends"] > 0 for r in results)
