"""Reading a local Hugging Face checkpoint directory, whole or one pipeline stage at a time (no processes)."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_pp.checkpoint.hf import checkpoint_covers, load_hf_checkpoint, load_pending_hf_checkpoints
from lightning_pp.pipeline.block_stage import partition_block_list
from lightning_pp.pipeline.materialize import materialize_meta_tensors

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")


def _config():
    return transformers.Qwen3Config(  # tied embeddings: lm_head.weight is not in the files
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(_config())
    directory = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(directory, max_shard_size="8KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return directory, model


def _opened_files(monkeypatch):
    from lightning_pp.checkpoint import hf

    opened: list[str] = []
    real = hf._open_file

    def spy(path):
        opened.append(path.name)
        return real(path)

    monkeypatch.setattr(hf, "_open_file", spy)
    return opened


def test_a_whole_model_equals_from_pretrained(saved):
    directory, reference = saved
    model = transformers.Qwen3ForCausalLM(_config())
    assert load_hf_checkpoint(model, directory) is True
    ids = torch.randint(0, 48, (2, 7))
    with torch.no_grad():
        want = transformers.Qwen3ForCausalLM.from_pretrained(directory)(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(reference(input_ids=ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_meta_model_reads_only_its_stage_from_the_shards_that_hold_it(saved, stage, monkeypatch):
    directory, reference = saved
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(_config())
    assert load_hf_checkpoint(model, directory) is False  # pending: read once split
    partition_block_list(model, name=None, num_stages=2, local_stages=[stage])
    opened = _opened_files(monkeypatch)
    covers = checkpoint_covers(model)
    initialised = materialize_meta_tensors(model, torch.device("cpu"), loaded=covers)
    read = load_pending_hf_checkpoints(model, where=f"stage {stage}")
    # Only the rotary tables (in no checkpoint) are initialised; everything else is read.
    assert all("rotary_emb" in name for name in initialised)
    assert sorted(read) == sorted(model.state_dict())
    held = model.state_dict()
    want = reference.state_dict()
    for name, value in held.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)
    buffers = dict(reference.named_buffers())
    rotary = [name for name, _ in model.named_buffers() if "rotary_emb" in name]
    assert rotary
    for name in rotary:  # recomputed by the model's own _init_weights
        torch.testing.assert_close(model.get_buffer(name), buffers[name])
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {index["model.embed_tokens.weight" if n == "lm_head.weight" else n] for n in held}
    assert set(opened) == needed and len(opened) == len(needed)
    assert needed != set(index.values())  # a stage does not need every shard


def test_missing_tensors_of_a_stage_are_named(saved, tmp_path):
    directory, reference = saved
    tensors = {k: v for k, v in reference.state_dict().items() if k not in ("model.norm.weight", "lm_head.weight")}
    safetensors.save_file({k: v.contiguous() for k, v in tensors.items() if "layers.3." not in k},
                                str(tmp_path / "model.safetensors"))
    named = r"12 of the 24 tensors of stage 1: model\.layers\.3\.\* \(11 tensors\), model\.norm\.weight\."
    for stage, error in ((0, None), (1, named)):
        with torch.device("meta"):
            model = transformers.Qwen3ForCausalLM(_config())
        load_hf_checkpoint(model, tmp_path)
        partition_block_list(model, name=None, num_stages=2, local_stages=[stage])
        materialize_meta_tensors(model, torch.device("cpu"), loaded=checkpoint_covers(model))
        if error is None:
            load_pending_hf_checkpoints(model, where=f"stage {stage}")  # stage 0 has everything it needs
        else:
            with pytest.raises(KeyError, match=error):
                load_pending_hf_checkpoints(model, where=f"stage {stage}")


def test_a_directory_without_safetensors_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(torch.nn.Linear(2, 2), tmp_path)


def test_a_bf16_checkpoint_fills_an_fp32_module(tmp_path):
    source = torch.nn.Linear(4, 3).to(torch.bfloat16)
    safetensors.save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    target = torch.nn.Linear(4, 3)
    load_hf_checkpoint(target, tmp_path)
    torch.testing.assert_close(target.weight, source.weight.float(), rtol=0, atol=0)
    assert target.weight.dtype == torch.float32
