"""The small interface both inference engines implement, so the HTTP layer (`serving.py`) is written once.

An engine is built inside a gunicorn worker after its GPU slice is pinned, and is called from many request
threads at once: it must batch concurrent calls itself rather than serialise them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from request_schema import SamplingParams


class Engine(ABC):
    #: the name clients see for the served model
    model_name: str

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        """For each prompt, `params.n` generated texts (the prompt not repeated, stop strings cut off)."""

    @abstractmethod
    def prompt_logprobs(self, prompts: list[str]) -> list[list[float]]:
        """For each prompt, log P(token_i | tokens_<i) for every prompt token after the first.

        Tokens are the tokenizer's encoding of the prompt with its default special tokens (as vLLM encodes it).
        """

    def describe(self) -> dict:
        """What `/ready` reports about the engine."""
        return {"model": self.model_name}


def truncate_at_stop(text: str, stop: tuple[str, ...] | None) -> str:
    """Cut `text` before the earliest stop string, as vLLM does by default."""
    if not stop:
        return text
    cut = min((index for index in (text.find(s) for s in stop) if index >= 0), default=len(text))
    return text[:cut]
