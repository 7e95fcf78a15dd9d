"""Prompts of an exact token length for the benchmark client: random token ids (or one repeated sentence) decoded
to text and re-encoded until the text is the asked number of tokens for the tokenizer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

FIXED_SENTENCE = "The quick brown fox jumps over the lazy dog while the sun sets slowly behind the hills. "


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        from gunicorn_llm.engines.model_store import embedded_model_dir

        path = str(embedded_model_dir())
    return AutoTokenizer.from_pretrained(path)


def exact_length_prompt(tokenizer, ids: list[int], length: int, more_ids: Callable[[int], list[int]]) -> str:
    """Text that the tokenizer encodes (special tokens included, as a server does) into exactly `length` ids.

    Decoding ids and encoding the text again may merge or split tokens, so trim or extend and repeat until the
    round trip is stable, as vLLM's random dataset does.
    """
    for _ in range(20):
        text = tokenizer.decode(ids[:length], skip_special_tokens=True)
        ids = tokenizer(text)["input_ids"]
        if len(ids) == length:
            return text
        if len(ids) < length:
            ids = ids + more_ids(length - len(ids))
    raise SystemExit(f"error: could not build a prompt of exactly {length} tokens with this tokenizer")


class PromptMaker:
    """Prompts of `length` tokens: `random` ids (distinct per request) or one `fixed` sentence repeated."""

    def __init__(self, tokenizer, length: int, kind: str):
        self.tokenizer, self.length, self.kind = tokenizer, length, kind
        special = set(tokenizer.all_special_ids)
        self.vocabulary = [token for token in range(len(tokenizer)) if token not in special]
        self._fixed: str | None = None

    def make(self, count: int, seed: str) -> list[str]:
        if self.kind == "fixed":
            if self._fixed is None:
                sentence_ids = self.tokenizer(FIXED_SENTENCE, add_special_tokens=False)["input_ids"]
                repeat = list(itertools.islice(itertools.cycle(sentence_ids), self.length))
                self._fixed = exact_length_prompt(self.tokenizer, repeat, self.length, lambda n: repeat[:n])
            return [self._fixed] * count
        rng = random.Random(seed)  # a string seed: the same prompts for every server at one level and repeat

        def draw(n: int) -> list[int]:
            return rng.choices(self.vocabulary, k=n)

        return [exact_length_prompt(self.tokenizer, draw(self.length), self.length, draw) for _ in range(count)]
