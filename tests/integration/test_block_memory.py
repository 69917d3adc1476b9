"""A model bigger than one process: built on the meta device, each rank materialises or reads only its stage.

ONE two-rank job (CI time) whose ranks, one after the other:

1. build a tied Qwen3 under ``trainer.init_module(empty_init=True)`` (the meta device under
   ``PPStrategy``), ``load_hf_checkpoint`` a sharded local checkpoint directory, train
   one epoch and predict: per-step losses and logits must equal one device running the
   same module from ``from_pretrained``;
2. build it again without a checkpoint: each rank initialises only its stage (the
   model's own ``_init_weights``), the two copies of the tied weight start equal, and
   it trains.

Each rank must hold only its own modules: the embedding on the first stage only, the
final norm and head on the last only, and about half the parameters.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_models import LabelledIds, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow

VOCAB, SEQ = 48, 8


def _config():
    import transformers

    return transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True)


def Ids(num_items: int = 16, seed: int = 0) -> LabelledIds:
    return LabelledIds(VOCAB, SEQ, num_items, seed)


class LM(L.LightningModule):
    def __init__(self, directory=None) -> None:
        super().__init__()
        import transformers

        if directory is None:
            self.model = transformers.Qwen3ForCausalLM(_config())
        else:
            self.model = transformers.Qwen3ForCausalLM.from_pretrained(directory)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def predict_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"]).logits

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit_predict(trainer, model, record):
    trainer.fit(model, DataLoader(Ids(16), batch_size=4))
    preds = trainer.predict(model, DataLoader(Ids(6, seed=1), batch_size=4))
    return {
        "losses": record.losses,
        "preds": preds,
        "start": record.start,
        "names": sorted(model.state_dict()),
        "numel": sum(p.numel() for p in model.parameters()),
        "meta": any(t.is_meta for t in model.parameters()),
    }


def _pp_rank(rank: int, world_size: int, directory: str) -> dict:
    from lightning_pp import PPStrategy
    from lightning_pp.checkpoint import load_hf_checkpoint

    results = {}
    for loaded in (True, False):
        L.seed_everything(0)
        record = Record()
        trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(pipeline_parallel_size=2),
                            callbacks=[record], **trainer_kwargs(max_epochs=1))
        with trainer.init_module(empty_init=True):
            model = LM()
        results["built_on_meta" if loaded else "_"] = all(p.is_meta for p in model.parameters())
        if loaded:
            assert load_hf_checkpoint(model.model, directory) is False  # read per stage in setup
        results[loaded] = _fit_predict(trainer, model, record)
    return results


@pytest.mark.parametrize("world", [2, 4], ids=["pp2", "dp2xpp2"])
def test_meta_init_and_per_stage_loading_equal_one_device(tmp_path, world):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    saved = transformers.Qwen3ForCausalLM(_config())
    saved.save_pretrained(tmp_path, max_shard_size="8KB")
    total = sum(p.numel() for p in saved.parameters())
    embed = saved.model.embed_tokens.weight.numel()

    L.seed_everything(0)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[record], **trainer_kwargs(max_epochs=1))
    ref = _fit_predict(trainer, LM(str(tmp_path)), record)

    ranks = run_on_ranks(_pp_rank, world, str(tmp_path), init_process_group=False, timeout=300)
    assert all(r["built_on_meta"] for r in ranks)
    for loaded in (True, False):
        # Replicas of a stage hold the same names and start from the same values (initialised
        # on one replica and broadcast, or read by each).
        by_stage: dict[tuple, list[dict]] = {}
        for r in ranks:
            by_stage.setdefault(tuple(r[loaded]["names"]), []).append(r[loaded])
        assert len(by_stage) == 2 and all(len(replicas) == world // 2 for replicas in by_stage.values())
        for replicas in by_stage.values():
            for other in replicas[1:]:
                for name, value in replicas[0]["start"].items():
                    torch.testing.assert_close(other["start"][name], value, rtol=0, atol=0)
        first, last = sorted((replicas[0] for replicas in by_stage.values()),
                             key=lambda r: "model.model.embed_tokens.weight" not in r["names"])
        assert not first["meta"] and not last["meta"]
        # Each rank holds its own modules only: the embedding on the first, norm and (tied) head on the last.
        assert "model.model.embed_tokens.weight" in first["names"] and "model.lm_head.weight" not in first["names"]
        assert "model.lm_head.weight" in last["names"] and "model.model.embed_tokens.weight" not in last["names"]
        assert not any(n.startswith("model.model.norm.") for n in first["names"])
        assert not {n for n in first["names"] if "layers." in n} & set(last["names"])
        assert sorted(set(first["names"]) | set(last["names"])) == ref["names"]
        assert first["numel"] + last["numel"] == total + embed  # the tied weight: one copy on each
        assert max(first["numel"], last["numel"]) < 0.65 * total
        # The tied copies start equal (read, or initialised on the first stage and sent).
        head, embed_copy = last["start"]["model.lm_head.weight"], first["start"]["model.model.embed_tokens.weight"]
        torch.testing.assert_close(head, embed_copy, rtol=0, atol=0)
        assert all(torch.isfinite(torch.tensor(r[loaded]["losses"])).all() for r in ranks)
    for rank in ranks:
        torch.testing.assert_close(rank[True]["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ranks[0][True]["preds"], ref["preds"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # Without a checkpoint the model's own init ran on each stage: norms at one, weights with the config's std.
    last = next(r[False]["start"] for r in ranks if "model.lm_head.weight" in r[False]["names"])
    assert torch.equal(last["model.model.norm.weight"], torch.ones(16))
    std = float(last["model.model.layers.3.mlp.up_proj.weight"].std())
    assert 0.01 < std < 0.03, std
