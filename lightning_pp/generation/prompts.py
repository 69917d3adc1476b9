"""Datasets of prompts for generation and scoring: token ids or text, each item carrying its dataset index.

::

    tok = AutoTokenizer.from_pretrained(ckpt_dir)                  # or PromptDataset(texts, ckpt_dir)
    data = PromptDataset(texts, tok, stop=None, chat=False)        # strings -> token ids, here, once
    loader = DataLoader(data, batch_size=32, collate_fn=collate_prompts)

Each item is a :class:`PromptItem`: the prompt's ids, its index in the dataset
(which seeds its random stream when sampling, so it must not depend on the batch
or the rank), and optionally its own ``max_new_tokens`` and stop strings. Plain
torch: nothing here imports Lightning.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from lightning_pp.generation.text import check_stop_strings, encode_prompts, load_tokenizer

__all__ = ["PromptDataset", "PromptItem", "ScoreDataset", "collate_prompts"]

StopArg = Union[str, Sequence[str], None]


def _ids(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).flatten()


class PromptItem:
    """One prompt of a batch: its token ids, its dataset index, and what to do with it.

    A plain object (not a tensor, list or dataclass), so Lightning's batch transfer
    leaves it on the host, where the generator keeps prompts until they launch.

    Attributes:
        input_ids: the prompt, 1-D ``long``.
        index: its position in the dataset; seeds its random stream when sampling,
            so it must not depend on the batch or the rank.
        max_new_tokens: this prompt's own limit (``None``: the module's).
        continuation: with ``mode="score"``, the tokens whose log-probabilities to return.
        stop: this prompt's stop strings (``None``: the module's; ``()``: none).
    """

    __slots__ = ("input_ids", "index", "max_new_tokens", "continuation", "stop")

    def __init__(
        self,
        input_ids: Union[torch.Tensor, Sequence[int]],
        index: int,
        *,
        max_new_tokens: Optional[int] = None,
        continuation: Union[torch.Tensor, Sequence[int], None] = None,
        stop: StopArg = None,
    ) -> None:
        self.input_ids = _ids(input_ids)
        self.index = int(index)
        self.max_new_tokens = max_new_tokens
        self.continuation = None if continuation is None else _ids(continuation)
        self.stop = None if stop is None else check_stop_strings(stop, f"the stop strings of prompt {index}")

    def __repr__(self) -> str:
        extra = f", max_new_tokens={self.max_new_tokens}" if self.max_new_tokens is not None else ""
        extra += f", continuation={self.continuation.tolist()}" if self.continuation is not None else ""
        extra += f", stop={self.stop}" if self.stop is not None else ""
        return f"PromptItem({self.input_ids.tolist()}, index={self.index}{extra})"


def _per_prompt(values: Optional[Sequence[Any]], name: str, num_prompts: int) -> list[Any]:
    out = list(values) if values is not None else [None] * num_prompts
    if len(out) != num_prompts:
        raise ValueError(
            f"{name} has {len(out)} entries for {num_prompts} prompts: give one each (None for the module's default)."
        )
    return out


class PromptDataset(Dataset):
    """Prompts as :class:`PromptItem` s carrying their index: token ids, or text through a tokenizer.

    Args:
        prompts: one per item: a token-id sequence (list or 1-D tensor), or with a
            ``tokenizer`` a string (with ``chat=True`` also a list of chat messages).
        tokenizer: a Hugging Face tokenizer, or a local directory to load one from
            (``AutoTokenizer.from_pretrained``, never a download). Text prompts are
            encoded here, once. ``GenerationModule`` takes it over to decode the
            outputs when it has none of its own.
        chat: apply the tokenizer's chat template (a string is one user message;
            the assistant's turn is opened). Refused when the tokenizer has none.
        stop: optionally, each prompt's stop strings (a string, a list of strings,
            or ``None`` for the module's); decoding them needs a tokenizer.
        max_new_tokens: optionally, each prompt's own limit (``None`` entries: the module's).

    Raises:
        ValueError: text without a tokenizer, ``chat=True`` without a chat template,
            an empty stop string, or per-prompt lists of the wrong length.
        FileNotFoundError: ``tokenizer`` is a directory without tokenizer files.
    """

    def __init__(
        self,
        prompts: Sequence[Any],
        tokenizer: Any = None,
        *,
        chat: bool = False,
        stop: Optional[Sequence[StopArg]] = None,
        max_new_tokens: Optional[Sequence[Optional[int]]] = None,
    ) -> None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        is_text = [isinstance(p, str) or (chat and _is_conversation(p)) for p in prompts]
        if any(is_text) and tokenizer is None:
            first = is_text.index(True)
            raise ValueError(
                f"prompt {first} is text, but PromptDataset has no tokenizer to encode it: pass one, "
                "PromptDataset(texts, AutoTokenizer.from_pretrained(ckpt_dir)) or PromptDataset(texts, ckpt_dir), "
                "or give token ids."
            )
        if chat and tokenizer is None:
            raise ValueError("chat=True applies a tokenizer's chat template: pass the tokenizer as well.")
        texts = [p for p, text in zip(prompts, is_text) if text]
        encoded = iter(encode_prompts(texts, tokenizer, chat=chat) if texts else [])
        self.prompts = [_ids(next(encoded)) if text else _ids(p) for p, text in zip(prompts, is_text)]
        self.max_new_tokens = _per_prompt(max_new_tokens, "max_new_tokens", len(self.prompts))
        self.stop = [
            None if s is None else check_stop_strings(s, f"the stop strings of prompt {i}")
            for i, s in enumerate(_per_prompt(stop, "stop", len(self.prompts)))
        ]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> PromptItem:
        return PromptItem(self.prompts[i], i, max_new_tokens=self.max_new_tokens[i], stop=self.stop[i])


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


class ScoreDataset(Dataset):
    """``(prompt, continuation)`` token-id pairs to score (``GenerationModule(mode="score")``)."""

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
        self.pairs = [(_ids(prompt), _ids(continuation)) for prompt, continuation in pairs]
        # The prompts alone, as PromptDataset names them (the collate check reads them).
        self.prompts = [prompt for prompt, _ in self.pairs]
        self.tokenizer = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PromptItem:
        prompt, continuation = self.pairs[i]
        return PromptItem(prompt, i, continuation=continuation)


def collate_prompts(items: list[Any]) -> list[Any]:
    """Keeps ragged prompts as a list (no padding: the generator packs rows itself)."""
    return list(items)
