"""Models pipelined by their block list: a user's ModuleList loop and Hugging Face causal LMs, unchanged.

Each LightningModule is the one a user writes for one device; ``PPStrategy()`` with no
option finds the blocks (a transformers ``base_model_pp_plan``, else the largest
list of same-class blocks), every stage runs the step with only its blocks, and the
per-step losses, the weights and the predictions equal one device's.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lit_models import LabelledIds, trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow

VOCAB, SEQ = 48, 8


def Ids(num_items: int = 20, seed: int = 0) -> LabelledIds:
    return LabelledIds(VOCAB, SEQ, num_items, seed)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x, gate):
        return x + torch.tanh(self.linear(self.norm(x))) * gate


class LoopLM(L.LightningModule):
    """A user's model: blocks in a ModuleList called in a loop with a value derived from the batch."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(4))
        self.head = nn.Linear(dim, VOCAB)

    def logits(self, ids):
        h = self.embed(ids)
        # Derived from the batch, per row: recomputed on every stage (the embedding lives on the first only).
        gate = torch.sigmoid(ids.float().mean(dim=1)[:, None, None] / VOCAB)
        for block in self.blocks:
            h = block(h, gate)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        logits = self.logits(batch["input_ids"])
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.training_step(batch, batch_idx))

    def predict_step(self, batch, batch_idx):
        return self.logits(batch["input_ids"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class HFLM(L.LightningModule):
    """The issue's module: a Hugging Face causal LM, unchanged."""

    def __init__(self, family: str) -> None:
        super().__init__()
        import transformers

        self.model = {"llama": _llama, "gpt2": _gpt2, "qwen3": _qwen3}[family](transformers)

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)

    def predict_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"]).logits

    def configure_optimizers(self):
        # SGD: Adam's normalised steps turn float-rounding differences of near-zero
        # gradients into differences of a whole step, which would hide real ones.
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _llama(transformers):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))


def _gpt2(transformers):  # ties lm_head.weight to transformer.wte.weight
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=4, n_head=2, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _qwen3(transformers):  # q/k norms; tied embeddings
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True))


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _run(make, devices: int, strategy) -> dict:
    L.seed_everything(0)
    model = make()
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=[losses],
                        **trainer_kwargs(max_epochs=2))
    trainer.fit(model, DataLoader(Ids(20), batch_size=4))
    held_out = DataLoader(Ids(6, seed=2), batch_size=4)
    metrics = {**trainer.validate(model, held_out, verbose=False)[0], **trainer.test(model, held_out, verbose=False)[0]}
    preds = trainer.predict(model, DataLoader(Ids(6, seed=1), batch_size=4))
    return {
        "losses": losses.losses,
        "metrics": metrics,
        "preds": preds,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "rank": trainer.global_rank,
    }


def _make(kind: str):
    return LoopLM if kind == "loop" else (lambda: HFLM(kind))


def _pp_rank(rank: int, world_size: int, kind: str, pp: int) -> dict:
    from lightning_pp import PPStrategy

    return _run(_make(kind), world_size, PPStrategy(pipeline_parallel_size=pp))


@pytest.mark.parametrize(
    "kind, world, pp",
    [("loop", 2, 2), ("llama", 2, 2), ("gpt2", 2, 2), ("qwen3", 2, 2),
     ("llama", 4, 4), ("gpt2", 4, 4), ("qwen3", 4, 4),
     ("llama", 4, 2), ("gpt2", 4, 2), ("qwen3", 4, 2)],
    ids=["user-loop-pp2", "llama-pp2", "gpt2-tied-pp2", "qwen3-tied-pp2",
         "llama-pp4", "gpt2-tied-pp4", "qwen3-tied-pp4",
         "llama-dp2xpp2", "gpt2-tied-dp2xpp2", "qwen3-tied-dp2xpp2"],
)
def test_block_lists_train_and_predict_as_one_device(kind, world, pp):
    if kind != "loop":
        pytest.importorskip("transformers")
    ref = _run(_make(kind), 1, "auto")
    results = run_on_ranks(_pp_rank, world, kind, pp, init_process_group=False, timeout=300)
    for result in results:
        torch.testing.assert_close(result["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    # validate and test after fit: the logged losses reach rank 0 as on one device.
    assert sorted(results[0]["metrics"]) == sorted(ref["metrics"]) and len(ref["metrics"]) >= 2
    for key, value in ref["metrics"].items():
        torch.testing.assert_close(torch.tensor(results[0]["metrics"][key]), torch.tensor(value), rtol=1e-5, atol=1e-6)
    assert len(results[0]["preds"]) == len(ref["preds"])
    for mine, theirs in zip(results[0]["preds"], ref["preds"]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # Each rank holds its own blocks and the modules outside the list that its stage runs (a tied
    # weight on each of its holders), under the one-device names; together they are the whole model.
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for name, value in result["state"].items():
            if name in merged:
                torch.testing.assert_close(value, merged[name], msg=lambda m, name=name: f"{name} differs: {m}")
            merged[name] = value
    assert sorted(merged) == sorted(ref["state"])
    for name, value in ref["state"].items():
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
