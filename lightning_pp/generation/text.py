"""Text in, text out: a local tokenizer, prompts encoded (optionally through a chat template), stop strings.

Nothing here downloads: :func:`load_tokenizer` reads a Hugging Face tokenizer
(``tokenizer.json`` / ``tokenizer_config.json`` ...) from a local directory, the
checkpoint's own as a rule, and says what is missing when there is none.

Stop strings act on the *decoded continuation*: a sequence stops as soon as its
text contains one of them (checked after every token, on the first pipeline stage,
where tokens come back), and its text is cut before the earliest one. The token
ids are kept up to and including the token that completed the stop string, as
generated. A stop string may end in the middle of a token; the cut is by
characters, so the text never shows any of it.

The finish reason of a sequence is ``"eos"`` (it produced an end-of-sequence
token, kept in its ids, left out of its text), ``"stop"`` (a stop string) or
``"length"`` (it reached its ``max_new_tokens``), checked in that order.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

__all__ = [
    "FINISH_REASONS",
    "TOKENIZER_FILES",
    "StopStrings",
    "check_stop_strings",
    "encode_prompts",
    "has_tokenizer",
    "load_tokenizer",
]

#: Why a sequence ended, as :class:`~lightning_pp.generation.engine.PipelineGenerator` reports it.
FINISH_REASONS = ("eos", "stop", "length")
#: Files one of which a directory needs for ``AutoTokenizer.from_pretrained`` to find a tokenizer there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(path: Union[str, os.PathLike]) -> bool:
    """Whether a local directory holds tokenizer files."""
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def load_tokenizer(path: Union[str, os.PathLike]) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` for a local directory, never a download.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or holds no tokenizer files.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory: give the local directory that holds the tokenizer.")
    if not has_tokenizer(path):
        raise FileNotFoundError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), so text prompts cannot be encoded. "
            "Save the model's tokenizer there (tokenizer.save_pretrained(path)), pass tokenizer=<another local "
            "directory or a tokenizer object>, or give prompts as token ids."
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode_prompts(prompts: Sequence[Any], tokenizer: Any, *, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt.

    Args:
        prompts: strings; with ``chat=True`` also conversations (lists of
            ``{"role": ..., "content": ...}`` messages).
        tokenizer: a Hugging Face tokenizer.
        chat: apply the tokenizer's chat template, a string becoming one user
            message, and end with the assistant's turn (``add_generation_prompt``).
            Without it, a string is encoded as the tokenizer encodes text (its
            special tokens, such as a BOS, included).

    Raises:
        ValueError: ``chat=True`` and the tokenizer has no chat template, or a
            prompt is neither text nor (with ``chat``) a conversation.
    """
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat=True applies the tokenizer's chat template, but this {type(tokenizer).__name__} has none: "
            "pass chat=False to encode the prompts as plain text, or use a tokenizer with a chat_template."
        )
    out = []
    for i, prompt in enumerate(prompts):
        if chat and isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            messages = list(prompt)
        elif isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}] if chat else []
        else:
            kind = "a string or a list of chat messages" if chat else "a string"
            raise ValueError(f"prompt {i} is {type(prompt).__name__}: with a tokenizer each prompt is {kind}.")
        if chat:
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # transformers 5 returns a dict
        else:
            ids = tokenizer(prompt)["input_ids"]
        out.append([int(t) for t in ids])
    return out


def check_stop_strings(stop: Union[str, Sequence[str], None], where: str) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (a bare string is one stop string).

    Raises:
        ValueError: an entry is empty or not a string.
    """
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in strings:
        if not isinstance(s, str):
            raise ValueError(f"{where}: stop strings are strings, got {type(s).__name__} {s!r}.")
        if not s:
            raise ValueError(f"{where}: a stop string is empty, which every text contains; drop it.")
    return strings


class StopStrings:
    """Decodes a continuation and finds the earliest stop string in it.

    Args:
        tokenizer: decodes ids (special tokens skipped, so an EOS leaves no text).
        strings: the stop strings (non-empty).
    """

    def __init__(self, tokenizer: Any, strings: Sequence[str]) -> None:
        self.tokenizer, self.strings = tokenizer, tuple(strings)

    def text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def cut(self, text: str) -> Optional[int]:
        """Where the earliest stop string starts in ``text`` (``None``: none occurs)."""
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(found) if found else None

    def hit(self, ids: Sequence[int]) -> bool:
        """Whether the continuation ``ids`` contains a stop string (the generator's stop test)."""
        return bool(self.strings) and self.cut(self.text(ids)) is not None

    def checker(self) -> Optional[Callable[[Sequence[int]], bool]]:
        """The stop test to hand the generator (``None`` without stop strings: nothing to decode)."""
        return self.hit if self.strings else None

    def finish(self, ids: Sequence[int]) -> str:
        """The continuation's text, cut before the earliest stop string."""
        text = self.text(ids)
        cut = self.cut(text) if self.strings else None
        return text if cut is None else text[:cut]
