"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Sampling is reproducible whatever the parallel layout: the random number that
picks sequence ``i``'s token at position ``p`` is a pure function of
``(seed, key_i, p)``, where ``key_i`` is the prompt's dataset index. It does not
depend on which rank, batch, slot or microbatch carried the sequence, nor on
which other sequences were sampled in the same call, so one device, a pipeline
of any depth and data-parallel attention draw the same numbers. The function is
SplitMix64 (a counter-based generator: no state to carry between steps), and
the token is drawn by inverting the cumulative distribution of the filtered,
renormalised probabilities with that one uniform number.

Filters apply in Hugging Face's order: temperature, then top-k, then top-p
(keep the most likely tokens until their mass reaches ``top_p``; the most likely
token is always kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lightning_pp.generation.kv_cache import host_to_device

__all__ = ["SamplingParams", "sample_tokens", "uniform"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, key: int, position: int) -> float:
    """A number in ``[0, 1)`` that depends on ``(seed, key, position)`` only (53 random bits)."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (key & _MASK64)) ^ (position & _MASK64))
    return (x >> 11) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        temperature: ``None`` or ``0``: greedy (the most likely token). Above 0:
            sample from ``softmax(logits / temperature)``.
        top_k: keep only the ``top_k`` most likely tokens (``None``: all).
        top_p: keep the most likely tokens until their probability mass reaches
            ``top_p``, in ``(0, 1]`` (``None`` or ``1``: all).
        seed: with the prompt's dataset index and the position, picks every random number.
    """

    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if t is not None and not t >= 0:  # `not >=` also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 or None: greedy decoding), got {t}.")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (None: no top-k filtering), got {k!r}.")
        if p is not None and not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 or None: no nucleus filtering), got {p}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if self.greedy and (k is not None or p is not None):
            raise ValueError(
                f"top_k={k} / top_p={p} filter what is sampled, but temperature={t} decodes greedily: "
                "pass a temperature > 0 to sample (1.0 leaves the logits as they are), or drop top_k and top_p."
            )

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is taken (no randomness)."""
        return not self.temperature


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, keys: Sequence[int], positions: Sequence[int]
) -> torch.Tensor:
    """One token per row of ``logits`` (``[rows, vocab]``), as a long tensor on the logits' device.

    Args:
        logits: the next-token logits of each row.
        params: greedy, or how to sample.
        keys: each row's random stream (its prompt's dataset index).
        positions: each row's position for the token being chosen.
    """
    if params.greedy or logits.shape[0] == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / float(params.temperature)  # type: ignore[arg-type]  # not greedy: set
    k = params.top_k
    if k is not None and k < scaled.shape[-1]:
        values, order = scaled.topk(k, dim=-1)  # sorted, most likely first
    else:
        values, order = scaled.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(values, dim=-1)
    if params.top_p is not None and params.top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= params.top_p, 0.0)  # the first token always stays (before = 0)
    cdf = probs.double().cumsum(dim=-1)
    draws = torch.tensor([uniform(params.seed, key, pos) for key, pos in zip(keys, positions)], dtype=torch.float64)
    threshold = host_to_device(draws, cdf.device)[:, None] * cdf[:, -1:]
    # The first token whose cumulative mass exceeds u * total; never one of the filtered
    # (zeroed, least likely) tail, even where rounding puts u * total on the total.
    pick = torch.minimum(torch.searchsorted(cdf, threshold, right=True), (probs > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)
