"""The shipped tokenizer is what ``examples/train_tokenizer.py`` makes; ``examples/generate.py`` runs text to JSONL.

The tokenizer is retrained from the corpus into a temporary directory and must
equal the shipped files byte for byte (so the script, the corpus and the files
cannot drift apart). The generation example runs through Lightning's own launcher
on two pipeline stages, and its rows must equal one device's ``trainer.predict``
of the same checkpoint and options, decoded by the same tokenizer.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_tokenizer_is_retrained_exactly(tmp_path):
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    _load("train_tokenizer").train(EXAMPLES / "data" / "tiny_corpus.txt", tmp_path)
    shipped = EXAMPLES / "data" / "tokenizer"
    assert sorted(p.name for p in shipped.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    assert sum(p.stat().st_size for p in shipped.iterdir()) < 200_000
    tok = transformers.AutoTokenizer.from_pretrained(shipped)
    text = "Each stage keeps the keys and values of its own layers, ünïcödé too"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte level: any text round-trips
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template


@pytest.mark.slow
def test_generate_example_writes_text_rows_equal_to_one_device(tmp_path):
    transformers = pytest.importorskip("transformers")
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_pp.integration import GenerationModule, PromptDataset, collate_prompts, read_predictions

    from lit_models import trainer_kwargs

    ckpt = tmp_path / "ckpt"
    _load("generate").build_tiny_checkpoint(ckpt)
    out = tmp_path / "rows"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate.py"), "--model", str(ckpt), "--out", str(out), "--devices", "2",
         "--max-new-tokens", "8", "--stop", "st", "--batch-size", "4"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "prompts 6/6 | tokens " in result.stdout and "6 rows in" in result.stdout
    texts = [line.rstrip("\n") for line in open(EXAMPLES / "data" / "prompts.txt") if line.strip()]
    model = GenerationModule.from_pretrained(ckpt, max_new_tokens=8, stop=["st"], num_microbatches=2)
    assert isinstance(model.tokenizer, transformers.PreTrainedTokenizerBase)
    loader = DataLoader(PromptDataset(texts, model.tokenizer), batch_size=4, collate_fn=collate_prompts)
    batches = L.Trainer(accelerator="cpu", devices=1, **trainer_kwargs()).predict(model, loader)
    expected = [row for batch in batches for row in batch]
    assert [row["prediction"] for row in read_predictions(out)] == expected
    assert {row["finish_reason"] for row in expected} == {"stop", "length"}  # "st" ends the second prompt
