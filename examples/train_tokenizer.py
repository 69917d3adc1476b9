"""Trains the small byte-level BPE tokenizer shipped in ``examples/data/tokenizer``, deterministically.

    python examples/train_tokenizer.py                       # re-creates examples/data/tokenizer
    python examples/train_tokenizer.py --out /tmp/tok        # somewhere else

The tokenizer is trained with Hugging Face ``tokenizers`` on ``examples/data/tiny_corpus.txt``
(byte-level, so any text encodes, no unknown token) and saved as ``tokenizer.json`` +
``tokenizer_config.json``, which ``AutoTokenizer.from_pretrained(directory)`` loads without
any download. ``<|endoftext|>`` ends a sequence; a minimal chat template wraps each message
as ``<|role|>\\ncontent\\n`` so ``apply_chat_template`` works (``examples/generate.py --chat``).
The same corpus and settings always give the same files (``tests/test_examples.py`` checks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 384
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train(corpus: Path, out: Path) -> None:
    """Trains on ``corpus`` and writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no text is unknown
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(HERE / "data" / "tiny_corpus.txt"))
    parser.add_argument("--out", default=str(HERE / "data" / "tokenizer"))
    args = parser.parse_args()
    train(Path(args.corpus), Path(args.out))
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json")


if __name__ == "__main__":
    main()
