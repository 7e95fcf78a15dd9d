"""Prompt log-probabilities (log-likelihood requests) for the transformers engine, batched across requests.

Evaluation harnesses send many requests of a few prompts each, from many threads. The engine's batching thread
hands `score_jobs` every request waiting at once; their prompts, sorted by length so that prompts of similar length
share a pass, go through the model in as few forward passes as a token budget allows (padded rows x longest). Right
padding and a causal model make a prompt's numbers independent of its batch mates (float32: equal to one prompt
alone within 1e-5).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from gunicorn_llm.engines.base import TokenLogprob
from gunicorn_llm.engines.transformers_sampling import token_logprobs

log = logging.getLogger("gunicorn.error")

# Prompt tokens scored per forward pass: bounds the float32 logits tensor (tokens x vocabulary) in memory.
SCORING_TOKEN_BUDGET = 4096


@dataclass
class ScoreJob:
    """One request's prompts; `result` gets one list of TokenLogprob per prompt, in order."""

    prompts: list[list[int]]
    top: int
    result: Future = field(default_factory=Future)


@dataclass
class _Prompt:
    job: ScoreJob
    index: int  # in its job's prompts

    @property
    def ids(self) -> list[int]:
        return self.job.prompts[self.index]


def score_jobs(model, pad_token_id: int, jobs: list[ScoreJob], token_budget: int = SCORING_TOKEN_BUDGET) -> None:
    """Score every prompt of `jobs` in shared forward passes and set each job's result (or its error: a pass that
    fails fails the jobs with prompts in it, and the others go on)."""
    scores: dict[int, list] = {id(job): [None] * len(job.prompts) for job in jobs}
    prompts = sorted((_Prompt(job, index) for job in jobs for index in range(len(job.prompts))),
                     key=lambda prompt: len(prompt.ids))
    for chunk in _chunks_within(prompts, token_budget):
        chunk = [prompt for prompt in chunk if not prompt.job.result.done()]  # failed in an earlier pass
        if not chunk:
            continue
        try:
            for prompt, result in zip(chunk, _score_batch(model, pad_token_id, chunk)):
                scores[id(prompt.job)][prompt.index] = result
        except Exception as error:  # noqa: BLE001 - the error goes to the waiting requests, the loop goes on
            log.exception("scoring %d prompts failed", len(chunk))
            for job in {id(prompt.job): prompt.job for prompt in chunk}.values():
                if not job.result.done():
                    job.result.set_exception(error)
    for job in jobs:
        if not job.result.done():
            job.result.set_result(scores[id(job)])


@torch.inference_mode()
def _score_batch(model, pad_token_id: int, prompts: list[_Prompt]) -> list[list[TokenLogprob]]:
    # Right padding: a causal model's logits for the real tokens do not depend on padding after them.
    device = model.get_input_embeddings().weight.device
    width = max(len(prompt.ids) for prompt in prompts)
    input_ids = torch.tensor([prompt.ids + [pad_token_id] * (width - len(prompt.ids)) for prompt in prompts],
                             device=device)
    mask = torch.tensor([[1] * len(prompt.ids) + [0] * (width - len(prompt.ids)) for prompt in prompts],
                        device=device)
    logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    # One pass over every position (the few padding ones too: prompts of a pass have similar lengths), then cut.
    positions = width - 1
    entries = token_logprobs(logprobs.flatten(0, 1), input_ids[:, 1:].flatten(),
                             [prompt.job.top for prompt in prompts for _ in range(positions)])
    return [entries[row * positions : row * positions + len(prompt.ids) - 1] for row, prompt in enumerate(prompts)]


def _chunks_within(prompts: list[_Prompt], token_budget: int):
    """Consecutive groups whose padded size (rows x longest) stays within the budget (a longer prompt: alone)."""
    chunk: list[_Prompt] = []
    for prompt in prompts:
        if chunk and (len(chunk) + 1) * max(len(prompt.ids), *(len(p.ids) for p in chunk)) > token_budget:
            yield chunk
            chunk = []
        chunk.append(prompt)
    if chunk:
        yield chunk
