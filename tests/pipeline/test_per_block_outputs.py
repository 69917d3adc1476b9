"""A block-list model asked for a value per block (every layer's hidden states) is refused under pipeline stages.

Each stage runs only its own blocks, so the last stage, whose result the step returns,
collects such a value from its blocks alone. Seen before the check, with a tiny Llama at
pp=2 and ``output_hidden_states=True``: ``trainer.predict`` returned 3 hidden states
instead of 5, the first two being the received activation, with no error.
"""

from __future__ import annotations

import pytest
import torch

from lightning_pp.pipeline.block_stage import PerBlockOutputError, partition_block_list

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(0))


def _llama(**config) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, **config))


def _last_stage(model, **call):
    """Runs the model as the last of 2 stages, from the activation stage 0 would send."""
    pipeline = partition_block_list(model, name=None, num_stages=2, local_stages=[1])
    received = torch.randn(2, 6, 16, requires_grad=True)
    return pipeline.run_stage(1, received, lambda: model(input_ids=IDS, **call), stop=False)


@pytest.mark.parametrize("call", [{"output_hidden_states": True}, {"output_attentions": True}])
def test_asking_for_every_blocks_output_is_refused_on_a_stage(call):
    with pytest.raises(PerBlockOutputError, match=f"{next(iter(call))}=True.*last_hidden_state"):
        _last_stage(_llama(), **call)


def test_the_same_request_in_the_config_is_refused_and_a_call_can_turn_it_off():
    with pytest.raises(PerBlockOutputError, match="output_hidden_states=True"):
        _last_stage(_llama(output_hidden_states=True))
    out = _last_stage(_llama(output_hidden_states=True), output_hidden_states=False)
    assert out.hidden_states is None and out.logits.shape == (2, 6, 48)


def test_a_plain_call_runs_and_one_stage_keeps_every_blocks_output():
    assert _last_stage(_llama()).logits.shape == (2, 6, 48)
    model = _llama()
    pipeline = partition_block_list(model, name=None, num_stages=1, local_stages=[0])
    out = pipeline.run_stage(0, None, lambda: model(input_ids=IDS, output_hidden_states=True), stop=False)
    assert len(out.hidden_states) == 5  # the embedding output and each of the 4 blocks'
