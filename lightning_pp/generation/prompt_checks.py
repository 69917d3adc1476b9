"""The checks a batch of prompts passes before anything runs, with errors that say how to fix them.

Token ids inside the vocabulary, a continuation exactly when scoring, a usable
``max_new_tokens``, a tokenizer for stop strings, and room for every position
(or the prompt's last tokens kept, on request). ``GenerationModule`` runs them on
every rank alike, so a refusal stops every rank before any waits for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lightning_pp.generation.prompts import PromptItem

__all__ = ["PromptRules"]


@dataclass(frozen=True)
class PromptRules:
    """What the prompts of a ``GenerationModule`` must satisfy.

    Attributes:
        vocab_size: the model's vocabulary.
        max_positions: the model's ``max_position_embeddings`` (``None``: no limit).
        mode: ``"generate"`` or ``"score"``.
        max_new_tokens: the module's limit, for prompts that set none.
        default_stop: whether the module has stop strings of its own.
        has_tokenizer: whether the module can decode (stop strings need it).
        truncate: keep a too-long prompt's last tokens instead of refusing it.
    """

    vocab_size: int
    max_positions: Optional[int]
    mode: str
    max_new_tokens: int
    default_stop: bool
    has_tokenizer: bool
    truncate: bool

    def check(self, items: list[PromptItem], batch_idx: int) -> None:
        """Token ids inside the vocabulary, a continuation exactly when scoring, room for every position.

        Truncates ``item.input_ids`` in place when ``truncate`` is set.
        """
        limit = self.max_positions
        for i, item in enumerate(items):
            where = f"prompt {i} of batch {batch_idx}"
            self._check_ids(item.input_ids, where)
            if self.mode == "score":
                if item.continuation is None:
                    raise ValueError(
                        f"{where} has no continuation to score: mode='score' takes (prompt, continuation) pairs, "
                        "e.g. ScoreDataset(pairs) with collate_fn=collate_prompts."
                    )
                self._check_ids(item.continuation, f"the continuation of {where}")
                total = len(item.input_ids) + len(item.continuation)
                if limit is not None and total > limit:
                    raise ValueError(
                        f"{where} and its continuation hold {total} tokens, past the model's "
                        f"max_position_embeddings={limit}. Shorten the prompt or the continuation."
                    )
                continue
            if item.continuation is not None:
                raise ValueError(
                    f"{where} carries a continuation to score, but this module generates: "
                    "build it with GenerationModule(..., mode='score') to score continuations."
                )
            new = self.max_new_tokens if item.max_new_tokens is None else item.max_new_tokens
            if isinstance(new, bool) or not isinstance(new, int) or new < 1:
                raise ValueError(f"{where} asks for max_new_tokens={new!r}: give an integer >= 1 (or None).")
            if (item.stop or (item.stop is None and self.default_stop)) and not self.has_tokenizer:
                raise ValueError(
                    f"{where} has stop strings, which are found in the decoded text, but the module has no "
                    "tokenizer: pass GenerationModule(tokenizer=...) or PromptDataset(prompts, tokenizer)."
                )
            if limit is not None and len(item.input_ids) + new > limit:
                if self.truncate and limit - new >= 1:
                    item.input_ids = item.input_ids[len(item.input_ids) + new - limit :]  # keep the last tokens
                    continue
                raise ValueError(
                    f"{where} has {len(item.input_ids)} tokens; with max_new_tokens={new} it would reach "
                    f"position {len(item.input_ids) + new}, past the model's max_position_embeddings={limit}. "
                    + (
                        "Lower max_new_tokens: it leaves no room for any prompt token."
                        if self.truncate
                        else "Shorten the prompt, lower max_new_tokens, or pass GenerationModule(truncate=True) "
                        "to keep the prompt's last tokens."
                    )
                )

    def _check_ids(self, ids: torch.Tensor, where: str) -> None:
        vocab = self.vocab_size
        if ids.numel() == 0:
            raise ValueError(f"{where} is empty: every prompt and continuation needs at least one token.")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"{where} holds token id {bad}, outside the model's vocabulary of {vocab} ids (0..{vocab - 1}): "
                "was it encoded with another model's tokenizer?"
            )
