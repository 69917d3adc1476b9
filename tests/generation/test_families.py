"""Llama, Mistral, Qwen2 and Qwen3 checkpoints: logits and greedy generation equal transformers'.

Each family is a tiny random model built by ``transformers`` itself and saved with
``save_pretrained``; the references are that model's logits and its ``generate``
(greedy, with its own KV cache). The configurations switch on what differs between
families: q/k/v biases (Qwen2, Llama's ``attention_bias``), an o_proj bias, per-head
q/k norms and a head width other than ``hidden / heads`` (Qwen3), tied embeddings,
and sliding windows shorter than the prompts (Mistral on every layer, Qwen2 on the
layers from ``max_window_layers``). The pipelined runs of every family share one
two-rank job, which also runs text in / text out with stop strings through the
streaming writer (``test_text.py`` holds that case's one-device tests).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_pp.integration.generation_module import GenerationModule, PromptDataset, collate_prompts
from lightning_pp.integration.writer import read_predictions
from lightning_pp.models.config import DecoderConfig
from lightning_pp.models.llama import DecoderLM

from lit_models import trainer_kwargs
from multirank import run_on_ranks

transformers = pytest.importorskip("transformers")

from test_text import NEW as TEXT_NEW  # noqa: E402
from test_text import TEXTS, save_text_checkpoint, stop_cases  # noqa: E402

from test_generation import PROMPTS, VOCAB, _hf_greedy  # noqa: E402 - after the importorskip


def text_reference(path):
    """The text checkpoint saved to ``path``, its tokenizer, and transformers' greedy ids per text."""
    hf, tok = save_text_checkpoint(path)
    return path, tok, [_hf_greedy(hf, tok(t)["input_ids"], TEXT_NEW) for t in TEXTS]


NEW = 6
BASE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None,
)
#: name: (config class, model class, overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied-bias-headdim": (
        "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True, head_dim=16),
    ),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2-window": (
        "Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    ),
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8, attention_bias=True)),
}


def save_family(path, name, seed=0):
    """Saves a tiny random model of the family to ``path``; returns the transformers model."""
    config_cls, model_cls, overrides = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms and biases too, so a misplaced one shows
        for param_name, p in model.named_parameters():
            if "norm" in param_name:
                p.uniform_(0.5, 1.5)
            elif param_name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (checkpoint directory, transformers model, greedy references)."""
    out = {}
    for i, name in enumerate(FAMILIES):
        path = tmp_path_factory.mktemp(name)
        hf = save_family(path, name, seed=i)
        out[name] = (str(path), hf, [_hf_greedy(hf, p, NEW) for p in PROMPTS])
    return out


def test_configs_switch_on_what_each_family_has(families):
    configs = {name: DecoderConfig.from_hf(json.load(open(f"{path}/config.json"))) for name, (path, _, _) in
               families.items()}
    assert configs["qwen2-window"].qkv_bias and not configs["qwen2-window"].o_bias
    assert configs["qwen2-window"].layer_windows == (None, None, 4, 4)
    assert configs["mistral-window"].layer_windows == (5,) * 4
    assert configs["qwen3-tied"].qk_norm and configs["qwen3-tied"].attn_head_dim == 16
    assert configs["qwen3-tied"].tie_word_embeddings and not configs["llama"].tie_word_embeddings
    assert configs["llama-tied-bias-headdim"].o_bias and configs["llama"].layer_windows == ()
    assert max(len(p) for p in PROMPTS) + NEW > 5  # the windows are shorter than the sequences


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_greedy_generation_equal_transformers(families, name):
    path, hf, expected = families[name]
    lm = DecoderLM.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    model = GenerationModule(lm, max_new_tokens=NEW, eos_token_ids=(), num_microbatches=2)
    loader = DataLoader(PromptDataset(PROMPTS), batch_size=4, collate_fn=collate_prompts)
    out = L.Trainer(accelerator="cpu", devices=1, **trainer_kwargs()).predict(model, loader)
    assert [seq for batch in out for seq in batch] == expected


def test_other_architectures_are_refused_naming_the_supported():
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).to_dict()
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*loads the model types llama, mistral, qwen2, qwen3"):
        DecoderConfig.from_hf(gpt2)
    llama = transformers.LlamaConfig(**BASE).to_dict()
    with pytest.raises(ValueError, match=r"architectures \['LlamaForSequenceClassification'\].*LlamaForCausalLM"):
        DecoderConfig.from_hf({**llama, "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(ValueError, match=r"hidden_act 'gelu'"):
        DecoderConfig.from_hf({**llama, "hidden_act": "gelu"})


def _pp_job(rank, world_size, paths, text_path, stops, out_dir):
    from lightning_pp import PPStrategy
    from lightning_pp.integration.writer import StreamingPredictionWriter

    out = {}
    for name, path in paths.items():
        model = GenerationModule(DecoderLM.from_pretrained(path), max_new_tokens=NEW, eos_token_ids=())
        loader = DataLoader(PromptDataset(PROMPTS), batch_size=4, collate_fn=collate_prompts)
        trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(), **trainer_kwargs())
        out[name] = trainer.predict(model, loader)
    # Text in, stop strings, text out through the streaming writer (rows read back by the parent).
    writer = StreamingPredictionWriter(out_dir)
    model = GenerationModule.from_pretrained(text_path, max_new_tokens=TEXT_NEW)
    data = PromptDataset(TEXTS, model.tokenizer, stop=stops)
    loader = DataLoader(writer.pending(data), batch_size=2, collate_fn=collate_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(), callbacks=[writer],
                        **trainer_kwargs())
    trainer.predict(model, loader, return_predictions=False)
    return out


@pytest.mark.slow
def test_two_stages_generate_as_transformers_for_every_family_and_text_with_stops(families, tmp_path):
    path, tok, references = text_reference(tmp_path / "text_llama")
    stops, expected_rows = stop_cases(tok, references)
    paths = {name: path for name, (path, _, _) in families.items()}
    results = run_on_ranks(
        _pp_job, 2, paths, str(path), stops, str(tmp_path / "rows"), init_process_group=False, timeout=300
    )
    for name, (_, _, expected) in families.items():
        assert [seq for batch in results[0][name] for seq in batch] == expected, name
        assert results[1][name] == [None, None], name
    rows = read_predictions(tmp_path / "rows")
    assert [r["index"] for r in rows] == list(range(len(TEXTS))) and [r["prediction"] for r in rows] == expected_rows
    assert {p.name for p in (tmp_path / "rows").iterdir()} == {"part-00000.jsonl"}  # the first stage writes
