"""PPStrategy with tensor- and context-parallel stages, against one-device training.

The model's ``nn.Sequential`` holds :class:`TPTransformerBlock` s. It is built
unsharded (so one device and every rank start from the same weights), and
``configure_model`` swaps in blocks sharded over ``strategy.topology``'s groups.
What each case proves:

* tp=2 x pp=2 with gradient clipping: per-step losses equal one device, so the
  norm of the whole model counted every distinct tensor exactly once (a shard
  counted twice, or a copy counted per rank, changes the clipped step);
* cp=2 x pp=2: equal losses need the attention-side gradients summed over cp
  (each cp rank saw only its slice of the tokens);
* both: the strategy pre-initialised the fused all-reduce for the attention-TP
  and MLP-TP groups during setup, before the first training step;
* tp=2 x pp=2 ``trainer.predict`` equals one device.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pp.distributed.collectives import gather_tokens, split_token_counts
from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.models import BlockConfig, BlockGroups, TPTransformerBlock
from lightning_pp.parallel.layers import RMSNorm

from lit_models import trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow

CONFIG = BlockConfig(hidden_size=16, num_heads=4, num_kv_heads=2, ffn_hidden_size=32)
SEQ_LEN, NUM_BLOCKS = 6, 4
STEPS_BEGUN: list[int] = []  # per process: training steps started so far


def _own_rows(cp: ParallelGroup) -> slice:
    counts = split_token_counts(SEQ_LEN, cp.size)
    start = sum(counts[: cp.rank])
    return slice(start, start + counts[cp.rank])


class ScatterTokens(nn.Module):
    """First layer: keeps this cp rank's slice of each sequence; returns ``(normed, residual)``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = RMSNorm(CONFIG.hidden_size)
        self.cp = ParallelGroup.single("cp")

    def cp_partial_parameters(self) -> list[str]:
        # The norm sees only this rank's tokens: its gradient is a partial sum over cp.
        return ["norm.weight"] if self.cp.size > 1 else []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[:, _own_rows(self.cp)]
        return self.norm(x), x


class BlockLayer(nn.Module):
    """One block over each sequence of the microbatch (a block takes one sequence's rows)."""

    def __init__(self, block: TPTransformerBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = x
        counts = split_token_counts(SEQ_LEN, self.block.groups.cp.size)
        outs = [self.block(h, r, token_counts=counts) for h, r in zip(hidden, residual)]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


class GatherTokens(nn.Module):
    """Last layer: the whole sequence again on every cp rank (each keeps its own rows' gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.cp = ParallelGroup.single("cp")

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        normed, _ = x
        counts = split_token_counts(SEQ_LEN, self.cp.size)
        return torch.stack([gather_tokens(h, self.cp, counts, grad="slice") for h in normed])


class ParallelBlocksLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        single = BlockGroups.single()
        self.layers = nn.Sequential(
            ScatterTokens(),
            *[BlockLayer(TPTransformerBlock(CONFIG, single)) for _ in range(NUM_BLOCKS)],
            GatherTokens(),
        )

    def configure_model(self) -> None:
        topology = getattr(self.trainer.strategy, "topology", None)
        # Lightning calls this hook again for predict, on the already split and sharded model.
        if topology is None or topology.cp.size * topology.tp.size == 1 or getattr(self, "sharded", False):
            return
        self.sharded = True
        groups = BlockGroups.from_topology(topology)
        for layer in self.layers:
            if isinstance(layer, BlockLayer):
                sharded = TPTransformerBlock(CONFIG, groups)
                sharded.load_unsharded_(layer.block)
                layer.block = sharded
            else:
                layer.cp = topology.cp

    def training_step(self, batch, batch_idx):
        STEPS_BEGUN.append(batch_idx)
        x, y = batch
        loss = F.mse_loss(self.layers(x), y)
        self.log("train_loss", loss)
        return loss

    def predict_step(self, batch, batch_idx):
        return self.layers(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, SEQ_LEN, CONFIG.hidden_size, generator=g)
    return TensorDataset(x, torch.tanh(x.flip(1)))


def _run(devices: int, strategy, clip) -> dict:
    L.seed_everything(0)
    model = ParallelBlocksLM()
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        callbacks=[losses],
        **trainer_kwargs(max_epochs=2, gradient_clip_val=clip, precision="32-true"),
    )
    trainer.fit(model, DataLoader(_data(), batch_size=4))
    preds = trainer.predict(model, DataLoader(_data(), batch_size=4))
    return {"losses": losses.losses, "preds": preds, "fusion": getattr(trainer.strategy, "allreduce_fusion", None)}


def _parallel_rank(rank: int, world_size: int, cfg: dict) -> dict:
    from lightning_pp import PPStrategy
    from lightning_pp.parallel import model_parallel

    calls = []
    real = model_parallel.pre_initialize_allreduce_fusion

    def recording(groups, *, max_num_tokens, hidden_size, dtype):
        began = bool(STEPS_BEGUN)
        calls.append(([g.name for g in groups], [g.ranks for g in groups], max_num_tokens, hidden_size, dtype, began))
        return real(groups, max_num_tokens=max_num_tokens, hidden_size=hidden_size, dtype=dtype)

    model_parallel.pre_initialize_allreduce_fusion = recording
    strategy = PPStrategy(
        pipeline_parallel_size=2,
        num_microbatches=2,
        balance=[3, 3],
        tensor_parallel_size=cfg.get("tp", 1),
        context_parallel_size=cfg.get("cp", 1),
        fused_allreduce_max_tokens=64,
    )
    out = _run(world_size, strategy, cfg.get("clip"))
    out["calls"] = calls
    out["coords"] = strategy.topology.coords
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return {clip: _run(1, "auto", clip) for clip in (None, 0.05)}


@pytest.mark.parametrize("cfg", [dict(tp=2, clip=0.05), dict(cp=2, clip=None)], ids=["tp2xpp2-clip", "cp2xpp2"])
def test_model_parallel_stages_match_one_device(cfg, reference):
    ref = reference[cfg["clip"]]
    results = run_on_ranks(_parallel_rank, 4, cfg, init_process_group=False, timeout=300)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["losses"], ref["losses"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
    # Rank 0 (first stage, cp/tp rank 0) returns every prediction, as one device does.
    torch.testing.assert_close(torch.cat(results[0]["preds"]), torch.cat(ref["preds"]), rtol=1e-5, atol=1e-6)
    # The fused all-reduce was set up for both groups of the stage, before any step ran.
    for result in results:
        expected = [["attn_tp"], ["mlp_tp"]] if cfg.get("tp") else [["mlp_tp"]]
        calls = result["calls"]
        assert [c[0] for c in calls] == expected * 2, calls  # once in fit's setup, once in predict's
        assert all(c[2] == 64 and c[3] == CONFIG.hidden_size and c[4] == torch.float32 for c in calls)
        assert not any(c[5] for c in calls[: len(expected)]), "pre-initialisation must come before the first step"
        assert set(result["fusion"].values()) == {False}  # no kernel on the CPU: the exact fallback


def _norm_share_on_rank(rank: int, world_size: int) -> dict:
    from lightning_pp.distributed.topology import MeshShape, build_topology
    from lightning_pp.parallel.model_parallel import counts_once

    topology = build_topology(MeshShape(cp=2, tp=2), device_type="cpu")
    torch.manual_seed(0)
    full = TPTransformerBlock(CONFIG, BlockGroups.single())
    sharded = TPTransformerBlock(CONFIG, BlockGroups.from_topology(topology))
    sharded.load_unsharded_(full)
    counted = counts_once(sharded, topology, replicated_over_pipeline=lambda p: False)
    share = sum(float(p.detach().double().pow(2).sum()) for p in sharded.parameters() if counted(p))
    names = sorted(n for n, p in sharded.named_parameters() if counted(p))
    return {"share": share, "names": names, "full": float(sum(p.double().pow(2).sum() for p in full.parameters()))}


def test_each_distinct_tensor_counts_once_in_the_norm():
    """cp=2 x tp=2: attention shards are copied over cp, MLP shards are unique, norms are on every rank."""
    results = run_on_ranks(_norm_share_on_rank, 4)
    # The ranks' shares add up to the unsharded block's squared norm: nothing missed, nothing twice.
    assert sum(r["share"] for r in results) == pytest.approx(results[0]["full"], rel=1e-9)
    attn = [n for n in results[0]["names"] if n.startswith("attn.")]
    assert attn and all(n.startswith("attn.") or n.startswith("mlp.") for n in results[1]["names"])  # tp rank 1, cp 0
    assert not any(n.startswith(("attn.", "post_attention_norm", "output_norm")) for n in results[2]["names"])  # cp 1
    assert [n for n in results[3]["names"] if not n.startswith("mlp.")] == []
    assert "output_norm.weight" in results[0]["names"] and "output_norm.weight" not in results[1]["names"]


@pytest.mark.parametrize(
    "kwargs, world, match",
    [
        (dict(tensor_parallel_size=3), 4, "tensor_parallel_size 3 = 3 does not divide the 4 processes"),
        (dict(pipeline_parallel_size=3, tensor_parallel_size=2), 4, r"pipeline_parallel_size=3 x 2 \(cp x tp\)"),
        (dict(context_parallel_size=2, attention_data_parallel_size=2), 4, "set one of them"),
        (dict(tensor_parallel_size=0), 4, "tensor_parallel_size must be at least 1"),
        (dict(tensor_parallel_size=2, balance="time", balance_sample=torch.zeros(1)), 4, "balance='time'"),
    ],
)
def test_bad_model_parallel_layouts_say_what_to_change(kwargs, world, match):
    from lightning_pp import PPStrategy

    with pytest.raises(ValueError, match=match):
        PPStrategy(**kwargs)._check_layout(world)


def test_mesh_shape_from_sizes():
    from lightning_pp import PPStrategy
    from lightning_pp.distributed.topology import MeshShape

    assert PPStrategy(tensor_parallel_size=2)._check_layout(8) == MeshShape(pp=4, dp=1, cp=1, tp=2)
    assert PPStrategy(2, tensor_parallel_size=2)._check_layout(8) == MeshShape(pp=2, dp=2, cp=1, tp=2)
    strategy = PPStrategy(2, attention_data_parallel_size=2)
    assert strategy._check_layout(4) == MeshShape(pp=2, dp=1, cp=2, tp=1) and strategy.attention_mode == "data"


def test_checkpoints_of_sharded_stages_are_refused_not_silently_wrong(tmp_path):
    from lightning_pp import PPStrategy

    strategy = PPStrategy(tensor_parallel_size=2)
    with pytest.raises(NotImplementedError, match="tp=2, cp=1"):
        strategy.save_checkpoint({}, tmp_path / "ckpt")
    with pytest.raises(NotImplementedError, match="not supported yet"):
        strategy.load_checkpoint(tmp_path / "ckpt")
