"""Finding parameters shared by layers of different stages, without processes."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_pp.pipeline.ties import TiedParameter, check_tied_copies, find_cross_stage_ties


def _tied_lm(num_blocks: int = 4) -> nn.Sequential:
    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    return nn.Sequential(embed, *[nn.Linear(4, 4) for _ in range(num_blocks)], head)


def test_a_tied_head_is_found_with_both_names_and_stages():
    seq = _tied_lm()
    ties = find_cross_stage_ties(seq, [range(0, 3), range(3, 6)])
    assert ties == [TiedParameter(("0.weight", "5.weight"), (0, 1))]
    assert ties[0].local_name(range(3, 6)) == "5.weight"
    with pytest.raises(ValueError):
        ties[0].local_name(range(1, 3))


def test_ties_inside_one_stage_need_nothing():
    assert find_cross_stage_ties(_tied_lm(), [range(0, 6)]) == []
    shared = nn.Linear(4, 4)
    seq = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 4))  # the same module twice, one stage
    assert find_cross_stage_ties(seq, [range(0, 2), range(2, 3)]) == []


def test_several_ties_come_in_order_of_first_use():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    late_a, late_b = nn.Linear(4, 4), nn.Linear(4, 4)
    late_a.weight, late_b.bias = a.weight, b.bias
    seq = nn.Sequential(a, b, nn.Linear(4, 4), late_b, late_a)
    ties = find_cross_stage_ties(seq, [range(0, 2), range(2, 4), range(4, 5)])
    assert ties == [
        TiedParameter(("0.weight", "4.weight"), (0, 2)),
        TiedParameter(("1.bias", "3.bias"), (0, 1)),
    ]


def test_copies_of_one_shape_and_dtype_are_accepted():
    check_tied_copies("lm_head.weight", [(0, (8, 4), "torch.float32"), (3, (8, 4), "torch.float32")])


@pytest.mark.parametrize(
    "other",
    [(3, (4, 4), "torch.float32"), (3, (8, 4), "torch.bfloat16")],
    ids=["sharded-holder", "converted-holder"],
)
def test_copies_that_cannot_be_summed_are_refused_naming_every_holder(other):
    with pytest.raises(ValueError, match=r"lm_head.weight is tied.*rank 0: \(8, 4\).*rank 3: .*or untie it"):
        check_tied_copies("lm_head.weight", [(0, (8, 4), "torch.float32"), other])
