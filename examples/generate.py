"""Offline greedy generation over a prompt file, pipelined over CPU processes, written as JSONL.

Reads one prompt per line from ``examples/data/prompts.txt``, encodes it with a
byte-level tokenizer (token = UTF-8 byte, 256 = end of sequence), generates with
a KV cache through ``PPStrategy`` and writes one JSON object per prompt.

    python examples/generate.py                              # 2 stages, tiny random model
    python examples/generate.py --devices 1                  # one process, same output
    python examples/generate.py --devices 4 --attention-dp 2 # 2 stages x 2 attention-DP ranks, same output
    python examples/generate.py --model path/to/hf_dir       # a local Llama checkpoint (its vocabulary
                                                             # must cover 257 byte ids)

No download happens: without ``--model`` the model is a seeded random
Llama-shaped decoder, so the text is gibberish but identical for any ``--devices``.
With ``--attention-dp C`` each stage's ``C`` ranks run their own share of each
batch's prompts through attention and split the MLP between them (data-parallel
attention); the pipeline then has ``devices / C`` stages.
Lightning's launcher starts the other processes (it re-runs this script).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_pp import PPStrategy
from lightning_pp.integration import GenerationModule, PromptDataset, collate_prompts
from lightning_pp.models.llama import DecoderConfig, DecoderLM

EOS = 256


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    config = DecoderConfig(
        vocab_size=EOS + 1, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        eos_token_ids=(EOS,),
    )
    return DecoderLM(config)


def main() -> None:
    here = Path(__file__).parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(here / "data" / "prompts.txt"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "out" / "generations.jsonl"))
    parser.add_argument("--model", default=None, help="local Hugging Face Llama directory (default: tiny random)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--attention-dp", type=int, default=1, help="attention-DP ranks per stage (divides --devices)")
    args = parser.parse_args()
    if args.devices % args.attention_dp:
        parser.error(f"--attention-dp {args.attention_dp} does not divide --devices {args.devices}.")
    num_stages = args.devices // args.attention_dp

    prompts = [line.rstrip("\n") for line in open(args.prompts, encoding="utf-8") if line.strip()]
    lm = DecoderLM.from_pretrained(args.model) if args.model else tiny_model()
    model = GenerationModule(
        lm, max_new_tokens=args.max_new_tokens, eos_token_ids=(EOS,), num_microbatches=max(num_stages, 2),
        prefill_chunk=args.prefill_chunk,
    )
    loader = DataLoader(
        PromptDataset([encode(p) for p in prompts]), batch_size=args.batch_size, collate_fn=collate_prompts
    )
    strategy = (
        PPStrategy(pipeline_parallel_size=num_stages, attention_data_parallel_size=args.attention_dp)
        if args.devices > 1
        else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    batches = trainer.predict(model, loader)
    if trainer.global_rank != 0:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    completions = [seq for batch in batches for seq in batch]
    with open(out, "w", encoding="utf-8") as f:
        for prompt, ids in zip(prompts, completions):
            f.write(json.dumps({"prompt": prompt, "completion_ids": ids, "completion": decode(ids)}) + "\n")
    print(f"wrote {len(completions)} generations to {out}")


if __name__ == "__main__":
    main()
