"""The interface of the transformers engine's batching paths: what `TransformersEngine` needs from each.

A worker serves with batched `generate` (transformers_generate.py), and on one device possibly with a continuous
path beside it: slot batching (transformers_slots.py) or transformers' continuous batching
(transformers_continuous.py). The engine hands each request to the first path that can serve it; the paths publish
tokens on the request's stream from threads of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import ClassVar

from gunicorn_llm.engines.base import GenerationStream
from gunicorn_llm.engines.token_controls import TokenControls
from gunicorn_llm.request_schema import SamplingParams


class BatchingPath(ABC):
    #: --batching's value for it: /ready's `batching` and /metrics' `llm_engine_path_total{path=...}`
    name: ClassVar[str]

    @abstractmethod
    def can_serve(self, params: SamplingParams) -> bool:
        """Whether this path applies everything `params` asks for."""

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
              controls: TokenControls | None = None) -> GenerationStream:
        """Begin generating `params.n` choices, each ending on one of `stop_ids` or after `params.max_tokens`
        tokens, under the request's token `controls` (a path that cannot apply them refuses them in `can_serve`);
        returns at once (called from many request threads)."""

    @abstractmethod
    def running(self) -> int:
        """Sequences this path is generating or holding now (each choice counts)."""

    def describe(self) -> dict:
        """What /ready reports about this path beside its name."""
        return {}

    def close(self) -> None:  # noqa: B027 - a hook: a path with nothing to stop keeps this default
        """Stop the path's threads as the worker exits. By default nothing: they are daemons."""


class ContinuousPath(BatchingPath):
    """A path with a generation loop of its own, beside batched `generate`: sequences join and leave its running
    batch at every step."""

    @abstractmethod
    def paused(self) -> AbstractContextManager:
        """A context in which the caller has the model to itself (the loop waits between steps, keeping its batch)."""
