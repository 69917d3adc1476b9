"""The TP x CP transformer block equals an unsharded reference; idle batches do not hang."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_pp.distributed.collectives import split_token_counts, token_offsets
from lightning_pp.distributed.topology import MeshShape, ParallelGroup, build_topology
from lightning_pp.models import BlockConfig, BlockGroups, TPTransformerBlock
from lightning_pp.parallel.dp_attention import gather_batch_info, make_idle_batch

from multirank import run_on_ranks

CONFIG = dict(hidden_size=32, num_heads=4, ffn_hidden_size=64, eps=1e-6)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2}


# -- the reference: plain torch, one process, fp32 arithmetic -------------------------------


def full_weights(config: BlockConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, f, d = config.hidden_size, config.ffn_hidden_size, config.head_dim

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(dtype)

    return {
        "wq": w(config.num_heads * d, h), "wk": w(config.kv_heads * d, h), "wv": w(config.kv_heads * d, h),
        "wo": w(h, config.num_heads * d), "gate": w(f, h), "up": w(f, h), "down": w(h, f),
        "post_attention_norm": (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype),
        "output_norm": (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype),
    }


def reference_block(w: dict, hidden: torch.Tensor, residual: torch.Tensor, config: BlockConfig) -> tuple:
    """Causal attention + SwiGLU with fused-style add+norm, in fp32, on one sequence."""
    w = {k: v.float() for k, v in w.items()}
    x, n, d = hidden.float(), hidden.shape[0], config.head_dim

    def rms(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + config.eps) * g

    q = (x @ w["wq"].T).view(n, config.num_heads, d).transpose(0, 1)
    rep = config.num_heads // config.kv_heads
    k = (x @ w["wk"].T).view(n, config.kv_heads, d).transpose(0, 1).repeat_interleave(rep, 0)
    v = (x @ w["wv"].T).view(n, config.kv_heads, d).transpose(0, 1).repeat_interleave(rep, 0)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(1, 2)) / math.sqrt(d)
    attn = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    residual = attn.transpose(0, 1).reshape(n, -1) @ w["wo"].T + residual.float()
    h = rms(residual, w["post_attention_norm"])
    mlp = (F.silu(h @ w["gate"].T) * (h @ w["up"].T)) @ w["down"].T
    residual = mlp + residual
    return rms(residual, w["output_norm"]), residual


def sequence(num_tokens: int, seed: int, dtype: torch.dtype, hidden: int = CONFIG["hidden_size"]) -> tuple:
    gen = torch.Generator().manual_seed(10_000 + seed)
    hidden_states = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    return hidden_states, torch.randn(num_tokens, hidden, generator=gen).to(dtype)


def load_weights(block: TPTransformerBlock, w: dict) -> None:
    attn, mlp = block.attn, block.mlp
    attn.q_proj.load_full_weight_(w["wq"])
    attn.k_proj.load_full_weight_(w["wk"])
    attn.v_proj.load_full_weight_(w["wv"])
    attn.o_proj.load_full_weight_(w["wo"])
    mlp.gate_proj.load_full_weight_(w["gate"])
    mlp.up_proj.load_full_weight_(w["up"])
    mlp.down_proj.load_full_weight_(w["down"])
    with torch.no_grad():
        block.post_attention_norm.weight.copy_(w["post_attention_norm"])
        block.output_norm.weight.copy_(w["output_norm"])


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    tol = TOLERANCE[dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


# -- one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_unsharded_block_matches_reference(num_kv_heads, num_tokens):
    config = BlockConfig(**CONFIG, num_kv_heads=num_kv_heads)
    block = TPTransformerBlock(config, BlockGroups.single())
    w = full_weights(config)
    load_weights(block, w)
    hidden, residual = sequence(num_tokens, 0, torch.float32)
    got = block(hidden, residual)
    want = reference_block(w, hidden, residual, config)
    _assert_close(got[0], want[0], torch.float32, "normed")
    _assert_close(got[1], want[1], torch.float32, "residual")
    assert block.cp_partial_parameters() == []


def test_block_config_and_groups_are_validated():
    with pytest.raises(ValueError, match="num_kv_heads"):
        BlockConfig(hidden_size=32, num_heads=4, ffn_hidden_size=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="attention_mode"):
        BlockConfig(hidden_size=32, num_heads=4, ffn_hidden_size=8, attention_mode="ring")
    with pytest.raises(ValueError, match="build_topology"):
        # MLP-TP must span attention-TP x cp (reducing the MLP over a smaller group was SGLang's CP bug).
        BlockGroups(ParallelGroup("attn_tp", (0, 1)), ParallelGroup("cp", (0, 2)), ParallelGroup("mlp_tp", (0, 1)))


# -- attention-TP 2 x CP 2 on 4 ranks ---------------------------------------------------------

TOKEN_COUNTS = (1, 2, 3, 5, 16, 33, 64)
GRAD_TOKENS = (5, 16)


def _shard_of(module_name: str, block: TPTransformerBlock) -> tuple:
    """(dim, start, stop) of a parameter's slice of the full weight, or None if unsharded."""
    module = block.get_submodule(module_name)
    if hasattr(module, "shard"):
        dim = 0 if type(module).__name__ == "ColumnParallelLinear" else 1
        return (dim, *module.shard)
    return None


def _cp_block_on_rank(rank: int, world_size: int) -> dict:
    topo = build_topology(MeshShape(cp=2, tp=2), device_type="cpu")
    groups = BlockGroups.from_topology(topo)
    out: dict = {"cp_rank": topo.cp.rank, "cp_ranks": topo.cp.ranks, "mlp_ranks": topo.mlp_tp.ranks}
    for dtype in (torch.float32, torch.bfloat16):
        config = BlockConfig(**CONFIG, num_kv_heads=2)
        block = TPTransformerBlock(config, groups).to(dtype)
        load_weights(block, full_weights(config, dtype=dtype))
        for n in TOKEN_COUNTS:
            counts = split_token_counts(n, topo.cp.size)
            start = token_offsets(counts)[topo.cp.rank]
            hidden, residual = sequence(n, n, dtype)
            mine = slice(start, start + counts[topo.cp.rank])
            with torch.no_grad():
                out[(str(dtype), n)] = block(hidden[mine], residual[mine], token_counts=counts)

    # Gradients (fp32): each rank's loss is over its own rows; the reference's over all.
    config = BlockConfig(**CONFIG, num_kv_heads=2)
    block = TPTransformerBlock(config, groups)
    load_weights(block, full_weights(config))
    for n in GRAD_TOKENS:
        block.zero_grad()
        counts = split_token_counts(n, topo.cp.size)
        start = token_offsets(counts)[topo.cp.rank]
        mine = slice(start, start + counts[topo.cp.rank])
        hidden, residual = (t[mine].clone().requires_grad_(True) for t in sequence(n, n, torch.float32))
        probe_normed, probe_residual = (t[mine] for t in sequence(n, 99, torch.float32))
        normed, residual_out = block(hidden, residual, token_counts=counts)
        ((normed * probe_normed).sum() + (residual_out * probe_residual).sum()).backward()
        grads = {}
        partial = set(block.cp_partial_parameters())
        for name, param in block.named_parameters():
            grad = param.grad.clone()
            if name in partial:
                dist.all_reduce(grad, group=topo.cp.device_group)
            grads[name] = (grad, _shard_of(name.rsplit(".", 1)[0], block))
        out[("grad", n)] = {"hidden": hidden.grad, "residual": residual.grad, "params": grads}
    return out


_PARAM_KEYS = {
    "attn.q_proj.weight": "wq", "attn.k_proj.weight": "wk", "attn.v_proj.weight": "wv", "attn.o_proj.weight": "wo",
    "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
    "post_attention_norm.weight": "post_attention_norm", "output_norm.weight": "output_norm",
}


@pytest.fixture(scope="module")
def cp_block_results() -> list:
    return run_on_ranks(_cp_block_on_rank, 4)


def test_attn_tp2_x_cp2_block_equals_unsharded(cp_block_results):
    results = cp_block_results
    assert [r["cp_ranks"] for r in results] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert all(r["mlp_ranks"] == (0, 1, 2, 3) for r in results)
    for dtype in (torch.float32, torch.bfloat16):
        config = BlockConfig(**CONFIG, num_kv_heads=2)
        w = full_weights(config, dtype=dtype)
        for n in TOKEN_COUNTS:
            hidden, residual = sequence(n, n, dtype)
            want_normed, want_residual = reference_block(w, hidden, residual, config)
            counts = split_token_counts(n, 2)
            for rank, res in enumerate(results):
                start = token_offsets(counts)[res["cp_rank"]]
                rows = slice(start, start + counts[res["cp_rank"]])
                normed, residual_out = res[(str(dtype), n)]
                assert normed.dtype == dtype and normed.shape == (counts[res["cp_rank"]], CONFIG["hidden_size"])
                _assert_close(normed, want_normed[rows], dtype, f"normed rank {rank} n={n} {dtype}")
                _assert_close(residual_out, want_residual[rows], dtype, f"residual rank {rank} n={n} {dtype}")


def test_attn_tp2_x_cp2_block_gradients(cp_block_results):
    config = BlockConfig(**CONFIG, num_kv_heads=2)
    for n in GRAD_TOKENS:
        w = {k: v.clone().requires_grad_(True) for k, v in full_weights(config).items()}
        hidden, residual = (t.clone().requires_grad_(True) for t in sequence(n, n, torch.float32))
        probe_normed, probe_residual = sequence(n, 99, torch.float32)
        normed, residual_out = reference_block(w, hidden, residual, config)
        ((normed * probe_normed).sum() + (residual_out * probe_residual).sum()).backward()
        counts = split_token_counts(n, 2)
        for rank, res in enumerate(cp_block_results):
            got = res[("grad", n)]
            start = token_offsets(counts)[res["cp_rank"]]
            rows = slice(start, start + counts[res["cp_rank"]])
            _assert_close(got["hidden"], hidden.grad[rows], torch.float32, f"d hidden rank {rank}")
            _assert_close(got["residual"], residual.grad[rows], torch.float32, f"d residual rank {rank}")
            for name, (grad, shard) in got["params"].items():
                want = w[_PARAM_KEYS[name]].grad
                if shard is not None:
                    dim, lo, hi = shard
                    want = want.narrow(dim, lo, hi - lo)
                _assert_close(grad, want, torch.float32, f"d {name} rank {rank} n={n}")


# -- idle batches (data-parallel attention) ------------------------------------------------------

# Tokens per attention-DP batch. cp2 x tp2: the attention-TP pair (0, 1) shares a batch,
# (2, 3) is empty. cp4: ranks 0 and 2 have batches, 1 and 3 are empty.
IDLE_CASES = {
    "cp2tp2": (MeshShape(cp=2, tp=2), {0: 7, 1: 0}),
    "cp4": (MeshShape(cp=4), {0: 5, 1: 0, 2: 9, 3: 0}),
}
_RECORDED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


def _idle_on_rank(rank: int, world_size: int) -> dict:
    out = {}
    config = BlockConfig(**CONFIG, attention_mode="data")
    for label, (shape, batch_tokens) in IDLE_CASES.items():
        topo = build_topology(shape, device_type="cpu")
        block = TPTransformerBlock(config, BlockGroups.from_topology(topo))
        load_weights(block, full_weights(config))
        cp_rank = topo.cp.rank
        info = gather_batch_info(batch_tokens[cp_rank], dp_group=topo.cp, attn_tp_size=topo.attn_tp.size)
        if info.need_idle_batch:
            idle = make_idle_batch(config.hidden_size)
            hidden, residual = idle.hidden, idle.residual
        else:
            hidden, residual = sequence(batch_tokens[cp_rank], cp_rank, torch.float32)
        # Record every collective this rank issues during the forward.
        log, originals = [], {name: getattr(dist, name) for name in _RECORDED}
        for name, fn in originals.items():
            def recording(*args, _name=name, _fn=fn, _log=log, **kwargs):
                group = kwargs.get("group")
                _log.append((_name, dist.get_world_size(group) if group is not None else dist.get_world_size()))
                return _fn(*args, **kwargs)

            setattr(dist, name, recording)
        try:
            with torch.no_grad():
                result = block(hidden, residual, token_counts=info.global_num_tokens) if info.should_run else None
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        out[label] = {"info": info, "result": result, "collectives": log, "cp_rank": cp_rank}

        # Nobody has tokens: nobody runs, so nobody waits.
        nobody = gather_batch_info(0, dp_group=topo.cp, attn_tp_size=topo.attn_tp.size)
        out[label]["nobody"] = (nobody.should_run, nobody.need_idle_batch)
    return out


def test_idle_batches_join_every_collective_and_do_not_change_results():
    results = run_on_ranks(_idle_on_rank, 4, timeout=90)
    config = BlockConfig(**CONFIG, attention_mode="data")
    w = full_weights(config)
    for label, (_shape, batch_tokens) in IDLE_CASES.items():
        busy = [r for r in results if batch_tokens[r[label]["cp_rank"]] > 0]
        idle = [r for r in results if batch_tokens[r[label]["cp_rank"]] == 0]
        assert len(busy) == 2 and len(idle) == 2
        for res in idle:
            got = res[label]
            assert got["info"].need_idle_batch
            assert got["result"][0].shape == (0, config.hidden_size)
            # Same collectives, on groups of the same sizes, in the same order.
            assert got["collectives"] == busy[0][label]["collectives"], label
        assert busy[0][label]["collectives"], "the block issued no collective at all?"
        for res in busy:
            got = res[label]
            assert not got["info"].need_idle_batch
            hidden, residual = sequence(batch_tokens[got["cp_rank"]], got["cp_rank"], torch.float32)
            want_normed, want_residual = reference_block(w, hidden, residual, config)
            _assert_close(got["result"][0], want_normed, torch.float32, f"{label} normed")
            _assert_close(got["result"][1], want_residual, torch.float32, f"{label} residual")
        for res in results:
            assert res[label]["nobody"] == (False, False)
