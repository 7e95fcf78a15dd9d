"""An engine that publishes fixed token lists instead of running a model: the in-process tests' stand-in.

It implements the engine interface (engines/base.py) with the embedded model's tokenizer, so everything above the
engines (text, stop strings, routes, error shapes, SSE frames, guards) runs for real over it, in the test's own
process, without a model or a server. Structured-output constraints are compiled for real (xgrammar), so a bad one
is refused as the transformers engine refuses it; the published tokens are the script's all the same.
"""

from __future__ import annotations

import functools
import time

from gunicorn_llm.engines.base import ChoiceUpdate, Engine, GenerationStream, TokenLogprob
from gunicorn_llm.engines.grammars import Grammars
from gunicorn_llm.http.app import create_app
from gunicorn_llm.settings import ServerSettings


def scripted_client(tokenizer, script: list[str], finish: str = "length", **settings):
    """A Flask test client of an app serving a scripted engine that answers each choice with a text of `script` (in
    turn), ending it with `finish`, once its engine is loaded; `settings` by variable."""
    return scripted_client_of(
        ScriptedEngine(tokenizer, [tokenizer(text, add_special_tokens=False)["input_ids"] for text in script], finish),
        **settings)


def scripted_client_of(engine: Engine, **settings):
    """A Flask test client of an app serving `engine`, once it is loaded; `settings` by variable."""
    app = create_app(lambda: engine, ServerSettings(**settings))
    client = app.test_client()
    deadline = time.monotonic() + 10
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the scripted engine did not load"
        time.sleep(0.01)
    return client


class ScriptedEngine(Engine):
    """Publishes fixed token lists, one token per update, as soon as a generation starts; `finish=None` leaves the
    choices running (the engine would go on generating until told to stop). Prompt scoring, and each published
    token when logprobs are asked for, give every token the same log-probability, `SCORED_LOGPROB`."""

    model_name = "scripted"
    max_model_len = 1024
    SCORED_LOGPROB = -1.5

    def __init__(self, tokenizer, script: list[list[int]], finish: str | None = "length", stream_interval: int = 1):
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.eos_token_ids = (tokenizer.eos_token_id,)
        self.script = script
        self.finish = finish
        self.aborted = 0
        self.streams: list[GenerationStream] = []

    def start(self, prompt_ids, params):
        stream = GenerationStream(params.n, abort=self._abort, interval=self.stream_interval)
        self.streams.append(stream)
        for choice in range(params.n):
            tokens = self.script[choice % len(self.script)]
            for position, token in enumerate(tokens):
                last = position == len(tokens) - 1
                logprobs = None if params.logprobs is None else [TokenLogprob(token, self.SCORED_LOGPROB)]
                stream.publish(ChoiceUpdate(choice, [token], logprobs, self.finish if last else None))
        return stream

    @functools.cached_property
    def grammars(self) -> Grammars:
        return Grammars(self.tokenizer, len(self.tokenizer), self.eos_token_ids)

    def check_structured_outputs(self, constraint):
        self.grammars.compile(constraint)

    def _abort(self):
        self.aborted += 1

    def prompt_logprobs(self, prompts, top=0, deadline=None):
        return [[TokenLogprob(token, self.SCORED_LOGPROB) for token in prompt[1:]] for prompt in prompts]

    def running(self):
        return 0
