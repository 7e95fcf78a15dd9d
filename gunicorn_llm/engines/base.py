"""The small interface both inference engines implement, so everything above them is written once.

An engine turns token ids into token ids: it starts a generation for a tokenized prompt and reports, per choice
(`n` of them), the new tokens as they are produced and why the choice finished. Text, stop strings and every
response format live above it (generation.py, http/app.py, http/openai_api.py).

An engine is built inside a gunicorn worker after its GPU slice is pinned, and is called from many request
threads at once: it must batch concurrent generations itself rather than serialise them.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from gunicorn_llm.request_schema import SamplingParams, StructuredOutputs

log = logging.getLogger("gunicorn.error")


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (before any sampling transform), with the likeliest alternatives.
    A named tuple, not a dataclass: scoring makes one per prompt token, and a tuple is made in half the time."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first
    rank: int | None = None  # prompt tokens: 1 + how many tokens are likelier (vLLM's: how many are as likely or more)


@dataclass
class ChoiceUpdate:
    """What one choice produced since its last update."""

    choice: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for logprobs
    finish_reason: str | None = None  # None while running; "stop": a stop or end-of-sequence token; "length"
    at: float = field(default_factory=time.monotonic)  # when the engine produced it (not when it was read)
    first_at: float | None = None  # several updates merged into one: when the first of them was produced


_END = object()


class DeadlineExceeded(Exception):
    """A generation ran past its request's deadline."""


class EngineBusy(Exception):
    """The engine cannot serve this request now (e.g. out of memory for it beside the others); it serves later ones,
    and the client may retry (a 503)."""


class ClientGone(Exception):
    """The client that asked for a generation disconnected before its answer."""


@dataclass
class GenerationStream:
    """The updates of one prompt's generation, in order, as the engine produces them.

    The engine calls `publish` from its own thread; one request thread iterates. `cancel` stops the generation in
    the engine (a client that left, a stop string found) and ends the iteration.

    A reader that falls behind gets what queued up merged into one update per choice, so that a busy worker
    decodes and writes once per read rather than once per token. After its first update a stream hands over
    `interval` tokens of a choice at a time (--stream-interval, as vLLM's), and a choice's last tokens when it
    finishes: the reader wakes, decodes and writes once per `interval` tokens. A stream that is not `incremental`
    (a whole answer, no stop strings to watch) hands over its first update (the request is running) and then each
    choice once, when it finishes: its reader does not wake per token.
    """

    choices: int
    abort: Callable[[], None]
    interval: int = 1
    incremental: bool = True
    # SimpleQueue: put and get are C code, where queue.Queue runs a Condition in Python for each (per token)
    _updates: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _held: dict = field(default_factory=dict)  # choice -> its updates not handed over yet, merged
    _published: bool = False
    cancelled: bool = False

    def publish(self, update: ChoiceUpdate) -> None:
        if self._published and (self.interval > 1 or not self.incremental):
            held = self._held.pop(update.choice, None)
            update = update if held is None else _merged(held, update)
            if update.finish_reason is None and (not self.incremental or len(update.token_ids) < self.interval):
                self._held[update.choice] = update
                return
        self._published = True
        self._updates.put(update)

    def fail(self, error: BaseException) -> None:
        self._updates.put(error)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.abort()
            self._updates.put(_END)

    def __iter__(self) -> Iterator[ChoiceUpdate]:
        return self.updates()

    def updates(self, deadline: float | None = None, still_wanted: Callable[[], bool] | None = None
                ) -> Iterator[ChoiceUpdate]:
        """The updates until every choice finished; past `deadline` (time.monotonic) raises DeadlineExceeded, and
        when `still_wanted()` (asked about once a second while waiting) says no, ClientGone."""
        open_choices = self.choices
        next_check = time.monotonic() + 1.0
        while open_choices:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if still_wanted is not None:
                wait = 1.0 if wait is None else min(wait, 1.0)
            try:
                items = self._take(wait)
            except queue.Empty:
                items = []
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise DeadlineExceeded()
            if still_wanted is not None and now >= next_check:
                next_check = now + 1.0
                if not still_wanted():
                    raise ClientGone()
            for item in items:
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_choices -= 1
                yield item

    def _take(self, wait: float | None) -> list:
        """The next item, waiting up to `wait` seconds, with whatever queued behind it: consecutive updates of one
        choice merged, ends and errors kept in place."""
        items = [self._updates.get(timeout=wait)]
        while True:
            try:
                item = self._updates.get_nowait()
            except queue.Empty:
                return items
            last = items[-1]
            if (isinstance(item, ChoiceUpdate) and isinstance(last, ChoiceUpdate) and item.choice == last.choice
                    and last.finish_reason is None):
                items[-1] = _merged(last, item)
            else:
                items.append(item)


def _merged(first: ChoiceUpdate, then: ChoiceUpdate) -> ChoiceUpdate:
    """Two consecutive updates of one choice as one, produced from `first_at` until `at`. A merged update (first_at
    set) belongs to the stream and grows in place: holding a long answer back stays linear in its tokens."""
    if first.first_at is None:
        first = ChoiceUpdate(first.choice, list(first.token_ids),
                             None if first.logprobs is None else list(first.logprobs), None, first.at, first.at)
    first.token_ids.extend(then.token_ids)
    if first.logprobs is not None:
        first.logprobs.extend(then.logprobs or ())
    first.finish_reason, first.at = then.finish_reason, then.at
    return first


class EngineDied(RuntimeError):
    """The engine cannot generate any more; the worker is replaced."""


# What a tokenizer decodes an unfinished multi-byte character to: a byte-level piece of one, alone, ends with it
REPLACEMENT_CHARACTER = "\ufffd"
# The most tokens one UTF-8 character spans in byte-level vocabularies (one token per byte)
UTF8_MAX_BYTES = 4


def _byte_level_alphabet(tokenizer) -> dict[str, int]:
    """character -> byte of a byte-level BPE vocabulary (GPT-2's, Llama 3's, Qwen's: each token is its bytes written
    in a 256-character alphabet); {} for other vocabularies."""
    from tokenizers import decoders

    if not isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), decoders.ByteLevel):
        return {}
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenTexts(dict):
    """token id -> its text alone, decoded on first use (a dict: a lookup is one C call)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self._byte_of: dict[str, int] | None = None  # a byte-level vocabulary's alphabet: character -> byte
        self._whole: dict[int, bool] = {}  # token id -> whether its bytes are whole characters

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = self.tokenizer.decode([token_id])
        return text

    def _whole_characters(self, token_id: int) -> bool:
        """Whether the token's own bytes are whole UTF-8 characters: a U+FFFD it reads as is then the text's own (text
        that held one already), not a character it leaves unfinished. False where the vocabulary is not byte-level
        (its tokens' bytes are not known here)."""
        if self._byte_of is None:
            self._byte_of = _byte_level_alphabet(self.tokenizer)
        if not self._byte_of:
            return False
        if token_id not in self._whole:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            try:
                bytes(self._byte_of[char] for char in piece).decode("utf-8")
                self._whole[token_id] = True
            except (KeyError, TypeError, UnicodeDecodeError):  # not the alphabet's, not a token, unfinished bytes
                self._whole[token_id] = False
        return self._whole[token_id]

    def in_sequence(self, token_ids: Sequence[int], before: Sequence[int] = ()) -> list[str]:
        """The tokens' texts as they read one after another (after the ids `before`): what each adds to the decoded
        text, so that offsets summed from their lengths index that text. A token that is part of a multi-byte
        character reads as the characters it finishes, "" until then, as vLLM's server names such tokens; alone it
        would read as U+FFFD, and the offsets after it would drift from the text."""
        pieces = [self[token] for token in token_ids]
        for index, piece in enumerate(pieces):
            if piece.endswith(REPLACEMENT_CHARACTER):
                pieces[index] = self.finishing(token_ids[index], [*before[-UTF8_MAX_BYTES:], *token_ids[:index]])
        return pieces

    def at(self, token_id: int, sequence: Sequence[int], end: int) -> str:
        """`token_id`'s text after the ids `sequence[:end]` (an alternative at position `end` of a sequence)."""
        piece = self[token_id]
        if piece.endswith(REPLACEMENT_CHARACTER):
            return self.finishing(token_id, sequence[max(0, end - UTF8_MAX_BYTES):end])
        return piece

    def finishing(self, token_id: int, preceding: Sequence[int]) -> str:
        """The text a byte-level `token_id` adds after `preceding`: decoded with the shortest tail of `preceding`
        that makes whole characters, less what that tail's own finished tokens read; "" if it finishes none."""
        if self._whole_characters(token_id):
            return self[token_id]
        preceding = preceding[-UTF8_MAX_BYTES:]
        for start in range(len(preceding) - 1, -1, -1):
            tail = list(preceding[start:])
            text = self.tokenizer.decode([*tail, token_id])
            if text.endswith(REPLACEMENT_CHARACTER):
                continue
            # the tail's own unfinished pieces read "": their bytes belong to this token's characters
            finished = len(tail)
            while finished and self[tail[finished - 1]].endswith(REPLACEMENT_CHARACTER):
                finished -= 1
            head = self.tokenizer.decode(tail[:finished]) if finished else ""
            return text[len(os.path.commonprefix([head, text])):]
        return ""


class Engine(ABC):
    """Subclasses call `step_taken()` once per generation step and `die()` when their loop cannot go on."""

    #: set once the engine died: /ready answers 503 and new requests are refused until the worker is replaced
    failure: BaseException | None = None
    #: set when the worker exits: its engine's processes are being ended, which is no failure
    stopping = False
    #: the engine core this worker's engine shares with other workers (its pid), or None: its own engine
    engine_core_id: str | None = None
    #: FAULT_INJECT_AFTER_STEPS: fail the engine at this generation step (fault tests only)
    _fail_at_step: int | None = None
    _steps = 0

    #: the name clients see for the served model
    model_name: str
    #: the model's tokenizer (Hugging Face interface): the layer above encodes prompts and decodes tokens with it
    tokenizer: object
    #: tokens that end a generation unless `ignore_eos` is set
    eos_token_ids: tuple[int, ...]
    #: prompt plus generated tokens at most
    max_model_len: int

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Begin generating `params.n` choices for the prompt; returns at once.

        The engine ends a choice on an end-of-sequence token (unless `params.ignore_eos`), on one of
        `params.stop_token_ids` (that token is the choice's last), or after `params.max_tokens` tokens. It ignores
        `params.stop` strings: the layer above finds them in the text and cancels. With
        `params.structured_outputs` every choice follows the constraint, and ends (as "stop") when it is complete.
        """

    def check_structured_outputs(self, constraint: StructuredOutputs) -> None:
        """Compile a structured-output constraint as the engine will (cached), before the request is admitted:
        ValueError saying why when it cannot be. By default none can: an engine that honours them overrides this."""
        raise ValueError("structured outputs are not supported by this engine")

    @abstractmethod
    def prompt_logprobs(
        self, prompts: list[list[int]], top: int = 0, deadline: float | None = None
    ) -> list[list[TokenLogprob]]:
        """For each prompt, the log-probability of every token after the first given the tokens before it.

        Past `deadline` (time.monotonic) it raises DeadlineExceeded.
        """

    @abstractmethod
    def running(self) -> int:
        """Sequences the engine is generating now (each choice counts): the capacity in use."""

    @property
    def token_texts(self) -> TokenTexts:
        """Each token's text, as `tokenizer.decode([token_id])` gives it, remembered (`engine.token_texts[id]`): a
        scored prompt's logprobs name each of its hundreds of tokens and their alternatives, and each decode costs
        microseconds of Python under the worker's one interpreter lock (most of the HTTP layer's time for a scoring
        request, docs/benchmarks.md). At most one entry per token of the vocabulary."""
        texts = self.__dict__.get("_token_texts")
        if texts is None:
            texts = self.__dict__["_token_texts"] = TokenTexts(self.tokenizer)
        return texts

    def describe(self) -> dict:
        """What `/ready` reports about the engine."""
        return {"model": self.model_name}

    def close(self) -> None:  # noqa: B027 - a hook: an engine with nothing to stop keeps this default
        """Stop what the engine runs beside the request threads, in order, as its worker exits (`stopping` is set
        first). By default nothing: the worker's exit ends it."""

    def inject_failure_after(self, steps: int | None) -> None:
        self._fail_at_step = steps

    def step_taken(self) -> None:
        """Count a generation step; raises EngineDied at the step FAULT_INJECT_AFTER_STEPS names."""
        self._steps += 1
        if self._fail_at_step is not None and self._steps >= self._fail_at_step:
            raise EngineDied(f"fault injected at generation step {self._steps} (FAULT_INJECT_AFTER_STEPS)")

    def die(self, error: BaseException) -> None:
        """Mark the engine dead and ask gunicorn for a fresh worker: a graceful stop lets in-flight requests end
        (they fail fast now), then the master starts a replacement that builds a new engine."""
        if self.failure is not None or self.stopping:
            return
        self.failure = error
        log.error("worker %s: the engine died (%s); stopping this worker so that gunicorn replaces it",
                  os.getpid(), error)
        os.kill(os.getpid(), signal.SIGTERM)


def wait_for(future, deadline: float | None):
    """A future's result, or DeadlineExceeded once `deadline` (time.monotonic) has passed."""
    try:
        return future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise DeadlineExceeded() from None
