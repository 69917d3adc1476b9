"""Offline batch generation, text in and JSONL out, pipelined over CPU processes.

Reads one prompt per line from ``examples/data/prompts.txt``, encodes it with the
checkpoint directory's own tokenizer, generates through ``PPStrategy`` with a KV
cache and writes one JSON row per prompt as batches complete
(``{"index": i, "prediction": {"text": ..., "token_ids": [...], "finish_reason": ...}}``)::

    python examples/generate.py                               # 2 stages, tiny random model
    python examples/generate.py --devices 1                   # one process, same rows
    python examples/generate.py --devices 4 --attention-dp 2  # 2 stages x 2 attention-DP ranks, same rows
    python examples/generate.py --model path/to/checkpoint    # a local Llama/Mistral/Qwen2/Qwen3 directory
    python examples/generate.py --temperature 0.8 --top-p 0.9 --stop "." --chat

No download happens. Without ``--model`` the checkpoint is a seeded random
Llama-shaped model built once into ``out/tiny_llama`` beside a copy of the BPE
tokenizer shipped in ``examples/data/tokenizer`` (``examples/train_tokenizer.py``
re-creates it), so the text is gibberish but identical for any ``--devices``.
A killed run resumes where it stopped: rows already in ``--out`` are not generated
again (delete the directory to start over). Lightning's launcher starts the other
processes (it re-runs this script).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from lightning_pp import PPStrategy
from lightning_pp.integration import (
    GenerationModule,
    GenerationProgress,
    PromptDataset,
    StreamingPredictionWriter,
    collate_prompts,
    read_predictions,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build_tiny_checkpoint(path: Path, seed: int = 0) -> None:
    """A random 4-layer Llama with the shipped tokenizer's vocabulary, saved with it as a checkpoint directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(HERE / "data" / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, path)  # whole or not at all: the other ranks read it after launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(HERE / "data" / "prompts.txt"))
    parser.add_argument("--out", default=str(ROOT / "out" / "generations"), help="directory of the JSONL parts")
    parser.add_argument("--model", default=None, help="local checkpoint directory (default: a tiny random Llama)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=None, help="sample (default: greedy)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--attention-dp", type=int, default=1, help="attention-DP ranks per stage (divides --devices)")
    args = parser.parse_args()
    if args.devices % args.attention_dp:
        parser.error(f"--attention-dp {args.attention_dp} does not divide --devices {args.devices}.")
    num_stages = args.devices // args.attention_dp

    ckpt_dir = Path(args.model) if args.model else ROOT / "out" / "tiny_llama"
    if not args.model and not ckpt_dir.exists():
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_checkpoint(ckpt_dir)

    texts = [line.rstrip("\n") for line in open(args.prompts, encoding="utf-8") if line.strip()]
    model = GenerationModule.from_pretrained(
        ckpt_dir, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, stop=args.stop, num_microbatches=max(num_stages, 2), prefill_chunk=args.prefill_chunk,
    )
    writer = StreamingPredictionWriter(args.out)
    dataset = writer.pending(PromptDataset(texts, model.tokenizer, chat=args.chat))  # skips rows already written
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_prompts)
    strategy = (
        PPStrategy(pipeline_parallel_size=num_stages, attention_data_parallel_size=args.attention_dp)
        if args.devices > 1
        else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[writer, GenerationProgress()],
    )
    trainer.predict(model, loader, return_predictions=False)
    if trainer.global_rank == 0:
        rows = read_predictions(args.out)
        for row in rows[:3]:
            print(f"{texts[row['index']]!r} -> {row['prediction']['text']!r} ({row['prediction']['finish_reason']})")
        print(f"{len(rows)} rows in {args.out}")


if __name__ == "__main__":
    main()
