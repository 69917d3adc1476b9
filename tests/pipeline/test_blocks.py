"""Finding the block list to pipeline, without processes: user models, Hugging Face models, errors."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_pp.pipeline.blocks import block_list_candidates, find_block_list, resolve_path


class Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))  # a list inside a block

    def forward(self, x):
        return x + self.mlp(x)


class UserModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(8, 10)


class Wrapper(nn.Module):
    """A LightningModule-like holder with the network one level down."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_a_user_block_list_is_found_anywhere_in_the_tree():
    found = find_block_list(Wrapper(UserModel()))
    assert (found.path, found.found_by, found.num_blocks) == ("net.blocks", "largest", 4)


def test_the_largest_list_wins_and_nested_lists_do_not_compete():
    model = UserModel()
    model.small = nn.ModuleList(nn.Linear(2, 2) for _ in range(6))  # more blocks, fewer parameters
    assert find_block_list(model).path == "blocks"
    paths = [path for path, _, _ in block_list_candidates(model)]
    assert paths == ["blocks", "small"], "the Sequential inside each Block is part of a block"


def test_a_named_path_is_taken_as_given():
    model = Wrapper(UserModel())
    assert find_block_list(model, "net.blocks").found_by == "name"
    with pytest.raises(ValueError, match=r"'net.nope' does not name a submodule: net has no child 'nope'"):
        find_block_list(model, "net.nope")
    with pytest.raises(ValueError, match=r"sequential='net.head'\) names a Linear"):
        find_block_list(model, "net.head")
    assert resolve_path(model, "net.head") is model.net.head


def test_ties_for_largest_list_the_candidates_and_the_option():
    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList(Block() for _ in range(3))
            self.decoder = nn.ModuleList(Block() for _ in range(3))

    with pytest.raises(ValueError, match=r"encoder \(3 x Block\), decoder \(3 x Block\).*sequential='encoder'"):
        find_block_list(EncoderDecoder())


def test_no_list_says_what_was_looked_for():
    with pytest.raises(ValueError, match="base_model_pp_plan, then an nn.ModuleList"):
        find_block_list(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "make, path, found_by",
    [
        (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)),
         "model.layers", "pp_plan"),
        (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8)),
         "model.layers", "pp_plan"),
        (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=3, n_head=2)),
         "transformer.h", "largest"),
    ],
    ids=["llama", "qwen3", "gpt2"],
)
def test_hugging_face_causal_lms(make, path, found_by):
    found = find_block_list(Wrapper(make()))
    assert (found.path, found.found_by, found.num_blocks) == (f"net.{path}", found_by, 3)
