"""A Hugging Face causal LM fine-tuned on padded, prompt-masked rows trains as on one device.

Its loss is a mean over the label tokens other than -100. With
``PPStrategy(microbatch_weight="label_tokens")`` each microbatch counts by those tokens,
so per-step losses, the logged validation loss and the weights equal one device's, also
when a microbatch holds no such token at all (a fully masked row). By rows (the default)
that microbatch's loss is 0/0 and the run stops at it with an error that names the option.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lit_models import trainer_kwargs
from multirank import run_on_ranks

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


class PaddedSFT(Dataset):
    """Rows of 3..12 real tokens padded to 12; the first rows' prompts are masked, row 5 entirely."""

    def __init__(self, num_items: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 48, (num_items, 12), generator=g)
        self.lengths = torch.randint(3, 13, (num_items,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        ids, n = self.ids[i].clone(), int(self.lengths[i])
        labels = ids.clone()
        labels[n:] = -100
        ids[n:] = 0
        labels[: 2 if i < 4 else 0] = -100  # a masked prompt
        if i == 5:
            labels[:] = -100  # nothing to learn from: its microbatch has no token to average over
        return {"input_ids": ids, "labels": labels, "attention_mask": (torch.arange(12) < n).long()}


class SFT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32))

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(devices: int, strategy) -> dict:
    L.seed_everything(0)
    model, losses = SFT(), Losses()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=[losses],
                        **trainer_kwargs(max_epochs=2))
    trainer.fit(model, DataLoader(PaddedSFT(), batch_size=4), DataLoader(PaddedSFT(6, seed=1), batch_size=3))
    return {
        "losses": losses.losses,
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def _pp_rank(rank: int, world_size: int) -> dict:
    from lightning_pp import PPStrategy

    # Four microbatches of one row: batch 1's second microbatch is row 5, with no label token.
    results: dict = {}
    for schedule in ("1F1B", "ZBH1"):
        strategy = PPStrategy(num_microbatches=4, schedule=schedule, microbatch_weight="label_tokens")
        results[schedule] = _fit(world_size, strategy)
    try:  # by rows, that microbatch's loss (0/0) makes the batch's NaN, and every rank stops there
        _fit(world_size, PPStrategy(num_microbatches=4))
    except FloatingPointError as error:
        results["rows"] = str(error)
    return results


def test_label_token_weights_train_a_padded_causal_lm_as_one_device():
    ref = _fit(1, "auto")
    results = run_on_ranks(_pp_rank, 2, init_process_group=False, timeout=300)
    for schedule in ("1F1B", "ZBH1"):
        got = [result[schedule] for result in results]
        for mine in got:
            torch.testing.assert_close(mine["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[0]["val_loss"], ref["val_loss"], rtol=1e-5, atol=1e-6)
        merged = {**got[0]["state"], **got[1]["state"]}
        assert sorted(merged) == sorted(ref["state"])
        for name, value in ref["state"].items():
            torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for result in results:
        assert "microbatch_weight" in result["rows"], result["rows"]
