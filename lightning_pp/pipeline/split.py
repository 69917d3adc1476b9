"""Which layers of the pipelined ``nn.Sequential`` go to which stage.

Stages are contiguous slices. By default they are balanced by parameter count: the
split minimises the largest stage, since the slowest stage sets the pace of the
whole pipeline. A user may instead give ``balance``: the number of layers per stage.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["plan_stage_split", "split_from_balance"]


def split_from_balance(balance: Sequence[int], num_layers: int) -> list[range]:
    """Stage slices from explicit per-stage layer counts.

    Raises:
        ValueError: counts are not positive or do not add up to ``num_layers``.
    """
    if any(n <= 0 for n in balance) or sum(balance) != num_layers:
        raise ValueError(
            f"balance={list(balance)} must be positive layer counts per stage adding up to the {num_layers} layers "
            "of the pipelined nn.Sequential."
        )
    bounds = [0]
    for count in balance:
        bounds.append(bounds[-1] + count)
    return [range(bounds[i], bounds[i + 1]) for i in range(len(balance))]


def plan_stage_split(weights: Sequence[float], num_stages: int, balance: Optional[Sequence[int]] = None) -> list[range]:
    """Splits layers with the given ``weights`` into ``num_stages`` contiguous, non-empty slices.

    Minimises the heaviest slice (exact, by dynamic programming over prefix sums);
    among equally heavy splits it prefers the earliest boundaries.

    Raises:
        ValueError: fewer layers than stages, or a bad ``balance``.
    """
    num_layers = len(weights)
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}.")
    if balance is not None:
        if len(balance) != num_stages:
            raise ValueError(f"balance={list(balance)} names {len(balance)} stages but the pipeline has {num_stages}.")
        return split_from_balance(balance, num_layers)
    if num_layers < num_stages:
        raise ValueError(
            f"The pipelined nn.Sequential has {num_layers} layers, fewer than the {num_stages} pipeline stages. "
            "Use a smaller pipeline_parallel_size (or fewer virtual stages), or split the model into more layers."
        )
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))

    inf = float("inf")
    # best[s][i]: the smallest possible heaviest slice when the first i layers form s stages.
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, num_layers - (num_stages - s) + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    bounds = [num_layers]
    for s in range(num_stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.reverse()
    return [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]
