"""From engine tokens to text, once for every route: incremental decoding, stop strings, and collected answers.

Each route tokenizes its prompt, starts a `TextGeneration`, and either iterates its text deltas (streaming) or
collects them. Stop strings are found here, in the decoded text, for both engines alike: the answer ends before
the stop string and the engine is told to stop; with `min_tokens`, as in vLLM, only a stop string that ends after
the text of the first min_tokens tokens counts. Closing a generation before it finished (a client that left)
cancels it in the engine, so the capacity comes back at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gunicorn_llm.engines.base import ChoiceUpdate, Engine, TokenLogprob
from gunicorn_llm.ops.metrics import RequestStats
from gunicorn_llm.request_schema import SamplingParams


@dataclass
class TextDelta:
    """New text of one choice, with the tokens behind it."""

    choice: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class _ChoiceText:
    """Decodes one choice's growing token list into text, and holds back what might still become a stop string.

    Decoding is incremental, as in vLLM: each update decodes only its new tokens behind the previous update's tokens
    (the context that fixes spaces and multi-byte characters at the seam), never the whole answer again, so a long
    streamed answer costs linear, not quadratic, time.
    """

    def __init__(self, tokenizer, params: SamplingParams, stop_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.stop_token_ids = stop_token_ids
        self.token_ids: list[int] = []
        self.text = ""  # the decoded text of token_ids[:read_offset]
        self.prefix_offset = 0  # where the context of the next decode starts
        self.read_offset = 0  # tokens already in `text`
        self.sent = 0  # characters of the text already handed out
        self.hold = max((len(s) for s in params.stop or ()), default=1) - 1
        # where a stop string may end at the earliest: past the first min_tokens tokens' text (None: not known yet)
        self.stops_after: int | None = 0 if not params.min_tokens else None

    def advance(self, update: ChoiceUpdate) -> tuple[str, str | None, int]:
        """The text that can be released now, the finish reason (which a stop string may set), and how many of the
        update's tokens belong to the answer: a stop string ends it at the token that completes the stop string,
        as in vLLM, also when the update carries tokens past it (a stream interval, a reader that fell behind)."""
        self.token_ids.extend(update.token_ids)
        ids = self.token_ids
        if update.finish_reason == "stop" and ids and ids[-1] in self.stop_token_ids:
            ids = ids[:-1]  # the stop token itself is not part of the answer
        finish, kept = update.finish_reason, len(update.token_ids)
        self._decode(ids, final=finish is not None)
        text = self.text
        if self.stops_after is None and len(self.token_ids) > self.params.min_tokens:
            self.stops_after = len(self.tokenizer.decode(self.token_ids[: self.params.min_tokens],
                                                         skip_special_tokens=self.params.skip_special_tokens))
        stops = self.params.stop if self.stops_after is not None else ()
        found = [(i, stop) for stop in stops or ()
                 if (i := text.find(stop, max(0, self.sent - len(stop), self.stops_after - len(stop) + 1))) >= 0]
        if found:
            cut, stop = min(found, key=lambda match: (match[0], len(match[1])))  # the first to end the text
            text, finish = text[:cut], "stop"
            kept = self._tokens_completing(cut, stop, kept)
        elif finish is None:
            text = text[: max(len(text) - self.hold, self.sent)]  # what may be the start of a stop string waits
        delta, self.sent = text[self.sent :], len(text)
        return delta, finish, kept

    def _tokens_completing(self, cut: int, stop: str, new: int) -> int:
        """The fewest of the last update's `new` tokens whose text holds `stop` at `cut` (once per choice, at its end:
        a whole decode per try is cheap enough)."""
        before = len(self.token_ids) - new
        for count in range(1, new):
            text = self.tokenizer.decode(self.token_ids[: before + count],
                                         skip_special_tokens=self.params.skip_special_tokens)
            if text[cut : cut + len(stop)] == stop:
                return count
        return new

    def _decode(self, ids: list[int], final: bool) -> None:
        if len(ids) <= self.read_offset:
            return
        skip = self.params.skip_special_tokens
        context = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        decoded = self.tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=skip)
        if decoded.endswith("\ufffd") and not final:
            return  # a character whose bytes are not all generated yet: wait for them
        if decoded.startswith(context):
            self.text += decoded[len(context) :]
        else:  # the seam changed earlier text (a tokenizer's clean-up rules): decode the whole answer once
            self.text = self.tokenizer.decode(ids, skip_special_tokens=skip)
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)


class TextGeneration:
    """One prompt's generation as text. Starting it submits it to the engine; iterate for deltas or `collect()`."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams,
                 stats: RequestStats | None = None, deadline: float | None = None,
                 still_wanted: Callable[[], bool] | None = None):
        self.params = params
        self.prompt_ids = prompt_ids
        self._stats = stats
        self._deadline = deadline  # time.monotonic() past which the generation is stopped
        self._still_wanted = still_wanted  # False once the client has gone: the generation is stopped
        self._started = time.monotonic()
        self._last_tokens_at: dict[int, float] = {}  # per choice
        if stats is not None:
            stats.generation_started(len(prompt_ids))
        stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else set(engine.eos_token_ids))
        self._choices = [_ChoiceText(engine.tokenizer, params, stop_ids) for _ in range(params.n)]
        self._stream = engine.start(prompt_ids, params)
        self._open = params.n  # choices still producing text
        self._engine_open = params.n  # choices the engine has not finished (a stop string ends text first)

    def __iter__(self) -> Iterator[TextDelta]:
        try:
            for update in self._stream.updates(self._deadline, self._still_wanted):
                if update.finish_reason is not None:
                    self._engine_open -= 1
                self._report_tokens(update)
                state = self._choices[update.choice]
                if state is None:
                    continue  # a stop string already ended this choice
                text, finish, kept = state.advance(update)
                if finish is not None:
                    self._choices[update.choice] = None
                    self._open -= 1
                logprobs = update.logprobs[:kept] if update.logprobs is not None else None
                yield TextDelta(update.choice, text, update.token_ids[:kept], logprobs, finish)
                if self._open == 0:
                    break
        finally:
            self.cancel()  # closed early, or ended by stop strings: the engine stops this generation

    def cancel(self) -> None:
        """Stop the generation in the engine unless it already finished."""
        self._open = 0
        if self._engine_open:
            self._engine_open = 0
            self._stream.cancel()

    def _report_tokens(self, update: ChoiceUpdate) -> None:
        if self._stats is None or not update.token_ids:
            return
        # The engine's times: a reader that comes late (one /infer instance after another) is not counted as slow.
        first_at = update.first_at or update.at
        count = len(update.token_ids)
        self._stats.tokens(count)
        if not self._last_tokens_at:
            self._stats.first_token(first_at - self._started)
            if count > 1:  # merged updates: the rest came over the time they span
                self._stats.token_gap((update.at - first_at) / (count - 1))
        elif update.choice in self._last_tokens_at:
            self._stats.token_gap((update.at - self._last_tokens_at[update.choice]) / count)
        self._last_tokens_at[update.choice] = update.at

    def collect(self) -> list[ChoiceResult]:
        if not self.params.stop:  # nothing to find in the text as it grows: take each choice whole
            self._stream.incremental = False
        results = [ChoiceResult() for _ in range(self.params.n)]
        for delta in self:
            result = results[delta.choice]
            result.text += delta.text
            result.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None:
                result.logprobs = (result.logprobs or []) + delta.logprobs
            result.finish_reason = delta.finish_reason or result.finish_reason
        return results
