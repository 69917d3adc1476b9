"""Each microbatch's share of the batch: by rows, or by what its loss averages over.

A Hugging Face causal LM's loss is a mean over the label tokens other than -100. With
padded or prompt-masked rows, microbatches hold different numbers of them, and weighing
their losses by rows gives another number than one device's mean over the whole batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_pp import PPStrategy
from lightning_pp.pipeline.microbatch import (
    label_tokens,
    microbatch_shares,
    resolve_microbatch_weight,
    split_microbatches,
)
from lightning_pp.pipeline.step_outputs import weighted_mean

G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(6, 5, 7, generator=G)
LABELS = torch.randint(0, 7, (6, 5), generator=G)
LABELS[0, 2:] = -100  # padding, row by row
LABELS[3, 1:] = -100
LABELS[4, :4] = -100  # a masked prompt
BATCH = {"logits": LOGITS, "labels": LABELS}


def _token_mean_loss(batch) -> torch.Tensor:
    """What a Hugging Face causal LM computes from its logits and labels: shift, then mean over kept tokens."""
    logits, labels = batch["logits"][:, :-1], batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("num_microbatches", [2, 3, 6])
def test_label_token_shares_give_the_whole_batchs_token_mean(num_microbatches):
    microbatches = split_microbatches(BATCH, num_microbatches)
    losses = [_token_mean_loss(mb) for mb in microbatches]
    whole = _token_mean_loss(BATCH)
    by_tokens = weighted_mean(losses, microbatch_shares(microbatches, label_tokens))
    torch.testing.assert_close(by_tokens, whole)
    by_rows = weighted_mean(losses, microbatch_shares(microbatches))
    assert not torch.isclose(by_rows, whole), "the rows' weighting must differ here, or the test shows nothing"
    if num_microbatches == 6:  # row 3 has no token: its loss is 0/0, and its share 0 leaves it out
        assert torch.isnan(losses[3]) and torch.isnan(by_rows)


def test_label_tokens_counts_what_the_loss_averages_over():
    assert label_tokens(BATCH) == int((LABELS[:, 1:] != -100).sum()) == 14
    assert label_tokens({"labels": torch.tensor([[5, 6, -100]])}) == 1  # a row's first label is never a target


def test_shares_fall_back_to_rows_when_nothing_is_counted_and_refuse_negative_weights():
    microbatches = split_microbatches({"x": torch.zeros(3, 2)}, 3)
    assert microbatch_shares(microbatches, lambda mb: 0) == pytest.approx([1 / 3] * 3)
    assert microbatch_shares(microbatches, lambda mb: torch.tensor(2)) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="a number >= 0"):
        microbatch_shares(microbatches, lambda mb: -1)


def test_a_batch_without_labels_and_an_unknown_rule_fail_with_the_fix():
    with pytest.raises(ValueError, match="counts the tokens of batch\\['labels'\\].*a function of the microbatch"):
        label_tokens((torch.zeros(2, 3), torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="'tokens'.*label_tokens"):
        resolve_microbatch_weight("tokens")
    with pytest.raises(ValueError, match="label_tokens"):
        PPStrategy(microbatch_weight="tokens")
    assert resolve_microbatch_weight("label_tokens") is label_tokens and resolve_microbatch_weight(None) is None
