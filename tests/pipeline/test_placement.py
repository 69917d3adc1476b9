"""Modules outside a block list live only on the stage that runs them (no processes, no pipeline).

One rank's part of a model is made with ``partition_block_list`` and run as one stage,
with the activation a previous stage would send; it must give the one-device values,
hold only its own modules, and fail loudly when the step needs another stage's values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_pp.pipeline.block_stage import BlockCallError, partition_block_list
from lightning_pp.pipeline.materialize import has_meta_tensors, materialize_meta_tensors
from lightning_pp.pipeline.placement import Unheld, UnheldValueError, outside_modules

VOCAB, DIM = 24, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)

    def forward(self, x, gate):
        return x + torch.tanh(self.linear(x)) * gate


class Loop(nn.Module):
    """Embedding, blocks called in a loop with a value derived between them, norm and head."""

    def __init__(self, gate_from_embedding: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.gate_from_embedding = gate_from_embedding

    def forward(self, ids):
        h = self.embed(ids)
        if self.gate_from_embedding:  # needs the embedding's values on every stage
            gate = torch.sigmoid(h.mean(dim=(1, 2), keepdim=True))
        else:  # needs only the batch and the embedding's shape/dtype
            gate = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)[..., None] * 0.5
        for block in self.blocks:
            h = block(h, gate)
        return self.head(self.norm(h))


def _stage_run(make, ids, stage, stage_input):
    torch.manual_seed(0)
    model = make()
    pipeline = partition_block_list(model, name=None, num_stages=2, local_stages=[stage])
    with torch.no_grad():
        return model, pipeline.run_stage(stage, stage_input, lambda: model(ids), stop=stage == 0)


def test_each_stage_holds_only_what_it_runs_and_equals_one_device():
    torch.manual_seed(0)
    whole = Loop()
    ids = torch.randint(0, VOCAB, (3, 5))
    seen = {}
    whole.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    with torch.no_grad():
        want = whole(ids)
    first, sent = _stage_run(Loop, ids, 0, None)
    last, out = _stage_run(Loop, ids, 1, seen["x"])
    torch.testing.assert_close(sent, seen["x"])
    torch.testing.assert_close(out, want)
    assert type(out) is torch.Tensor
    names = {0: set(first.state_dict()), 1: set(last.state_dict())}
    assert not any(n.startswith(("norm.", "head.", "blocks.2", "blocks.3")) for n in names[0])
    assert not any(n.startswith(("embed.", "blocks.0", "blocks.1")) for n in names[1])
    assert names[0] | names[1] == set(whole.state_dict()) and not names[0] & names[1]
    assert isinstance(first.head, Unheld) and isinstance(last.embed, Unheld)
    assert sum(p.numel() for p in first.parameters()) + sum(p.numel() for p in last.parameters()) == sum(
        p.numel() for p in whole.parameters()
    )


def test_a_step_that_uses_an_unheld_modules_values_fails_naming_it():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(UnheldValueError, match=r"stage 1.*embed"):
        _stage_run(lambda: Loop(gate_from_embedding=True), ids, 1, torch.zeros(2, 5, DIM))


def test_outside_modules_are_ordered_around_the_blocks():
    found = [(name, before) for name, _, before in outside_modules(Loop(), "blocks")]
    assert found == [("embed", True), ("norm", False), ("head", False)]


def test_a_tied_head_is_a_tie_between_first_and_last_stage():
    model = Loop()
    model.head.weight = model.embed.weight
    pipeline = partition_block_list(model, name=None, num_stages=2, local_stages=[1])
    assert [(t.names, t.stages) for t in pipeline.ties] == [(("embed.weight", "head.weight"), (0, 1))]
    assert "head.weight" in dict(model.named_parameters())


def test_a_meta_model_materialises_only_its_stage():
    with torch.device("meta"):
        model = Loop()
    partition_block_list(model, name=None, num_stages=2, local_stages=[1])
    assert has_meta_tensors(model)
    initialised = materialize_meta_tensors(model, torch.device("cpu"))
    assert not has_meta_tensors(model)
    assert sorted(initialised) == sorted(model.state_dict())
    assert torch.equal(model.norm.weight, torch.ones(DIM))  # reset_parameters ran
    assert model.head.weight.std() > 0


def test_a_module_without_an_initialiser_is_named():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(DIM))

    with torch.device("meta"):
        model = Loop()
        model.norm = Scale()
    partition_block_list(model, name=None, num_stages=2, local_stages=[1])
    with pytest.raises(RuntimeError, match=r"norm.*reset_parameters"):
        materialize_meta_tensors(model, torch.device("cpu"))


class EmbedRegisteredLast(Loop):
    """Calls the embedding before the blocks but registers it after them."""

    def __init__(self) -> None:
        super().__init__()
        embed = self.embed
        del self.embed
        self.embed = embed


class HeadRegisteredFirst(Loop):
    """Calls the head after the blocks but registers it before them."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.norm = nn.LayerNorm(DIM)
        self.gate_from_embedding = False


@pytest.mark.parametrize(
    "make, stage, message",
    [
        (EmbedRegisteredLast, 0, "called embed before the last block of blocks had run, but embed is registered after"),
        (EmbedRegisteredLast, 1, "called embed before the last block of blocks had run, but embed is registered after"),
        (HeadRegisteredFirst, 1, "called head after block 3 of blocks, but head is registered before blocks"),
    ],
)
def test_a_module_registered_on_the_other_side_of_the_blocks_fails_naming_it(make, stage, message):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        make()(ids)  # one device: the order of registration does not matter
    stage_input = torch.zeros(3, 5, DIM) if stage else None
    with pytest.raises(BlockCallError, match=message + ".*Register"):
        _stage_run(make, ids, stage, stage_input)
