"""Offline batch inference that survives being killed: pipelined predict, streamed to JSONL.

A small model (embedding, residual blocks, norm, head in one ``nn.Sequential``)
predicts the next token of every row of a synthetic dataset over 2 pipeline
stages on the CPU. ``StreamingPredictionWriter`` appends each batch's rows to
``<out>/part-*.jsonl`` as the batch completes. Kill the job (Ctrl-C, ``kill -9``)
and run the same command again: it predicts only the rows not written yet, and
the directory ends up with every row exactly once.

    python examples/stream_predict.py                    # writes out/stream_predictions/
    python examples/stream_predict.py --slow 0.5         # 0.5 s per batch: time to kill it
    python examples/stream_predict.py --devices 4        # 4 stages

Lightning's own launcher starts the other processes (it re-runs this script).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pp import PPStrategy
from lightning_pp.integration import StreamingPredictionWriter, read_predictions

HERE = Path(__file__).resolve().parent
VOCAB, DIM, SEQ = 50, 32, 12


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class TokenModel(L.LightningModule):
    def __init__(self, slow: float = 0.0) -> None:
        super().__init__()
        self.slow = slow
        self.layers = nn.Sequential(
            nn.Embedding(VOCAB, DIM), *[Block(DIM) for _ in range(4)], nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)
        )

    def predict_step(self, batch, batch_idx):
        (tokens,) = batch
        time.sleep(self.slow)  # --slow: pretend the model is big, so there is time to kill the job
        probs = self.layers(tokens)[:, -1].softmax(-1)
        top = probs.max(-1)
        return {"token": top.indices, "prob": top.values}


def make_dataset(num_rows: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, VOCAB, (num_rows, SEQ), generator=g))


def make_model(slow: float = 0.0) -> TokenModel:
    torch.manual_seed(0)  # the same weights on every rank and in every run
    return TokenModel(slow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--slow", type=float, default=0.0, help="seconds of extra work per batch")
    parser.add_argument("--out", default=str(HERE.parent / "out" / "stream_predictions"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    writer = StreamingPredictionWriter(args.out)
    dataset = writer.pending(make_dataset(args.rows))  # every rank, before predict
    if len(dataset) == 0:
        print(f"[stream_predict] nothing to do: all {args.rows} rows are in {args.out}")
        return
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=PPStrategy(pipeline_parallel_size=args.devices, num_microbatches=4),
        callbacks=[writer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(make_model(args.slow), DataLoader(dataset, batch_size=args.batch_size), return_predictions=False)
    if trainer.is_global_zero:
        rows = read_predictions(args.out)
        print(f"[stream_predict] predicted {len(dataset)} rows this run; {len(rows)}/{args.rows} rows in {args.out}")


if __name__ == "__main__":
    main()
