"""The continuous-batching path of the transformers engine: transformers' own `ContinuousBatchingManager`.

One manager per worker runs a generation loop in its own thread; request threads add their sequences to it and
wait on futures that one routing thread settles as sequences finish. Sequences join and leave the running batch
at every step, so a short request never waits for a long one.

The manager applies temperature, top-k and top-p per request, and a per-request end-of-sequence set; requests
that need anything else (a seed, penalties, min_p, stop strings, prompt scoring) go to the engine's batched
`generate` path instead (`can_serve`). Greedy decoding is top-k 1 sampling, since the manager samples or argmaxes
for every request alike.

This module drives the manager; decoding token ids into answers stays in the engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from concurrent.futures import Future

from transformers import ContinuousBatchingConfig, GenerationConfig

from request_schema import SamplingParams

log = logging.getLogger("gunicorn.error")

CPU_CACHE_BLOCKS = 32  # x 256-token pages: room for 8,192 tokens in flight per worker on CPU


class ContinuousBatching:
    def __init__(self, model, pad_token_id: int, vocab_size: int, memory_share: float):
        """`memory_share`: the fraction of the device's free memory this manager may take for its KV cache."""
        self.vocab_size = vocab_size
        # Values other than the neutral ones make the manager build its per-request temperature, top-k and top-p
        # processors; every request then passes all three, so these defaults never apply to a request.
        config = GenerationConfig(
            do_sample=True, temperature=0.5, top_k=50, top_p=0.5, pad_token_id=pad_token_id, max_new_tokens=16,
            eos_token_id=-1,  # none by default: each request passes its own stop tokens
        )
        self.manager = model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True,
                max_memory_percent=memory_share,
                # On CPU the share would be of the host's RAM (12 GB on a 24 GB machine): a fixed, small cache.
                num_blocks=None if model.device.type == "cuda" else CPU_CACHE_BLOCKS,
            ),
        )
        self.manager.start()
        self._waiting: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._loop_error: BaseException | None = None
        threading.Thread(target=self._route_results, name="cb-results", daemon=True).start()

    @staticmethod
    def can_serve(params: SamplingParams) -> bool:
        return (
            params.seed is None
            and not params.stop
            and not params.scores_prompt
            and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0
            and params.min_p == 0.0
        )

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, stop_ids: tuple[int, ...]):
        """For each prompt, `params.n` lists of generated token ids (ending with the stop token when one ended it)."""
        if self._loop_error is not None:
            raise RuntimeError(f"the generation loop died: {self._loop_error}")
        sampling = self._sampling_kwargs(params)
        futures = []
        for ids in prompt_ids:
            for _ in range(params.n):
                request_id = uuid.uuid4().hex
                future: Future = Future()
                with self._lock:  # registered before it is added, so a fast result always finds its future
                    self._waiting[request_id] = future
                added = self.manager.add_request(
                    ids, request_id=request_id, max_new_tokens=params.max_tokens, eos_token_id=list(stop_ids),
                    **sampling,
                )
                if added is None:
                    with self._lock:
                        self._waiting.pop(request_id, None)
                    raise RuntimeError("the continuous batching manager is not accepting requests")
                futures.append(future)
        tokens = [future.result() for future in futures]
        return [tokens[i : i + params.n] for i in range(0, len(tokens), params.n)]

    def _sampling_kwargs(self, params: SamplingParams) -> dict:
        if params.is_greedy:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        top_k = params.top_k if params.top_k > 0 else self.vocab_size
        return {"temperature": float(params.temperature), "top_k": top_k, "top_p": float(params.top_p)}

    def paused(self):
        """A context in which the caller has the model to itself (the generation loop waits, keeping its batch)."""
        pause = getattr(self.manager, "pause", None)
        return pause() if pause is not None and self.manager.is_running() else contextlib.nullcontext()

    def _route_results(self) -> None:
        while True:
            output = self.manager.get_result(timeout=1.0)
            if output is None:
                error = self.manager.background_thread_status.fatal_error
                if error is not None:
                    self._fail_all(error)
                    return
                continue
            if not output.is_finished():
                continue
            with self._lock:
                future = self._waiting.pop(output.request_id, None)
            if future is None:
                continue
            if output.error:
                future.set_exception(RuntimeError(f"generation failed: {output.error}"))
            else:
                future.set_result(list(output.generated_tokens))

    def _fail_all(self, error: BaseException) -> None:
        log.error("continuous batching loop died: %s", error)
        with self._lock:
            self._loop_error = error
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.set_exception(RuntimeError(f"the generation loop died: {error}"))
