"""Running a model's block list one stage at a time, in one process: the stages chain to the whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_pp.pipeline.block_stage import BlockCallError, BlockPipeline, PassThrough


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x, scale=None):  # a value derived from the batch between blocks, like rotary tables
        return x + torch.tanh(self.linear(x)) * scale


class LoopModel(nn.Module):
    """Embedding, a loop over blocks with an extra argument, a head: the Hugging Face shape."""

    def __init__(self, num_blocks: int = 5, dim: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(num_blocks))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        scale = torch.sigmoid(ids.float().mean())  # recomputed on every stage from the batch
        for block in self.layers:
            h = block(h, scale=scale)
        return self.head(h)


def _loss(model, ids):
    return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _split(slices, stage):
    torch.manual_seed(0)
    model = LoopModel()
    return model, BlockPipeline(model.layers, "layers", {stage: slices[stage]})


def test_three_stages_chain_to_the_whole_model_forward_and_backward():
    ids = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    whole = LoopModel()
    _loss(whole, ids).backward()

    slices = [range(0, 2), range(2, 4), range(4, 5)]
    stages = [_split(slices, s) for s in range(3)]
    received, outputs = None, []
    for s, (model, pipe) in enumerate(stages):
        last = s == len(slices) - 1
        stage_input = None if received is None else received.detach().requires_grad_(True)
        out = pipe.run_stage(s, stage_input, lambda model=model: _loss(model, ids), stop=not last)
        outputs.append((stage_input, out))
        received = out
    torch.testing.assert_close(outputs[-1][1], _loss(whole, ids))
    grad = None
    for stage_input, out in reversed(outputs):
        out.backward(grad) if grad is not None else out.backward()
        grad = stage_input.grad if stage_input is not None else None
    for s, (model, _) in enumerate(stages):
        for i in slices[s]:
            for name, p in model.layers[i].named_parameters():
                torch.testing.assert_close(p.grad, dict(whole.layers[i].named_parameters())[name].grad)
        assert all(isinstance(model.layers[i], PassThrough) for i in range(5) if i not in slices[s])
    assert stages[0][0].embed.weight.grad is not None and stages[1][0].embed.weight.grad is None


def test_other_stages_blocks_hold_no_parameters_and_names_are_kept():
    model, pipe = _split([range(0, 2), range(2, 5)], 1)
    names = {n for n, _ in model.named_parameters() if n.startswith("layers.")}
    assert names == {f"layers.{i}.linear.{p}" for i in (2, 3, 4) for p in ("weight", "bias")}
    assert {id(p) for p in pipe.parameters()} == {id(p) for n, p in model.named_parameters() if n in names}


def test_blocks_called_twice_or_outside_a_step_fail_clearly():
    model, pipe = _split([range(0, 5)], 0)
    with pytest.raises(RuntimeError, match="called outside a pipelined step"):
        model(torch.zeros(1, 2, dtype=torch.long))

    def twice():
        h = model.embed(torch.zeros(1, 2, dtype=torch.long))
        for block in list(model.layers) + [model.layers[0]]:
            h = block(h, scale=1.0)
        return h

    with pytest.raises(BlockCallError, match="called block 0 of layers again"):
        pipe.run_stage(0, None, twice, stop=False)

    def skips():
        h = model.embed(torch.zeros(1, 2, dtype=torch.long))
        for block in model.layers[:3]:
            h = block(h, scale=1.0)
        return h

    with pytest.raises(BlockCallError, match="called blocks 0..2 of layers, not through block 4"):
        pipe.run_stage(0, None, skips, stop=False)
