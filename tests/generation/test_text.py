"""Text in, text out: a local tokenizer, chat templates, stop strings, finish reasons and JSONL rows.

The checkpoint is a tiny random Llama whose vocabulary is the shipped BPE tokenizer's
(``examples/data/tokenizer``), saved beside it as a user's checkpoint directory would
be. References: transformers' greedy ``generate`` on the tokenizer's own encoding, the
tokenizer's own ``decode`` and ``apply_chat_template``, and for stop strings the
shortest greedy prefix whose text contains one, found by decoding prefixes here.
The two-stage run shares the families' two-rank job (``test_families.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_pp.integration.generation_module import GenerationModule, PromptDataset, collate_prompts
from lightning_pp.integration.writer import StreamingPredictionWriter, read_predictions

from lit_models import trainer_kwargs

transformers = pytest.importorskip("transformers")

from test_generation import _hf_greedy  # noqa: E402 - after the importorskip

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer"
TEXTS = [
    "The pipeline has four stages and",
    "Once upon a time, a small model",
    "Hello",
    "Each stage keeps the keys and values of its own layers,",
    "Tokens travel from the last stage back to the first around the ring, so",
]
NEW = 10


def save_text_checkpoint(path, seed=0):
    """A tiny random Llama with the shipped tokenizer's vocabulary, saved with that tokenizer into ``path``."""
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def stop_cases(tok, references):
    """Per prompt, a stop string its greedy text contains (or one it never reaches) and the expected record."""
    stops, expected = [], []
    for i, ids in enumerate(references):
        text = tok.decode(ids, skip_special_tokens=True)
        if i % 2 == 0 and len(text) > 6:
            stop = text[3:6]  # mid-continuation, likely mid-token
            cut = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n], skip_special_tokens=True))
            expected.append({"text": text[: text.find(stop)], "token_ids": ids[:cut], "finish_reason": "stop"})
        else:
            stop = "\u2603never"
            expected.append({"text": text, "token_ids": ids, "finish_reason": "length"})
        stops.append([stop])
    return stops, expected


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_llama")
    hf, tok = save_text_checkpoint(path)
    references = [_hf_greedy(hf, tok(t)["input_ids"], NEW) for t in TEXTS]
    return str(path), hf, tok, references


def _predict(model, dataset, callbacks=(), batch_size=2):
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=list(callbacks), **trainer_kwargs())
    out = trainer.predict(model, loader)
    return [row for batch in out for row in batch]


def test_text_in_text_out_equals_transformers(text_checkpoint):
    path, _, tok, references = text_checkpoint
    model = GenerationModule.from_pretrained(path, max_new_tokens=NEW)
    assert model.tokenizer is not None  # the directory's own
    got = _predict(model, PromptDataset(TEXTS, model.tokenizer))
    assert [row["token_ids"] for row in got] == references
    assert [row["text"] for row in got] == [tok.decode(ids, skip_special_tokens=True) for ids in references]
    assert {row["finish_reason"] for row in got} == {"length"}
    # EOS: a token the second prompt produces fourth ends it there; kept in the ids, not in the text.
    eos = references[1][3]
    got = _predict(GenerationModule.from_pretrained(path, max_new_tokens=NEW, eos_token_ids=[eos]),
                   PromptDataset(TEXTS, path))  # the tokenizer from a directory, taken over by the module
    assert got[1]["token_ids"] == references[1][: references[1].index(eos) + 1]
    assert got[1]["finish_reason"] == "eos" and got[1]["text"] == tok.decode(got[1]["token_ids"][:-1])


def test_stop_strings_cut_the_text_and_end_the_sequence(text_checkpoint):
    path, _, tok, references = text_checkpoint
    stops, expected = stop_cases(tok, references)
    assert any(e["finish_reason"] == "stop" and len(e["token_ids"]) < NEW for e in expected)
    model = GenerationModule.from_pretrained(path, max_new_tokens=NEW, stop="\u2603default")
    assert _predict(model, PromptDataset(TEXTS, model.tokenizer, stop=stops)) == expected
    # The module's default applies where a prompt sets none; a prompt's own replaces it.
    first_stop = stops[0][0]
    model = GenerationModule.from_pretrained(path, max_new_tokens=NEW, stop=[first_stop])
    got = _predict(model, PromptDataset(TEXTS, model.tokenizer, stop=[None, [], None, None, None]))
    assert got[0] == expected[0] and got[1]["token_ids"] == references[1]


def test_chat_template_only_when_asked_and_present(text_checkpoint):
    path, _, tok, _ = text_checkpoint
    data = PromptDataset(TEXTS[:2], tok, chat=True)
    expected = tok.apply_chat_template([{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True)
    assert data[0].input_ids.tolist() == list(expected["input_ids"])
    assert tok.decode(data[0].input_ids.tolist()).endswith("<|assistant|>\n")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.decode(PromptDataset([conversation], tok, chat=True)[0].input_ids.tolist()).startswith("<|system|>")
    assert PromptDataset(TEXTS[:1], tok)[0].input_ids.tolist() == tok(TEXTS[0])["input_ids"]  # plain by default
    plain = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has none: pass chat=False"):
        PromptDataset(TEXTS, plain, chat=True)


def test_rows_of_the_streaming_writer_carry_text_ids_and_reason(text_checkpoint, tmp_path):
    path, _, tok, references = text_checkpoint
    stops, expected = stop_cases(tok, references)
    writer = StreamingPredictionWriter(tmp_path / "out")
    model = GenerationModule.from_pretrained(path, max_new_tokens=NEW)
    data = PromptDataset(TEXTS, model.tokenizer, stop=stops)
    loader = DataLoader(writer.pending(data), batch_size=2, collate_fn=collate_prompts)
    L.Trainer(accelerator="cpu", devices=1, callbacks=[writer], **trainer_kwargs()).predict(
        model, loader, return_predictions=False
    )
    rows = read_predictions(tmp_path / "out")
    assert [r["index"] for r in rows] == list(range(len(TEXTS)))
    assert [r["prediction"] for r in rows] == expected
    line = (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()[0]
    assert set(json.loads(line)["prediction"]) == {"text", "token_ids", "finish_reason"}


# -- bad input: raised before any generation, naming the fix -----------------------------------------
def test_text_without_a_tokenizer_is_refused(text_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"prompt 0 is text, but PromptDataset has no tokenizer"):
        PromptDataset(TEXTS)
    bare = tmp_path / "weights_only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((Path(text_checkpoint[0]) / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"weights_only has no tokenizer .* Save the model's tokenizer there"):
        PromptDataset(TEXTS, bare)
    model = GenerationModule.from_pretrained(bare, max_new_tokens=2, stop=["x"])
    assert model.tokenizer is None
    with pytest.raises(ValueError, match=r"weights_only has no tokenizer: pass GenerationModule\(tokenizer=...\)"):
        _predict(model, PromptDataset([[1, 2, 3]]))


def test_empty_stop_strings_and_too_long_prompts(text_checkpoint):
    path, _, tok, _ = text_checkpoint
    with pytest.raises(ValueError, match="a stop string is empty"):
        GenerationModule.from_pretrained(path, stop=["ok", ""])
    with pytest.raises(ValueError, match=r"the stop strings of prompt 1: a stop string is empty"):
        PromptDataset(TEXTS[:2], tok, stop=[None, ""])
    with pytest.raises(ValueError, match=r"stop has 1 entries for 2 prompts"):
        PromptDataset(TEXTS[:2], tok, stop=[["x"]])
    long_text = " ".join(TEXTS * 3)  # well past the 64 positions
    ids = tok(long_text)["input_ids"]
    assert len(ids) > 64
    with pytest.raises(ValueError, match=r"max_position_embeddings=64. .*GenerationModule\(truncate=True\)"):
        _predict(GenerationModule.from_pretrained(path, max_new_tokens=4), PromptDataset([long_text], tok))
    truncated = _predict(GenerationModule.from_pretrained(path, max_new_tokens=4, truncate=True),
                         PromptDataset([long_text], tok))
    kept = _predict(GenerationModule.from_pretrained(path, max_new_tokens=4), PromptDataset([ids[-60:]], tok))
    assert truncated == kept  # the last 64 - 4 tokens


def test_progress_reports_prompts_tokens_and_rate_on_rank_zero(text_checkpoint):
    from lightning_pp.integration.generation_progress import GenerationProgress

    path, _, tok, references = text_checkpoint
    lines = []
    progress = GenerationProgress(every_n_batches=2, printer=lines.append)
    model = GenerationModule.from_pretrained(path, max_new_tokens=NEW)
    got = _predict(model, PromptDataset(TEXTS, tok), callbacks=[progress], batch_size=2)  # batches of 2, 2, 1
    assert [h["prompts"] for h in progress.history] == [4, 5]  # every second batch, and the last
    assert progress.history[-1]["tokens"] == sum(len(r["token_ids"]) for r in got) == NEW * len(TEXTS)
    assert all(h["tokens_per_s"] > 0 for h in progress.history)
    assert lines[0].startswith("prompts 4/5 | tokens 40 | tokens/s ") and len(lines) == 2
    # With a progress bar the lines go through it (above the bar), not to the printer.
    from lightning.pytorch.callbacks import TQDMProgressBar

    class RecordingBar(TQDMProgressBar):
        printed = []

        def print(self, *args, **kwargs):
            self.printed.append(" ".join(map(str, args)))

    lines.clear()
    loader = DataLoader(PromptDataset(TEXTS, tok), batch_size=2, collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[progress, RecordingBar()],
                        **trainer_kwargs(enable_progress_bar=True))
    trainer.predict(model, loader)
    assert lines == [] and progress.history[-1]["prompts"] == 5
    assert len(RecordingBar.printed) == 2 and RecordingBar.printed[-1].startswith("prompts 5/5 | tokens 50")
