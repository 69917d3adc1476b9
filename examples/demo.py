"""The lightning_pp demo: pipelined training, then pipelined batch inference, on the CPU.

A small language model (embedding, transformer-style blocks, norm, head in one
``nn.Sequential``) is trained on a small text shipped in ``examples/data``, cut into
tokens by the byte-level BPE tokenizer trained on that text
(``examples/data/tokenizer``, re-created by ``examples/train_tokenizer.py``), with
``PPStrategy`` on 2 processes (2 pipeline stages, gloo); then it predicts the next
token for held-out windows; predictions go to ``out/demo_predictions.jsonl``.
``trainer.predict`` streams: the first stage starts the next batch's microbatches while
the last stage finishes the current one, and each batch's output comes back to rank 0.
For offline jobs that must survive a kill, see ``examples/stream_predict.py``.

    python examples/demo.py                 # 2 stages, 1F1B, 2 epochs
    python examples/demo.py --devices 4 --schedule gpipe

Lightning's own launcher starts the other processes (it re-runs this script).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pp import PPStrategy

HERE = Path(__file__).resolve().parent
WINDOW = 16


class Block(nn.Module):
    """A residual MLP block (attention is left out to keep the demo small and fast)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class TinyLM(L.LightningModule):
    def __init__(self, vocab_size: int, dim: int = 64, num_blocks: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Embedding(vocab_size, dim), *[Block(dim) for _ in range(num_blocks)], nn.LayerNorm(dim),
            nn.Linear(dim, vocab_size),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.layers(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layers(x)
        self.log("val_loss", F.cross_entropy(logits.flatten(0, 1), y.flatten()), prog_bar=True)
        # Accuracy over every position of each window (the printed next-token accuracy
        # looks at the last position only, where the model has the most context).
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self.layers(x)[:, -1].argmax(-1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def load_windows(path: Path, tokenizer: Tokenizer):
    ids = torch.tensor(tokenizer.encode(path.read_text()).ids)
    starts = torch.arange(0, len(ids) - WINDOW - 1)
    x = torch.stack([ids[s : s + WINDOW] for s in starts])
    y = torch.stack([ids[s + 1 : s + WINDOW + 1] for s in starts])
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default=str(HERE.parent / "out" / "demo_predictions.jsonl"))
    parser.add_argument("--trace", default=None, help="folder for a trace (trace.json, timeline.png) of steps 2-3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)

    tokenizer = Tokenizer.from_file(str(HERE / "data" / "tokenizer" / "tokenizer.json"))
    x, y = load_windows(HERE / "data" / "tiny_corpus.txt", tokenizer)
    held_out = len(x) // 8
    train = DataLoader(TensorDataset(x[held_out:], y[held_out:]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[:held_out], y[:held_out]), batch_size=16)

    model = TinyLM(tokenizer.get_vocab_size())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=PPStrategy(
            pipeline_parallel_size=args.devices, num_microbatches=4, schedule=args.schedule, trace=args.trace
        ),
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=5,
    )
    trainer.fit(model, train, val)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}

    predictions = trainer.predict(model, val)
    if trainer.is_global_zero:
        predicted = torch.cat(predictions)
        truth = y[:held_out, -1]
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            for i, (p, t) in enumerate(zip(predicted.tolist(), truth.tolist())):
                row = {"row": i, "predicted": tokenizer.decode([p]), "expected": tokenizer.decode([t])}
                f.write(json.dumps(row) + "\n")
        accuracy = (predicted == truth).float().mean().item()
        print(f"[demo] trained {args.epochs} epochs on {args.devices} pipeline stages: {metrics}")
        print(
            f"[demo] wrote {len(predicted)} predictions to {args.out}: the token after each held-out window, "
            f"accuracy {accuracy:.2f} (val_acc above averages every position of those windows)"
        )


if __name__ == "__main__":
    main()
